"""Mamba's causal depthwise conv1d with its bias and silu, as Mosaic GPU kernels (Hopper).

  y_t = silu(bias + sum_k kernel_k * x_{t - (width - 1) + k}),   x_{-width+1 .. -1} = the conv state

Channels-last (batch, length, channels). The forward reads x straight out of in_proj's output
(batch, length, 2 channels) (x is its first half), so XLA never splits it, pads it or concatenates
the conv state in front of it. The backward recomputes the pre-activation instead of reading a
saved one, and writes dx and the z gate's gradient into one (batch, length, 2 channels) array: the
gradient of in_proj's output, with no concatenate after it.

One CUDA block per (batch element, 128 channels, segment of `segment` steps): one warpgroup, one
channel per thread (Pallas's Lane semantics), the segment's rows brought into shared memory by one
TMA copy each. Segments give the GPU batch x channels / 128 x length / segment blocks (3,072 for
Mamba-130m at 8 x 2048), several per SM, so one block's copies overlap another's arithmetic. A
segment needs the width - 1 inputs before it (the forward) and after it (the backward): XLA gathers
those few rows into small halo arrays (`left_halo`, `right_halo`), 3 rows of every 64.

There is no Mosaic TPU version: the kernels' body is written per thread (Lane semantics), which
Mosaic TPU does not lower. On CPU they run in Pallas's Mosaic GPU interpreter.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels._common import sigmoid

CHANNELS = 128  # one warpgroup, one channel per thread
SEGMENT = 64  # steps per block compiled
INTERPRET_SEGMENT = 8  # the interpreter's cost grows with the unrolled steps


def segment_length(interpret):
  return INTERPRET_SEGMENT if interpret else SEGMENT


def left_halo(x, state, segment):
  """The width - 1 inputs before each segment: (batch, segments, width - 1, channels).

  x: (batch, length, channels), length a multiple of segment; state: (batch, width - 1, channels).
  """
  batch, length, channels = x.shape
  rows = x.reshape(batch, length // segment, segment, channels)[:, :-1, segment - state.shape[1]:]
  return jnp.concatenate([state[:, None].astype(x.dtype), rows], axis=1)


def right_halo(a, width, segment):
  """The width - 1 rows after each segment, zeros after the last: (batch, segments, width - 1, ...)."""
  batch, length = a.shape[:2]
  rows = a.reshape(batch, length // segment, segment, *a.shape[2:])[:, 1:, :width - 1]
  return jnp.pad(rows, [(0, 0), (0, 1)] + [(0, 0)] * (rows.ndim - 2))


def _weighted_sum(weights, values):
  """sum(w * v), starting from the first product rather than a Python 0."""
  return functools.reduce(jnp.add, [w * v for w, v in zip(weights, values)])


def _params(kernel, bias):
  """The per-channel parameters as one float32 (width + 1, channels) array: one copy brings them."""
  return jnp.concatenate([kernel, bias[None]]).astype(jnp.float32)


def _call(body, *, out_type, scratch, grid, interpret, args):
  params = plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane)
  call = plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=grid,
                      grid_names=("b", "c", "s"), interpret=interpret, compiler_params=params)
  return call(*args)


def forward(xz, halo, kernel, bias, *, interpret=None):
  """silu(conv(x) + bias) for x = xz[..., :channels], continuing from `halo` (left_halo of x).

  xz: (batch, length, 2 channels), length a multiple of the segment; kernel (width, channels) and
  bias (channels,) float32. Returns (batch, length, channels) in xz's dtype.
  """
  batch, length, _ = xz.shape
  width, channels = kernel.shape
  segments = halo.shape[1]
  segment = length // segments

  def body(xz_g, halo_g, params_g, y_g, x_s, halo_s, params_s, bar):
    b, c, s = (jax.lax.axis_index(name) for name in ("b", "c", "s"))
    cols = pl.ds(c * CHANNELS, CHANNELS)
    rows = pl.ds(s * segment, segment)
    plgpu.copy_gmem_to_smem(params_g.at[:, cols], params_s, bar)
    plgpu.copy_gmem_to_smem(halo_g.at[b, s, :, cols], halo_s, bar)
    plgpu.copy_gmem_to_smem(xz_g.at[b, rows, cols], x_s, bar)
    plgpu.barrier_wait(bar)
    weights = [params_s[k] for k in range(width)]
    bias_row = params_s[width]
    window = [halo_s[j].astype(jnp.float32) for j in range(width - 1)]
    for t in range(segment):
      window = window[-(width - 1):] + [x_s[t].astype(jnp.float32)]
      pre = bias_row + _weighted_sum(weights, window)
      x_s[t] = (pre * sigmoid(pre)).astype(x_s.dtype)  # The row is in registers: reuse its slot.
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(x_s, y_g.at[b, rows, cols])
    plgpu.wait_smem_to_gmem(0)

  scratch = [plgpu.SMEM((segment, CHANNELS), xz.dtype), plgpu.SMEM((width - 1, CHANNELS), xz.dtype),
             plgpu.SMEM((width + 1, CHANNELS), jnp.float32), plgpu.Barrier(num_arrivals=3)]
  return _call(body, out_type=jax.ShapeDtypeStruct((batch, length, channels), xz.dtype),
               scratch=scratch, grid=(batch, channels // CHANNELS, segments), interpret=interpret,
               args=(xz, halo, _params(kernel, bias)))


def backward(xz, halo, x_after, kernel, bias, dy_parts, dy_after_parts, dz, *, interpret=None):
  """The gradients of `forward`, given the cotangent of its output as a sum of parts (added in
  float32 here, where XLA would spend a pass over them: Mamba's dx comes from the scan and from
  x_proj) and dz (of z, xz's second half, passed through).

  x_after is right_halo of x, and dy_after_parts those of the parts. Returns the gradient of xz
  (batch, length, 2 channels) in xz's dtype; per-block float32 partial sums of dkernel and dbias
  (batch, segments, width + 1, channels); and the gradient of each segment's left halo from that
  segment's outputs (batch, segments, width - 1, channels) float32, whose first segment's is the
  conv state's.
  """
  batch, length, _ = xz.shape
  width, channels = kernel.shape
  segments = halo.shape[1]
  segment = length // segments
  blocks = channels // CHANNELS
  parts = len(dy_parts)
  f32 = jnp.float32

  def body(*refs):
    refs = iter(refs)
    take = lambda count: [next(refs) for _ in range(count)]
    xz_g, halo_g, x_after_g, params_g = take(4)
    dy_g, dy_after_g = take(parts), take(parts)
    dz_g, dxz_g, dparams_g, dhalo_g, x_s = take(5)
    # The parts' scratch buffers arrive as two lists (scratch keeps its nesting).
    dy_s, dy_after_s, halo_s, x_after_s, params_s, dparams_s, dhalo_s, bar, dz_bar = refs
    b, c, s = (jax.lax.axis_index(name) for name in ("b", "c", "s"))
    rows = pl.ds(s * segment, segment)

    @pl.when(c >= blocks)
    def _():  # Blocks of the second half copy dz into its place.
      plgpu.copy_gmem_to_smem(dz_g.at[b, rows, pl.ds((c - blocks) * CHANNELS, CHANNELS)],
                              dy_s[0], dz_bar)
      plgpu.barrier_wait(dz_bar)
      plgpu.copy_smem_to_gmem(dy_s[0], dxz_g.at[b, rows, pl.ds(c * CHANNELS, CHANNELS)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(c < blocks)
    def _():
      cols = pl.ds(c * CHANNELS, CHANNELS)
      plgpu.copy_gmem_to_smem(params_g.at[:, cols], params_s, bar)
      for src, dst in ((halo_g, halo_s), (x_after_g, x_after_s), *zip(dy_after_g, dy_after_s)):
        plgpu.copy_gmem_to_smem(src.at[b, s, :, cols], dst, bar)
      for src, dst in ((xz_g, x_s), *zip(dy_g, dy_s)):
        plgpu.copy_gmem_to_smem(src.at[b, rows, cols], dst, bar)
      plgpu.barrier_wait(bar)
      weights = [params_s[k] for k in range(width)]
      bias_row = params_s[width]
      # Inputs from step -(width - 1) to segment + width - 2, and the cotangents of the outputs from
      # step 0 on, read as they are needed.
      x_at = lambda t: (halo_s[t + width - 1] if t < 0 else x_s[t] if t < segment
                        else x_after_s[t - segment]).astype(f32)
      dy_at = lambda t: functools.reduce(jnp.add, [
          (rows_s[t] if t < segment else after_s[t - segment]).astype(f32)
          for rows_s, after_s in zip(dy_s, dy_after_s)])
      window = [x_at(t) for t in range(-(width - 1), 0)]
      dpre = []  # the pre-activation's gradient at each step
      dweights, dbias = [None] * width, None
      for t in range(segment + width - 1):
        window = window[-(width - 1):] + [x_at(t)]
        pre = bias_row + _weighted_sum(weights, window)
        sig = sigmoid(pre)
        dpre.append(dy_at(t) * sig * (1.0 + pre * (1.0 - sig)))
        if t < segment:  # Steps after the segment are the next segment's outputs.
          dweights = [dpre[t] * v if dw is None else dw + dpre[t] * v
                      for dw, v in zip(dweights, window)]
          dbias = dpre[t] if dbias is None else dbias + dpre[t]
        # Input step r feeds the outputs r .. r + width - 1: with dpre[t], r = t - (width - 1) has
        # all of them.
        r = t - (width - 1)
        terms = [j for j in range(width) if r + j >= 0]
        dx = _weighted_sum([weights[width - 1 - j] for j in terms], [dpre[r + j] for j in terms])
        if r < 0:
          dhalo_s[r + width - 1] = dx
        else:
          dy_s[0][r] = dx.astype(xz.dtype)  # Row r of dy was read at step r: reuse its slot.
      for k in range(width):
        dparams_s[k] = dweights[k]
      dparams_s[width] = dbias
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dy_s[0], dxz_g.at[b, rows, cols])
      plgpu.copy_smem_to_gmem(dparams_s, dparams_g.at[b, s, :, cols])
      plgpu.copy_smem_to_gmem(dhalo_s, dhalo_g.at[b, s, :, cols])
      plgpu.wait_smem_to_gmem(0)

  dtypes = {a.dtype for a in (xz, dz, *dy_parts, *dy_after_parts)}
  if len(dtypes) > 1 or len(dy_after_parts) != parts:
    raise ValueError(f"xz, dz and the {parts} dy parts and their halos must share a dtype, got "
                     f"{sorted(map(str, dtypes))} and {len(dy_after_parts)} halos")
  rows_type = lambda count, dtype=xz.dtype: plgpu.SMEM((count, CHANNELS), dtype)
  scratch = [rows_type(segment), [rows_type(segment)] * parts, [rows_type(width - 1)] * parts,
             rows_type(width - 1), rows_type(width - 1), rows_type(width + 1, f32),
             rows_type(width + 1, f32), rows_type(width - 1, f32),
             plgpu.Barrier(num_arrivals=4 + 2 * parts), plgpu.Barrier(num_arrivals=1)]
  out_type = [jax.ShapeDtypeStruct(xz.shape, xz.dtype),
              jax.ShapeDtypeStruct((batch, segments, width + 1, channels), f32),
              jax.ShapeDtypeStruct((batch, segments, width - 1, channels), f32)]
  return _call(body, out_type=out_type, scratch=scratch, grid=(batch, 2 * blocks, segments),
               interpret=interpret,
               args=(xz, halo, x_after, _params(kernel, bias), *dy_parts, *dy_after_parts, dz))
