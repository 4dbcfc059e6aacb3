"""Pieces every kernel in this package needs, kept in one place so the kernels agree on them."""

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# The name under which the scan core's kernels tag their outputs and backward residuals, so that a
# remat policy saving it (model.remat "save_scan") keeps the kernels' forward out of the recompute.
SCAN_SAVED = "scan_core_saved"


def check_impl(impl, impls):
  """Raises the one error message every kernel gives for an unknown impl."""
  if impl not in impls:
    raise ValueError(f"impl must be one of {impls}, got {impl!r}")


def accumulation_dtype(*arrays):
  """The dtype a recurrence accumulates in: at least float32, float64 for float64 inputs.

  Low-precision state would drop the small per-step increments over long sequences. Arrays given
  as None (absent optional arguments) are skipped.
  """
  return jnp.promote_types(jnp.float32, jnp.result_type(*(a for a in arrays if a is not None)))


def saved_by_remat(forward_rule, nondiff_argnums):
  """A scan-core custom_vjp's forward rule whose outputs and residuals remat can keep.

  Every array it returns is tagged SCAN_SAVED, so jax.checkpoint under
  save_only_these_names(SCAN_SAVED) keeps them. The rule runs as one jit call because JAX never
  drops an unused pallas_call from a recompute (its kernel might write memory) but drops an unused
  jit call whole: only so does the kept forward leave the backward pass.
  """
  jitted = jax.jit(forward_rule, static_argnums=nondiff_argnums)

  @functools.wraps(forward_rule)
  def tagged(*args):
    return jax.tree.map(lambda a: checkpoint_name(a, SCAN_SAVED), jitted(*args))
  return tagged


def sigmoid(v):
  """1 / (1 + e^-v) from exp and a division, for kernels whose lowering has no logistic
  (the Mosaic GPU ones)."""
  return 1.0 / (1.0 + jnp.exp(-v))


def compose_affine(earlier, later):
  """Composes the affine maps h -> a * h + b of two adjacent spans, the earlier applied first."""
  a1, b1 = earlier
  a2, b2 = later
  return a1 * a2, a2 * b1 + b2
