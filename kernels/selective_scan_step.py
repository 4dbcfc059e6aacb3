"""Mamba's decoding step after x_proj as one Pallas kernel: dt_proj, softplus, the state update, the
C readout, the D skip and the silu(z) gate.

For one token, with dt_low, B, C the pieces of x_proj's output and h the (batch, d, n) state:

    dt' = softplus(dt_proj(dt_low) + dt_bias),   A = -exp(A_log)
    h   = exp(dt' A) h + (dt' x) B,              y = (<C, h> + D x) silu(z)

XLA runs these as a matmul and several fusions, one kernel each per layer and token, and a decoding
step is many such small kernels, each far under the memory bandwidth (docs/generation.md: on an H100
this kernel took mamba-370m from 1.73 to 1.61 ms a token at batch 64). Here one program per (batch
row, block of channels) does all of it, reading the state once and writing it in place. It reads the
conv's new input, z and dt_low, B, C straight out of in_proj's and x_proj's outputs, so XLA copies
nothing out for it, and it also shifts the conv's state (the last d_conv - 1 inputs) in place, which
XLA would write in a kernel of its own: the conv's output and its new state differ in shape, so XLA
does not fuse them into one.

The same body runs through Pallas's Triton backend on GPU and in interpret mode on CPU, where the
tests check it against the float64 oracle. Triton loads only power-of-two sized blocks, so dt_proj's
rank (ceil(d_model / 16), 48 for mamba-130m) is read in power-of-two pieces.
"""

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MAX_CHANNELS = 128  # Channels per program: 64 x 2048 / 128 = 1024 programs for mamba-370m at batch 64.
TRITON_WARPS = 4


def _is_power_of_two(k):
  return k > 0 and k & (k - 1) == 0


def channels_per_program(d):
  return math.gcd(d, MAX_CHANNELS)


def supported(d, n):
  """Whether the kernel takes these sizes: power-of-two blocks of channels and states."""
  return _is_power_of_two(channels_per_program(d)) and _is_power_of_two(n)


def _pieces(k):
  """(offset, size) pieces of range(k), each a power of two: the binary digits of k."""
  pieces, offset = [], 0
  for bit in reversed(range(k.bit_length())):
    if k >> bit & 1:
      pieces.append((offset, 1 << bit))
      offset += 1 << bit
  return pieces


def decode_step(xz, conv_state, x, x_proj_out, dt_weight, dt_bias, A_log, D, h, *, interpret=None):
  """One selective-SSM decoding step of a Mamba block (see the module docstring).

  Args:
    xz: (batch, 2d) in_proj's output: the conv's new input, then z.
    conv_state: (batch, width - 1, d) the conv's previous inputs; its buffer is reused.
    x: (batch, d) the conv's output after silu.
    x_proj_out: (batch, rank + 2n) x_proj's output: dt_low, B, C, rounded to x's dtype here
      (a float32 x_proj_out is the sum of its parts, kernels/decode_matmul.py `conv_product`).
    dt_weight: (rank, d) dt_proj's kernel, used in x's dtype (as nnx.Linear does).
    dt_bias, D: (d,) float32.
    A_log: (d, n) float32.
    h: (batch, d, n) float32 state; its buffer is reused for the new state.
    interpret: None runs compiled on GPU and interpreted on CPU; otherwise passed to pallas_call.

  Returns:
    y (batch, d) in x's dtype, the new state (batch, d, n) float32 and the new conv state.
  """
  batch, d = x.shape
  n = A_log.shape[1]
  rank = dt_weight.shape[0]
  history = conv_state.shape[1]
  if (xz.shape != (batch, 2 * d) or x_proj_out.shape != (batch, rank + 2 * n) or h.shape != (batch, d, n)
      or conv_state.shape != (batch, history, d)):
    raise ValueError(f"decode_step shapes disagree: xz {xz.shape}, conv_state {conv_state.shape}, x {x.shape}, "
                     f"x_proj_out {x_proj_out.shape}, dt_weight {dt_weight.shape}, A_log {A_log.shape}, h {h.shape}")
  if not supported(d, n):
    raise ValueError(f"decode_step needs power-of-two channel blocks and n, got d={d}, n={n}")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  channels = channels_per_program(d)
  z_block = d // channels  # z starts this many channel blocks into xz.

  def kernel(conv_in_ref, xz_ref, x_ref, xp_ref, w_ref, bias_ref, A_log_ref, D_ref, h_ref, conv_ref, y_ref,
             h_out_ref, conv_out_ref):
    # Rows one at a time: Triton loads only power-of-two sizes, and history is d_conv - 1 = 3.
    rows = [conv_ref[0, k] for k in range(1, history)] + [conv_in_ref[0]]
    for k, row in enumerate(rows):
      conv_out_ref[0, k] = row.astype(conv_out_ref.dtype)
    f32 = jnp.float32

    def x_proj_piece(start, size):  # Rounded to x's dtype, as x_proj's output is.
      return xp_ref[0, pl.ds(start, size)].astype(x_ref.dtype).astype(f32)
    x_t = x_ref[0].astype(f32)
    z = xz_ref[0].astype(f32)
    # dt_proj as products and a sum over the rank; each product of two bf16 values is exact in
    # float32, and the sum is rounded to x's dtype as the XLA matmul's output is.
    dt = sum(jnp.sum(x_proj_piece(start, size)[:, None]
                     * w_ref[pl.ds(start, size), :].astype(x_ref.dtype).astype(f32), axis=0)
             for start, size in _pieces(rank))
    # Everything else is loaded here, at once: loaded where each is first used (the state after
    # the exps, D last), the kernel took 9.9 us a layer against 8.5 (mamba-370m, batch 64, H100),
    # each late load another wait on memory; loaded before dt_proj, 11.6 us, the state's registers
    # held through dt_proj lowering the occupancy. kernels/NOTES.md, "Session 12".
    h, A_log, D, bias = h_ref[0], A_log_ref[...], D_ref[0], bias_ref[0]
    B = x_proj_piece(rank, n)
    C = x_proj_piece(rank + n, n)
    dt = dt.astype(x_ref.dtype).astype(f32) + bias
    dt = jnp.maximum(dt, 0) + jnp.log1p(jnp.exp(-jnp.abs(dt)))  # softplus
    A = -jnp.exp(A_log)
    state = jnp.exp(dt[:, None] * A) * h + (dt * x_t)[:, None] * B[None, :]
    y = jnp.sum(state * C[None, :], axis=1) + D * x_t
    y = y * z * jax.nn.sigmoid(z)
    y_ref[0] = y.astype(y_ref.dtype)
    h_out_ref[0] = state

  row = lambda b, c: (b, c)  # noqa: E731
  state_spec = pl.BlockSpec((1, channels, n), lambda b, c: (b, c, 0))
  conv_spec = pl.BlockSpec((1, history, channels), lambda b, c: (b, 0, c))
  in_specs = [
      pl.BlockSpec((1, channels), row),  # the conv's new input out of xz
      pl.BlockSpec((1, channels), lambda b, c: (b, c + z_block)),  # z out of xz
      pl.BlockSpec((1, channels), row),  # x
      pl.BlockSpec((1, rank + 2 * n), lambda b, c: (b, 0)),  # dt_low, B, C
      pl.BlockSpec((rank, channels), lambda b, c: (0, c)),  # dt_proj
      pl.BlockSpec((1, channels), lambda b, c: (0, c)),  # dt_bias
      pl.BlockSpec((channels, n), lambda b, c: (c, 0)),  # A_log
      pl.BlockSpec((1, channels), lambda b, c: (0, c)),  # D
      state_spec,  # h
      conv_spec,
  ]
  out_specs = [pl.BlockSpec((1, channels), row), state_spec, conv_spec]
  out_shape = [jax.ShapeDtypeStruct((batch, d), x.dtype), jax.ShapeDtypeStruct((batch, d, n), jnp.float32),
               jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype)]
  params = None
  if jax.default_backend() == "gpu" and not interpret:
    from jax.experimental.pallas import triton as pltriton
    params = pltriton.CompilerParams(num_warps=TRITON_WARPS, num_stages=1)
  return pl.pallas_call(kernel, grid=(batch, d // channels), in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, compiler_params=params, input_output_aliases={8: 1, 9: 2},
                        interpret=interpret)(
      xz, xz, x, x_proj_out, dt_weight, dt_bias.reshape(1, d).astype(jnp.float32), A_log.astype(jnp.float32),
      D.reshape(1, d).astype(jnp.float32), h.astype(jnp.float32), conv_state)
