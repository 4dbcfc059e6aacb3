"""The middle of Mamba's mixer, from in_proj's output to the gated scan output, as one custom_vjp.

    x       = silu(causal_depthwise_conv1d(xz[..., :d]) + conv_bias)    kernels/causal_conv1d.py
    dt, B, C = split(x @ x_proj);  dt = dt @ dt_proj
    y       = S6(x, softplus(dt + dt_bias), -exp(A_log), B, C) + D x,  y *= silu(z = xz[..., d:])

The unfused mixer (seqmodels/mamba.py) is XLA ops around the scan kernel: the split of xz, the
concatenate of the conv state, the shifted slices and silu, the split of x_proj's output, and in
the backward their transposes (pads and adds). Here the conv and silu are one kernel that reads x
out of xz, and the backward is written out. A layer's residuals are xz, x, x_proj's small output
and the scan's chunk states; dt (one small matmul) is recomputed. mamba_ssm's mamba_inner_fn
recomputes x too, to save memory; here x is kept, since under model.remat=block the backward's
recomputed forward has just made it (a conv pass a layer less; without remat, one activation
more a layer). Under model.remat=save_kernels the forward's y, x, x_proj's output and chunk
states are kept (kernels/_common.kernel_output), so the backward reruns neither kernel. The conv
backward kernel takes x's two cotangents (from the scan and from x_proj) and adds them, and
writes the gradient of xz whole, dz included. The scan's Mosaic GPU kernels read the gate z in
place in xz; the dt/B/C pieces are still slices of x_proj's (small) output.

Runs on one GPU (Mosaic GPU kernels) and on CPU (the conv in Pallas's Mosaic GPU interpreter, the
scan's portable Pallas kernels in interpret mode); there is no TPU version of the conv kernel.
"""

import functools
import math
import typing

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import _common, causal_conv1d, selective_scan_pallas


def supported(d_inner) -> bool:
  """Whether the kernels take Mamba's inner width: whole 128-channel blocks."""
  return d_inner % causal_conv1d.CHANNELS == 0


def mamba_inner(xz, conv_state, conv_kernel, conv_bias, x_proj, dt_proj, dt_bias, A_log, D, h0):
  """The gated scan output for in_proj's output xz, and the final SSM state.

  Args:
    xz: (batch, length, 2 d) in the compute dtype: x and the gate z.
    conv_state: (batch, width - 1, d), the conv inputs before the first step.
    conv_kernel, conv_bias: (width, d) and (d,) float32.
    x_proj, dt_proj: (d, rank + 2 n) and (rank, d) float32 matmul kernels, applied in xz's dtype.
    dt_bias, A_log, D: (d,), (d, n) and (d,) float32.
    h0: (batch, d, n) float32, the SSM state before the first step.

  Returns:
    y (batch, length, d) in xz's dtype, and the state after the last step (batch, d, n) float32.
  """
  batch, length, _ = xz.shape
  interpret = jax.default_backend() == "cpu"
  segment = causal_conv1d.segment_length(interpret)
  scan = selective_scan_pallas.scan_config(length, True, jnp.float32, interpret or None)
  config = _Config(rank=dt_proj.shape[0], segment=segment, scan=scan,
                   conv_interpret=plgpu.InterpretGPUParams() if interpret else None)
  padded = -length % math.lcm(segment, scan.chunk)
  if padded:
    xz = jnp.pad(xz, [(0, 0), (0, padded), (0, 0)])
  y, h_last = _inner(config, xz, conv_state.astype(xz.dtype), conv_kernel, conv_bias, x_proj,
                     dt_proj, dt_bias, A_log, D, h0)
  return y[:, :length], h_last


class _Config(typing.NamedTuple):
  rank: int  # dt_rank, the first columns of x_proj's output
  segment: int  # steps per conv kernel block
  scan: object  # selective_scan_pallas.scan_config
  conv_interpret: object


def _linear(x, kernel):
  """x @ kernel in x's dtype, as nnx.Linear computes it."""
  return jax.lax.dot_general(x, kernel.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())))


def _left_halo(config, xz, conv_state):
  """The conv inputs before each of the conv kernel's segments (conv_state's before the first)."""
  return causal_conv1d.left_halo(xz[..., :conv_state.shape[2]], conv_state, config.segment)


def _forward(config, save_chunks, xz, conv_state, conv_kernel, conv_bias, x_proj, dt_proj, dt_bias,
             A_log, D, h0):
  x = causal_conv1d.forward(xz, _left_halo(config, xz, conv_state), conv_kernel, conv_bias,
                            interpret=config.conv_interpret)
  xdbc = _linear(x, x_proj)
  dt, A, B, C, z = _ssm_inputs(config, xz, xdbc, dt_proj, A_log)
  outs = selective_scan_pallas.forward(config.scan, x, dt, A, B, C, D, dt_bias, z, h0, save_chunks)
  return outs, x, xdbc


def _ssm_inputs(config, xz, xdbc, dt_proj, A_log):
  """dt, A, B, C and the gate for the scan, from xz and x_proj's output xdbc. The gate is xz
  itself: the scan reads z, its last d channels, in place, where a slice would be a copy."""
  n = A_log.shape[1]
  dt = _linear(xdbc[..., :config.rank], dt_proj)
  bc = xdbc[..., config.rank:].reshape(*xdbc.shape[:2], 2, 1, n)
  return dt, -jnp.exp(A_log), bc[:, :, 0], bc[:, :, 1], xz


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _inner(config, xz, conv_state, conv_kernel, conv_bias, x_proj, dt_proj, dt_bias, A_log, D, h0):
  (y, h_last), _, _ = _forward(config, False, xz, conv_state, conv_kernel, conv_bias, x_proj, dt_proj,
                            dt_bias, A_log, D, h0)
  return y, h_last


def _inner_fwd(config, xz, conv_state, conv_kernel, conv_bias, x_proj, dt_proj, dt_bias, A_log, D,
               h0):
  (y, h_last, chunks), x, xdbc = _forward(config, True, xz, conv_state, conv_kernel, conv_bias,
                                          x_proj, dt_proj, dt_bias, A_log, D, h0)
  y, x, xdbc, chunks = _common.kernel_output(y, x, xdbc, chunks)
  residuals = (xz, conv_state, conv_kernel, conv_bias, x_proj, dt_proj, dt_bias, A_log, D, h0, x,
               xdbc, chunks)
  return (y, h_last), residuals


def _inner_bwd(config, residuals, cotangents):
  (xz, conv_state, conv_kernel, conv_bias, x_proj, dt_proj, dt_bias, A_log, D, h0, x, xdbc,
   chunks) = residuals
  dy, dh_last = cotangents
  width, d = conv_kernel.shape
  halo = _left_halo(config, xz, conv_state)
  dt, A, B, C, z = _ssm_inputs(config, xz, xdbc, dt_proj, A_log)
  dx, ddt, dA, dB, dC, dD, ddt_bias, dz, dh0 = selective_scan_pallas.backward(
      config.scan, (x, dt, A, B, C, D, dt_bias, z, h0, chunks), (dy.astype(xz.dtype), dh_last))

  _, dt_proj_vjp = jax.vjp(_linear, xdbc[..., :config.rank], dt_proj)
  d_dt_low, d_dt_proj = dt_proj_vjp(ddt)
  dxdbc = jnp.concatenate([d_dt_low, dB[:, :, 0].astype(xz.dtype), dC[:, :, 0].astype(xz.dtype)],
                          axis=-1)
  _, x_proj_vjp = jax.vjp(_linear, x, x_proj)
  dx_from_proj, d_x_proj = x_proj_vjp(dxdbc)

  # x's two cotangents go to the conv kernel as they are: it adds them.
  dx_parts = (dx, dx_from_proj)
  dxz, dparams, dhalo = causal_conv1d.backward(
      xz, halo, causal_conv1d.right_halo(xz[..., :d], width, config.segment), conv_kernel, conv_bias,
      dx_parts, [causal_conv1d.right_halo(part, width, config.segment) for part in dx_parts], dz,
      interpret=config.conv_interpret)
  dparams = dparams.sum(axis=(0, 1))
  return (dxz, dhalo[:, 0].astype(conv_state.dtype), dparams[:width], dparams[width], d_x_proj,
          d_dt_proj, ddt_bias, dA * A, dD, dh0)


_inner.defvjp(_inner_fwd, _inner_bwd)
