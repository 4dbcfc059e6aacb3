"""Gradient accumulation: one update from a batch run as `config.microbatches` sequential pieces.

The loss is the mean over every scored position (or record) of the whole batch. Each microbatch's
summed loss is divided by the whole batch's count before differentiating, so the summed gradients
are exactly the whole batch's gradient (the token-count weighting is built in), and the update
equals the one from the undivided batch up to float32 summation order. Only one microbatch's
activations are alive at a time.
"""

import jax
import jax.numpy as jnp

from seqmodels.errors import UserError


def check_microbatches(batch_size: int, microbatches: int, batch_divisor: int) -> None:
  if microbatches < 1:
    raise UserError(f"microbatches must be >= 1, got {microbatches}")
  if batch_size % (microbatches * batch_divisor):
    raise UserError(f"batch_size {batch_size} does not split into {microbatches} microbatches of a multiple of "
                    f"the {batch_divisor} batch-sharded devices; pick a batch_size divisible by "
                    f"{microbatches * batch_divisor}")


def split_microbatches(batch: dict, microbatches: int) -> dict:
  """Leading axis (batch, ...) -> (microbatches, batch / microbatches, ...).

  Microbatch i takes rows i, i + m, i + 2m, ...: every device's contiguous block of the batch then
  holds an equal share of every microbatch, so no rows move between devices.
  """
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def loss_and_grads(sums_fn, params, batch: dict, microbatches: int):
  """(mean loss, mean accuracy, gradient of the mean loss) over the batch's scored positions.

  sums_fn(params, batch) -> {"loss", "correct", "count"} sums; a batch's optional "weights" says
  which positions count (all of them without it).
  """
  targets = batch["targets"]
  count = jnp.sum(batch["weights"]) if "weights" in batch else jnp.asarray(targets.size, jnp.float32)
  count = jnp.maximum(count, 1.0)  # A masked-LM batch could, rarely, mask nothing.

  def share(params, piece):
    sums = sums_fn(params, piece)
    return sums["loss"] / count, sums["correct"] / count

  grad_fn = jax.value_and_grad(share, has_aux=True)
  if microbatches == 1:
    (loss, accuracy), grads = grad_fn(params, batch)
    return loss, accuracy, grads

  def accumulate(totals, piece):
    (loss, accuracy), grads = grad_fn(params, piece)
    return jax.tree.map(jnp.add, totals, (loss, accuracy, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, accuracy, grads), _ = jax.lax.scan(accumulate, zeros, split_microbatches(batch, microbatches))
  return loss, accuracy, grads
