"""Non-finite losses and gradients: the update is dropped inside the jitted step, the host applies the policy.

`keep_if_finite` runs inside the train step, so a NaN or Inf never reaches the parameters or the
optimizer state (Adam's moments would otherwise carry it forever). The step still counts, and its
batch is consumed, so a resumed run stays in step with the data. `NonfiniteGuard` sees each
step's flag on the host when the metrics are fetched (at logging and before every checkpoint) and
applies config.nonfinite_policy:

  skip   drop the update, count it (the `nonfinite_steps` metric), and halt after
         config.max_nonfinite_steps of them in a row (the streak restarts when the run is resumed)
  halt   stop at the first one
"""

import jax
import jax.numpy as jnp

from seqmodels.errors import UserError

POLICIES = ("skip", "halt")


class NonfiniteHalt(UserError):
  """Training stopped on a non-finite loss or gradient; the message names the step and the last good checkpoint."""


def keep_if_finite(finite, new, old):
  """`new` where `finite` (a scalar bool) holds, else `old`; bitwise `new` when finite."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


class NonfiniteGuard:

  def __init__(self, policy: str, max_in_a_row: int):
    self.policy = policy
    self.max_in_a_row = max_in_a_row
    self.streak = 0

  def observe(self, flags, first_step: int, last_checkpoint: str | None) -> int:
    """Counts the non-finite steps among `flags` (steps first_step, first_step + 1, ...).

    Raises NonfiniteHalt when the policy says to stop; `last_checkpoint` names the checkpoint a
    rerun resumes from.
    """
    count = 0
    for offset, bad in enumerate(flags):
      if not bad:
        self.streak = 0
        continue
      count += 1
      self.streak += 1
      if self.policy == "halt" or self.streak >= self.max_in_a_row:
        step = first_step + offset
        why = ("nonfinite_policy is 'halt'" if self.policy == "halt"
               else f"{self.streak} steps in a row, the max_nonfinite_steps limit")
        resume = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                  else "there is no checkpoint yet, so a rerun starts from step 0")
        raise NonfiniteHalt(f"loss or gradients not finite at step {step} ({why}); its update was dropped and "
                            f"{resume}; lower learning_rate or check the data, then rerun to resume")
    return count
