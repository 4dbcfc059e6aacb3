"""Pieces every kernel in this package needs, kept in one place so the kernels agree on them."""

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp


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


def sigmoid(v):
  """1 / (1 + e^-v) from exp and a division, for kernels whose lowering has no logistic
  (the Mosaic GPU ones)."""
  return 1.0 / (1.0 + jnp.exp(-v))


def compose_affine(earlier, later):
  """Composes the affine maps h -> a * h + b of two adjacent spans, the earlier applied first."""
  a1, b1 = earlier
  a2, b2 = later
  return a1 * a2, a2 * b1 + b2


def on_one_device() -> bool:
  """Whether the trace runs on one device, so a kernel sees whole arrays rather than a device's
  block of them (the fused kernels that sharding.py does not map over a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or mesh.size == 1


# The checkpoint name of the kernel outputs a backward pass reads: the remat policy "save_kernels"
# (seqmodels/layers.py) keeps them rather than rerunning their kernels.
KERNEL_OUTPUT = "kernel_output"


def kernel_output(*values):
  """values, each under the checkpoint name KERNEL_OUTPUT."""
  return tuple(checkpoint_name(v, KERNEL_OUTPUT) for v in values)
