"""The selective scan as Pallas kernels: one forward and one backward body for every backend.

Each kernel program owns one batch element and a block of channels, keeps their (channels, n)
state on chip, and walks the sequence in chunks of CHUNK steps. The forward writes y and, when a
backward will follow, the state at each chunk boundary: (batch, length / CHUNK, d, n), a CHUNK-th
of the full state that is never written. The backward walks the chunks in reverse; inside a chunk
it recomputes the state every SUBCHUNK steps from the saved boundary state, then the SUBCHUNK
states after each of those, which it holds in registers while it runs the adjoint recurrence.

Everything around the recurrence (dt_bias, softplus, the D skip, the silu(z) gate) happens inside
the kernels, on inputs read in their own dtype (bf16 in training), so the HBM traffic is the
inputs read once and the outputs written once; only odd lengths (padded to a whole chunk) and
reverse=True (flipped) copy the inputs first.

Backends: TPU lowers these bodies through Mosaic TPU, and the CPU runs them in interpret mode, which
is how CI checks them against the float64 oracle. On GPU the forward and backward are the Mosaic GPU
kernels of kernels/selective_scan_gpu.py where the sizes allow (the same custom_vjp, the same
residuals), and these bodies through Pallas's Triton backend elsewhere.
"""

import functools
import math
import typing

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import selective_scan_gpu
from kernels._common import accumulation_dtype, kernel_output

CHUNK = 16  # Steps between saved states: the saved states are 1/16 of the full state's bytes.
SUBCHUNK = 4  # States the backward keeps in registers at once.
# Interpret mode only checks logic, and its cost grows with the unrolled code: small chunks there.
INTERPRET_CHUNK, INTERPRET_SUBCHUNK = 8, 4
# The GPU kernels: "mosaic" (kernels/selective_scan_gpu.py) where they support the sizes, or "triton"
# (these bodies).
GPU_KERNELS = "mosaic"
MAX_CHANNELS = 32  # Channels per program: enough programs to fill an H100 at batch 8, d 1536.
TRITON_WARPS = 4  # Warps per program on GPU; 1 keeps every reduction in a warp but ran slower (NOTES).


def selective_scan_pallas(x, dt, A, B, C, D, z, dt_bias, dt_softplus, h0, reverse, return_state,
                          interpret=None):
  """selective_scan's contract (see kernels/selective_scan.py), computed by the Pallas kernels.

  interpret: None runs compiled on GPU or TPU and interpreted on CPU; otherwise it is passed to
  pallas_call's `interpret` (True, or pltpu.InterpretParams() for TPU interpret mode), or with
  plgpu.InterpretGPUParams() the Mosaic GPU kernels run in Pallas's GPU interpreter.
  """
  acc = accumulation_dtype(x, dt, A, B, C, D, z, dt_bias, h0)
  config = scan_config(x.shape[1], dt_softplus, acc, interpret)
  batch, length, d = x.shape
  n = A.shape[1]
  if B.ndim == 3:
    B, C = B[:, :, None], C[:, :, None]
  D = jnp.zeros((d,), acc) if D is None else D
  dt_bias = jnp.zeros((d,), acc) if dt_bias is None else dt_bias
  h0 = jnp.zeros((batch, d, n), acc) if h0 is None else h0

  seq = (x, dt, B, C, z)
  if reverse:
    seq = tuple(None if a is None else jnp.flip(a, axis=1) for a in seq)
  padded = -length % config.chunk
  if padded:
    seq = tuple(None if a is None else jnp.pad(a, [(0, 0), (0, padded)] + [(0, 0)] * (a.ndim - 2))
                for a in seq)
  x, dt, B, C, z = seq
  y, h_last = _scan(config, x, dt, A, B, C, D, dt_bias, z, h0)
  y = y[:, :length]
  if reverse:
    y = jnp.flip(y, axis=1)
  return (y, h_last) if return_state else y


def scan_config(length, dt_softplus, acc, interpret=None):
  """The static settings of a scan of `length` steps accumulating in `acc`, for `forward` and
  `backward`; their inputs are padded to a multiple of its `chunk` steps."""
  if interpret is None and jax.default_backend() == "cpu":
    interpret = True
  chunk, subchunk = (INTERPRET_CHUNK, INTERPRET_SUBCHUNK) if interpret else (CHUNK, SUBCHUNK)
  return _Config(length=length, softplus=dt_softplus, acc=jnp.dtype(acc), interpret=interpret,
                 chunk=chunk, subchunk=subchunk)


class _Config(typing.NamedTuple):
  """The static settings of one scan, hashable so custom_vjp can take it as a static argument."""
  length: int  # the true length; steps past it (padding) leave the state alone
  softplus: bool
  acc: jnp.dtype
  interpret: object
  chunk: int
  subchunk: int


def _channels_per_program(d, groups, interpret):
  """The largest power of two up to MAX_CHANNELS that tiles a group's channels.

  A TPU block's last dimension must be a multiple of its 128 lanes or the whole axis.
  """
  per_group = d // groups
  if jax.default_backend() == "tpu" and not interpret:
    if per_group % 128 and groups > 1:
      raise ValueError(f"impl='pallas' on TPU needs d // groups = {per_group} to be a multiple of "
                       "128, or groups = 1; use impl='associative' for this shape")
    return 128 if per_group % 128 == 0 else d
  return math.gcd(per_group, MAX_CHANNELS)


def _call(kernel, config, grid, in_specs, out_specs, out_shape, *args):
  if jax.default_backend() == "gpu" and not config.interpret:
    from jax.experimental.pallas import triton as pltriton
    params = pltriton.CompilerParams(num_warps=TRITON_WARPS, num_stages=1)
  elif jax.default_backend() == "tpu" and not config.interpret:
    from jax.experimental.pallas import tpu as pltpu
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
  else:
    params = None
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, compiler_params=params,
                        interpret=config.interpret or False)(*args)


class _Specs:
  """BlockSpecs for a (batch, channel block) grid: each program sees its own batch row and channels."""

  def __init__(self, length, channels, n, channels_per_group):
    self.length, self.channels, self.n = length, channels, n
    self.blocks_per_group = channels_per_group // channels

  def seq(self):  # (batch, length, d)
    return pl.BlockSpec((1, self.length, self.channels), lambda b, c: (b, 0, c))

  def bc(self):  # (batch, length, groups, n): the group holding this channel block
    return pl.BlockSpec((1, self.length, 1, self.n), lambda b, c: (b, 0, c // self.blocks_per_group, 0))

  def state(self):  # (batch, d, n)
    return pl.BlockSpec((1, self.channels, self.n), lambda b, c: (b, c, 0))

  def chunks(self, num_chunks):  # (batch, chunks, d, n)
    return pl.BlockSpec((1, num_chunks, self.channels, self.n), lambda b, c: (b, 0, c, 0))

  def param(self):  # (1, d)
    return pl.BlockSpec((1, self.channels), lambda b, c: (0, c))

  def matrix(self):  # (d, n)
    return pl.BlockSpec((self.channels, self.n), lambda b, c: (c, 0))

  def per_batch(self):  # (batch, d)
    return pl.BlockSpec((1, self.channels), lambda b, c: (b, c))

  def per_block(self):  # (batch, channel blocks, length, n)
    return pl.BlockSpec((1, 1, self.length, self.n), lambda b, c: (b, c, 0, 0))


def _softplus(v):
  return jnp.maximum(v, 0) + jnp.log1p(jnp.exp(-jnp.abs(v)))


def _step_inputs(config, refs, t):
  """Reads step t: x, dt' (dt after bias and softplus, zero past the true length), B, C."""
  x = refs["x"][0, t].astype(config.acc)
  dt_raw = refs["dt"][0, t].astype(config.acc) + refs["dt_bias"][0].astype(config.acc)
  dt = _softplus(dt_raw) if config.softplus else dt_raw
  # A zero step is the identity: padding past the true length leaves the state alone.
  dt = jnp.where(t < config.length, dt, 0)
  B = refs["B"][0, t, 0].astype(config.acc)
  C = refs["C"][0, t, 0].astype(config.acc)
  return x, dt_raw, dt, B, C


def _advance(A, h, x, dt, B):
  """One step of the recurrence; returns the new state and this step's decay exp(dt' A)."""
  decay = jnp.exp(dt[:, None] * A)
  return decay * h + (dt * x)[:, None] * B[None, :], decay


def _forward_kernel(config, has_z, save_chunks, *refs):
  names = ["x", "dt", "A", "B", "C", "D", "dt_bias"] + ["z"] * has_z + ["h0", "y", "h_last"]
  refs = dict(zip(names + ["chunks"] * save_chunks, refs))
  A = refs["A"][...].astype(config.acc)
  D = refs["D"][0].astype(config.acc)
  num_chunks = refs["x"].shape[1] // config.chunk

  def step(t, h):
    x, _, dt, B, C = _step_inputs(config, refs, t)
    h, _ = _advance(A, h, x, dt, B)
    y = jnp.sum(h * C[None, :], axis=1) + D * x
    if has_z:
      z = refs["z"][0, t].astype(config.acc)
      y = y * z * jax.nn.sigmoid(z)
    refs["y"][0, t] = y.astype(refs["y"].dtype)
    return h

  def chunk(k, h):
    if save_chunks:
      refs["chunks"][0, k] = h
    return jax.lax.fori_loop(k * config.chunk, (k + 1) * config.chunk, step, h)

  h = jax.lax.fori_loop(0, num_chunks, chunk, refs["h0"][0].astype(config.acc))
  refs["h_last"][0] = h.astype(refs["h_last"].dtype)


def _backward_kernel(config, has_z, *refs):
  names = (["x", "dt", "A", "B", "C", "D", "dt_bias"] + ["z"] * has_z
           + ["chunks", "dy", "dh_last", "dx", "ddt"] + ["dz"] * has_z
           + ["dB", "dC", "dA", "dD", "ddt_bias", "dh0"])
  refs = dict(zip(names, refs))
  acc = config.acc
  A = refs["A"][...].astype(acc)
  D = refs["D"][0].astype(acc)
  num_chunks = refs["x"].shape[1] // config.chunk
  subchunks, subchunk = config.chunk // config.subchunk, config.subchunk
  channels = A.shape[0]

  def forward_states(t0, h, count):
    """The states after steps t0 .. t0 + count - 1, starting from h before step t0."""
    states = []
    for j in range(count):
      x, _, dt, B, _ = _step_inputs(config, refs, t0 + j)
      h, _ = _advance(A, h, x, dt, B)
      states.append(h)
    return states

  def adjoint_step(t, h_prev, h, carry):
    """Back-propagates through step t, given the states before and after it."""
    dh, dA_sum, dD_sum, dbias_sum = carry
    x, dt_raw, dt, B, C = _step_inputs(config, refs, t)
    decay = jnp.exp(dt[:, None] * A)
    dy = refs["dy"][0, t].astype(acc)
    if has_z:
      z = refs["z"][0, t].astype(acc)
      sig = jax.nn.sigmoid(z)
      y_pre = jnp.sum(h * C[None, :], axis=1) + D * x
      refs["dz"][0, t] = (dy * y_pre * sig * (1 + z * (1 - sig))).astype(refs["dz"].dtype)
      dy = dy * z * sig
    dh = dh + dy[:, None] * C[None, :]
    refs["dC"][0, 0, t] = jnp.sum(dy[:, None] * h, axis=0)
    refs["dB"][0, 0, t] = jnp.sum(dh * (dt * x)[:, None], axis=0)
    d_drive = jnp.sum(dh * B[None, :], axis=1)
    refs["dx"][0, t] = (d_drive * dt + dy * D).astype(refs["dx"].dtype)
    through_decay = dh * h_prev * decay
    ddt = d_drive * x + jnp.sum(through_decay * A, axis=1)
    if config.softplus:
      ddt = ddt * jax.nn.sigmoid(dt_raw)
    ddt = jnp.where(t < config.length, ddt, 0)
    refs["ddt"][0, t] = ddt.astype(refs["ddt"].dtype)
    return (dh * decay, dA_sum + through_decay * dt[:, None], dD_sum + dy * x, dbias_sum + ddt)

  def chunk(i, carry):
    k = num_chunks - 1 - i
    start = k * config.chunk
    # States at every subchunk boundary of this chunk, then each subchunk's states in turn.
    h = refs["chunks"][0, k].astype(acc)
    boundaries = []
    for s in range(subchunks):
      boundaries.append(h)
      if s + 1 < subchunks:
        h = forward_states(start + s * subchunk, h, subchunk)[-1]
    for s in reversed(range(subchunks)):
      t0 = start + s * subchunk
      states = [boundaries[s]] + forward_states(t0, boundaries[s], subchunk)
      for j in reversed(range(subchunk)):
        carry = adjoint_step(t0 + j, states[j], states[j + 1], carry)
    return carry

  zeros = jnp.zeros((channels,), acc)
  init = (refs["dh_last"][0].astype(acc), jnp.zeros_like(A), zeros, zeros)
  dh, dA_sum, dD_sum, dbias_sum = jax.lax.fori_loop(0, num_chunks, chunk, init)
  refs["dh0"][0] = dh
  refs["dA"][0] = dA_sum
  refs["dD"][0] = dD_sum
  refs["ddt_bias"][0] = dbias_sum


def _layout(config, x, B, A):
  batch, padded_length, d = x.shape
  groups, n = B.shape[2:]
  channels = _channels_per_program(d, groups, config.interpret)
  return (batch, d // channels), _Specs(padded_length, channels, n, d // groups), channels


def _mosaic_gpu(config, x, B):
  """Whether the Mosaic GPU kernels run this scan: compiled on a GPU, or in Pallas's GPU
  interpreter when asked for. Their saved states are (batch, chunks, n, d), the portable
  kernels' (batch, chunks, d, n), so forward and backward always come from the same family."""
  groups, n = B.shape[2:]
  compiled = jax.default_backend() == "gpu" and not config.interpret and GPU_KERNELS == "mosaic"
  return ((compiled or isinstance(config.interpret, plgpu.InterpretGPUParams))
          and config.acc == jnp.float32
          and selective_scan_gpu.supported(x.shape[2], groups, n, config.chunk))


def forward(config, x, dt, A, B, C, D, dt_bias, z, h0, save_chunks):
  """y and the final state; with save_chunks also the state before each chunk, which `backward`
  reads. Sequence inputs are padded to whole chunks, B and C are (batch, length, groups, n), and D,
  dt_bias and h0 are arrays. The gate z (or None) is the last d channels of its array, which may
  be wider: the Mosaic GPU kernels read it in place."""
  if _mosaic_gpu(config, x, B):
    return selective_scan_gpu.forward(x, dt, A, B, C, D, dt_bias, z, h0, length=config.length,
                                      softplus=config.softplus, chunk=config.chunk,
                                      save_chunks=save_chunks, interpret=config.interpret or None)
  grid, specs, _ = _layout(config, x, B, A)
  batch, padded_length, d = x.shape
  n = A.shape[1]
  has_z = z is not None
  inputs = [x, dt, A, B, C, D[None], dt_bias[None]] + [_gate_channels(z, d)] * has_z + [h0]
  in_specs = ([specs.seq(), specs.seq(), specs.matrix(), specs.bc(), specs.bc(), specs.param(),
               specs.param()] + [specs.seq()] * has_z + [specs.state()])
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((batch, d, n), config.acc)]
  out_specs = [specs.seq(), specs.state()]
  if save_chunks:
    num_chunks = padded_length // config.chunk
    out_shape.append(jax.ShapeDtypeStruct((batch, num_chunks, d, n), config.acc))
    out_specs.append(specs.chunks(num_chunks))
  kernel = functools.partial(_forward_kernel, config, has_z, save_chunks)
  return _call(kernel, config, grid, in_specs, out_specs, out_shape, *inputs)


def _gate_channels(z, d):
  """The gate: the last d channels of z, or None (the portable kernels' blocks index z as x)."""
  return z if z is None or z.shape[-1] == d else z[..., z.shape[-1] - d:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(config, x, dt, A, B, C, D, dt_bias, z, h0):
  y, h_last = forward(config, x, dt, A, B, C, D, dt_bias, z, h0, save_chunks=False)
  return y, h_last


def _scan_fwd(config, x, dt, A, B, C, D, dt_bias, z, h0):
  y, h_last, chunks = forward(config, x, dt, A, B, C, D, dt_bias, z, h0, save_chunks=True)
  y, chunks = kernel_output(y, chunks)
  return (y, h_last), (x, dt, A, B, C, D, dt_bias, z, h0, chunks)


def backward(config, residuals, cotangents):
  """The gradients of every input of `forward`, given its inputs and saved chunk states as
  residuals (x, dt, A, B, C, D, dt_bias, z, h0, chunks) and the cotangents (dy, dh_last); dz is
  the gate's, (batch, length, d), however wide z is."""
  x, dt, A, B, C, D, dt_bias, z, h0, chunks = residuals
  dy, dh_last = cotangents
  batch, padded_length, d = x.shape
  groups, n = B.shape[2:]
  if _mosaic_gpu(config, x, B):
    grads = selective_scan_gpu.backward(
        x, dt, A, B, C, D, dt_bias, z, chunks, dy.astype(x.dtype), dh_last, length=config.length,
        softplus=config.softplus, chunk=config.chunk, interpret=config.interpret or None)
  else:
    grads = _portable_backward(config, x, dt, A, B, C, D, dt_bias, z, chunks, dy, dh_last)
  dx, ddt, dz, dB, dC, dA, dD, ddt_bias, dh0 = grads
  blocks = dB.shape[1]

  def per_group(partial):  # (batch, partials, length, n) -> (batch, length, groups, n)
    summed = partial.reshape(batch, groups, blocks // groups, padded_length, n).sum(axis=2)
    return jnp.moveaxis(summed, 1, 2)

  return (dx, ddt, dA.sum(axis=0).astype(A.dtype), per_group(dB).astype(B.dtype),
          per_group(dC).astype(C.dtype), dD.sum(axis=0).astype(D.dtype),
          ddt_bias.sum(axis=0).astype(dt_bias.dtype), dz, dh0.astype(h0.dtype))


def _portable_backward(config, x, dt, A, B, C, D, dt_bias, z, chunks, dy, dh_last):
  """selective_scan_gpu.backward's contract, computed by _backward_kernel."""
  grid, specs, channels = _layout(config, x, B, A)
  batch, padded_length, d = x.shape
  n = B.shape[3]
  has_z = z is not None
  z = _gate_channels(z, d)
  acc = config.acc
  inputs = ([x, dt, A, B, C, D[None], dt_bias[None]] + [z] * has_z
            + [chunks, dy.astype(x.dtype), dh_last.astype(acc)])
  in_specs = ([specs.seq(), specs.seq(), specs.matrix(), specs.bc(), specs.bc(), specs.param(),
               specs.param()] + [specs.seq()] * has_z
              + [specs.chunks(padded_length // config.chunk), specs.seq(), specs.state()])
  blocks = d // channels
  partial_bc = jax.ShapeDtypeStruct((batch, blocks, padded_length, n), acc)
  out_shape = ([jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(dt.shape, dt.dtype)]
               + ([jax.ShapeDtypeStruct(z.shape, z.dtype)] if has_z else [])
               + [partial_bc, partial_bc, jax.ShapeDtypeStruct((batch, d, n), acc),
                  jax.ShapeDtypeStruct((batch, d), acc), jax.ShapeDtypeStruct((batch, d), acc),
                  jax.ShapeDtypeStruct((batch, d, n), acc)])
  out_specs = ([specs.seq(), specs.seq()] + [specs.seq()] * has_z
               + [specs.per_block(), specs.per_block(), specs.state(), specs.per_batch(),
                  specs.per_batch(), specs.state()])
  kernel = functools.partial(_backward_kernel, config, has_z)
  outs = _call(kernel, config, grid, in_specs, out_specs, out_shape, *inputs)
  dz = outs[2] if has_z else None
  return (outs[0], outs[1], dz, *outs[2 + has_z:])


_scan.defvjp(_scan_fwd, backward)
