"""Mamba's selective scan (S6), the recurrence under every recurrent model in seqmodels.

For each batch element, channel c and state index i (B discretized as dt * B, as in Mamba):

  dt'_t = softplus(dt_t + dt_bias) if dt_softplus else dt_t + dt_bias
  h_t   = exp(dt'_t * A) * h_{t-1} + (dt'_t * x_t) * B_t,        h_{-1} = h0 (default zeros)
  y_t   = <C_t, h_t> + D * x_t,  then  y_t *= silu(z_t)  when z is given

Shapes are channels-last: x, dt, z are (batch, length, d); A is (d, n); B and C are
(batch, length, n) or (batch, length, groups, n), where channel c reads group c // (d // groups);
D and dt_bias are (d,); h0 is (batch, d, n).

The XLA implementations differ only in how they run the linear recurrence over time. Everything
around it (dt', grouped B/C, skip, gate, reversal) is one shared piece of code, so a new one only
has to get the recurrence right. "pallas" (kernels/selective_scan_pallas.py) is the exception: its
kernels apply dt_bias, softplus, D and the gate themselves, on inputs in their own dtype, because
upcasting them in XLA would move more bytes than the whole scan.
"""

import jax
import jax.numpy as jnp

from kernels._common import accumulation_dtype, check_impl, compose_affine
from kernels.selective_scan_pallas import CHUNK, selective_scan_pallas

IMPLS = ("auto", "reference", "associative", "pallas")


def selective_scan(x, dt, A, B, C, D=None, *, z=None, dt_bias=None, dt_softplus=False, h0=None,
                   reverse=False, return_state=False, impl="auto"):
  """Runs the selective scan along the length axis.

  Args:
    x: (batch, length, d) input.
    dt: (batch, length, d) step sizes, before dt_bias and softplus.
    A: (d, n) state matrix diagonal, normally negative.
    B: (batch, length, n) or (batch, length, groups, n) input projection.
    C: same shape as B, output projection.
    D: optional (d,) skip connection.
    z: optional (batch, length, d) gate; y is multiplied by silu(z).
    dt_bias: optional (d,) added to dt.
    dt_softplus: whether to pass dt + dt_bias through softplus.
    h0: optional (batch, d, n) initial state.
    reverse: run from the last time step to the first.
    return_state: also return the state after the last processed step.
    impl: one of IMPLS; "auto" picks the fastest on the current backend.

  Returns:
    y, shaped and typed like x; or (y, h_last) when return_state, with h_last (batch, d, n) in the
    accumulation dtype (float32, or float64 for float64 inputs).
  """
  _check_shapes(x, dt, A, B, C, D, z, dt_bias, h0)
  impl = _resolve_impl(impl, jnp.shape(x)[1])
  if impl == "pallas":
    # The kernels read the inputs in their own dtype and apply dt_bias, softplus, D and the gate
    # themselves: upcasting here would move more bytes than the whole scan.
    return selective_scan_pallas(x, dt, A, B, C, D, z, dt_bias, dt_softplus, h0, reverse,
                                 return_state)
  recurrence = _RECURRENCES[impl]
  out_dtype = jnp.result_type(x)
  acc = accumulation_dtype(x, dt, A, B, C, D, z, dt_bias, h0)
  x, dt, A, B, C = (jnp.asarray(a, acc) for a in (x, dt, A, B, C))
  batch, _, d = x.shape

  if B.ndim == 3:
    B, C = B[:, :, None], C[:, :, None]
  if dt_bias is not None:
    dt = dt + jnp.asarray(dt_bias, acc)
  if dt_softplus:
    dt = jax.nn.softplus(dt)
  h0 = jnp.zeros((batch, d, A.shape[1]), acc) if h0 is None else jnp.asarray(h0, acc)

  seq = (x, dt, B, C)
  if reverse:
    seq = tuple(jnp.flip(a, axis=1) for a in seq)
  y, h_last = recurrence(*seq, A, h0)
  if reverse:
    y = jnp.flip(y, axis=1)

  if D is not None:
    y = y + jnp.asarray(D, acc) * x
  if z is not None:
    y = y * jax.nn.silu(jnp.asarray(z, acc))
  y = y.astype(out_dtype)
  return (y, h_last) if return_state else y


def _resolve_impl(impl, length):
  """Turns impl into the name of a recurrence, choosing the fastest one for "auto"."""
  check_impl(impl, IMPLS)
  if impl != "auto":
    return impl
  if length < CHUNK:
    # Decoding steps: the kernels pad to a whole chunk, the reference runs one fused step.
    return "reference"
  # On CPU the sequential scan wins: jit forward+backward at batch 8, length 256, d 256, n 16 took
  # ~100 ms for "reference" against ~190 ms for "associative", whose extra work buys nothing
  # without parallel hardware. Accelerators run the Pallas kernels.
  return "reference" if jax.default_backend() == "cpu" else "pallas"


def _check_shapes(x, dt, A, B, C, D, z, dt_bias, h0):
  x_shape = jnp.shape(x)
  if len(x_shape) != 3 or x_shape[1] == 0:
    raise ValueError(f"x must have shape (batch, length, d) with length >= 1, got {x_shape}")
  batch, length, d = x_shape
  if jnp.ndim(A) != 2 or jnp.shape(A)[0] != d:
    raise ValueError(f"A must have shape (d, n) = ({d}, n), got {jnp.shape(A)}")
  n = jnp.shape(A)[1]

  b_shape = jnp.shape(B)
  grouped = len(b_shape) == 4 and b_shape[2] > 0 and d % b_shape[2] == 0
  if b_shape[:2] != (batch, length) or b_shape[-1:] != (n,) or not (len(b_shape) == 3 or grouped):
    raise ValueError(f"B must have shape (batch, length, n) = {(batch, length, n)} or "
                     f"(batch, length, groups, n) with groups dividing d={d}, got {b_shape}")
  if jnp.shape(C) != b_shape:
    raise ValueError(f"C must have the same shape as B, {b_shape}, got {jnp.shape(C)}")

  expected = {"dt": (dt, x_shape), "z": (z, x_shape), "D": (D, (d,)), "dt_bias": (dt_bias, (d,)),
              "h0": (h0, (batch, d, n))}
  for name, (arg, shape) in expected.items():
    if arg is not None and jnp.shape(arg) != shape:
      raise ValueError(f"{name} must have shape {shape}, got {jnp.shape(arg)}")


def _to_channels(bc, d):
  """Expands (..., groups, n) to (..., d, n): channel c reads group c // (d // groups)."""
  return jnp.repeat(bc, d // bc.shape[-2], axis=-2)


def _scan_reference(x, dt, B, C, A, h0):
  """One step at a time, holding a single (batch, d, n) state."""
  batch, length, d = x.shape
  groups, n = B.shape[2:]
  # Channels viewed as (groups, d // groups): B and C then broadcast over a group's channels
  # instead of being copied to every channel.
  grouped = (batch, groups, d // groups)
  A = A.reshape(groups, d // groups, n)

  def step(h, inputs):
    x_t, dt_t, B_t, C_t = inputs
    x_t, dt_t = x_t.reshape(grouped), dt_t.reshape(grouped)
    h = jnp.exp(dt_t[..., None] * A) * h + (dt_t * x_t)[..., None] * B_t[:, :, None, :]
    # A product and a sum over n, not an einsum: XLA fuses it with the update above into one pass
    # over the state, where a dot would be a second kernel reading the state again (and on GPU a
    # TF32 matmul).
    return h, jnp.sum(h * C_t[:, :, None, :], axis=-1).reshape(batch, d)

  h0 = h0.reshape(*grouped, n)
  if length == 1:
    # A decoding step: no loop around it, so XLA fuses it with the ops before and after.
    h_last, y = step(h0, tuple(a[:, 0] for a in (x, dt, B, C)))
    return y[:, None], h_last.reshape(batch, d, n)
  time_major = tuple(jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C))
  h_last, y = jax.lax.scan(step, h0, time_major)
  return jnp.moveaxis(y, 0, 1), h_last.reshape(batch, d, n)


def _scan_associative(x, dt, B, C, A, h0):
  """Parallel prefix over time: log(length) depth, at the cost of holding every state."""
  d = x.shape[-1]
  decay = jnp.exp(dt[..., None] * A)
  drive = (dt * x)[..., None] * _to_channels(B, d)
  # The scan starts from a zero state; h0 enters through the first step's affine map instead.
  drive = drive.at[:, 0].add(decay[:, 0] * h0)
  _, h = jax.lax.associative_scan(compose_affine, (decay, drive), axis=1)
  return jnp.sum(h * _to_channels(C, d), axis=-1), h[:, -1]


_RECURRENCES = {"reference": _scan_reference, "associative": _scan_associative}
