"""Fault injection for scripts/chaos.py and the reliability tests; inert unless SEQMODELS_FAULTS is set.

SEQMODELS_FAULTS holds ';'-separated faults, each `name=value`:

  nonfinite_at=S[,S...]  the loss and gradients of train steps S (numbered like the logs: the
                         step that produces checkpoint S; at most 8) are NaN, inside the jitted step
  write_error_at=S       every file write of the checkpoint of step S fails with ENOSPC ("No space
                         left on device"), as a full disk would
  stall_write_at=S       the first file write of the checkpoint of step S blocks forever, leaving a
                         half-written checkpoint for a kill to interrupt

The write faults patch the Python file layer Orbax writes its metadata through (etils.epath), for
paths inside the step's temporary directory only; array data goes through TensorStore, so a fault
strikes after the arrays and before the commit, the window a real crash would hit. With the
variable unset nothing is patched, and the train step's fault factor is 1.0 at every step.
"""

import errno
import os
import re
import threading

import jax.numpy as jnp

from seqmodels.errors import UserError

ENV = "SEQMODELS_FAULTS"
KNOWN = ("nonfinite_at", "write_error_at", "stall_write_at")


def active() -> dict[str, tuple[int, ...]]:
  """The faults named in SEQMODELS_FAULTS, as {name: steps}; empty when it is unset."""
  faults = {}
  for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(";"))):
    name, _, value = item.partition("=")
    if name not in KNOWN or not re.fullmatch(r"\d+(,\d+)*", value):
      raise UserError(f"{ENV}: bad fault {item!r}; expected one of {', '.join(KNOWN)} as name=STEP[,STEP...]")
    faults[name] = tuple(int(s) for s in value.split(","))
  return faults


MAX_NONFINITE_STEPS = 8


def nonfinite_factor(step):
  """NaN at the steps in nonfinite_at, else 1.0; `step` is the state's step before the update.

  The train step multiplies its loss by this factor before differentiating, so a fault makes the
  loss and, through the chain rule, the gradients NaN. The factor is part of every train step,
  faults or not (the step table is padded to a fixed size), so a run with faults computes its
  other steps with the same compiled program, bitwise like a run without: x * 1.0 is exact.
  """
  steps = active().get("nonfinite_at", ())
  if len(steps) > MAX_NONFINITE_STEPS:
    raise UserError(f"{ENV}: nonfinite_at takes at most {MAX_NONFINITE_STEPS} steps")
  table = jnp.asarray(steps + (-1,) * (MAX_NONFINITE_STEPS - len(steps)), jnp.int32)
  return jnp.where(jnp.isin(step + 1, table), jnp.nan, 1.0)


_install_lock = threading.Lock()
_patched = []


def install_write_faults() -> None:
  """Patches etils.epath's file writes to fail or stall for the checkpoints named in SEQMODELS_FAULTS.

  Installed once per process, when a Checkpointer starts with write faults set; the patched
  methods read SEQMODELS_FAULTS at each call, so they fall inert once it is unset.
  """
  faults = active()
  if not (faults.get("write_error_at") or faults.get("stall_write_at")):
    return
  from etils import epath
  path_class = type(epath.Path("/"))
  with _install_lock:
    if _patched:
      return
    for method in ("write_text", "write_bytes"):
      original = getattr(path_class, method)

      def faulty(self, *args, _original=original, **kwargs):
        text, now = str(self), active()
        if any(f"/{s}.orbax-checkpoint-tmp" in text for s in now.get("write_error_at", ())):
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), text)
        if any(f"/{s}.orbax-checkpoint-tmp" in text for s in now.get("stall_write_at", ())):
          threading.Event().wait()  # Forever: the process is killed while the checkpoint is half written.
        return _original(self, *args, **kwargs)

      setattr(path_class, method, faulty)
      _patched.append(method)
