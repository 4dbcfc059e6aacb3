"""Pallas kernels for chunked linear attention on Mosaic TPU, also run on CPU in TPU interpret mode.

The grid walks (batch, head, chunk), the chunk axis last and sequential, with the (dk, dv) state
carried across chunks in a VMEM scratch buffer. The caller (kernels/linear_attention_pallas.py)
hands in c, the log-decay summed from the start of each chunk, so that every decay factor the
kernels form is exp of a difference c_t - c_s with s <= t (or of c_t, or of c_last - c_s), never
above 1: strong decay underflows to zero rather than overflowing.

The forward kernel also writes the state entering each chunk (only those, not one per step); the
backward kernel walks the chunks in reverse from them with the state's gradient in scratch.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def forward(q, k, v, c, h0, *, chunk_size, interpret):
  """Runs the forward kernel on (batch, length, heads, channels) inputs, length a chunk multiple.

  Returns o (input dtype), the final state and the (batch, heads, chunks, dk, dv) chunk-start
  states, both in the dtype of h0.
  """
  batch, length, heads, dk = q.shape
  dv, dg = v.shape[-1], c.shape[-1]
  n_chunks = length // chunk_size
  acc = h0.dtype
  chunk = lambda d: pl.BlockSpec((None, None, chunk_size, d), lambda b, h, j: (b, h, j, 0))
  state = pl.BlockSpec((None, None, dk, dv), lambda b, h, j: (b, h, 0, 0))
  o, s_last, states = pl.pallas_call(
      functools.partial(_forward_kernel, per_channel=dg > 1),
      grid=(batch, heads, n_chunks),
      in_specs=[chunk(dk), chunk(dk), chunk(dv), chunk(dg), state],
      out_specs=[chunk(dv), state,
                 pl.BlockSpec((None, None, None, dk, dv), lambda b, h, j: (b, h, j, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((batch, heads, length, dv), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, dk, dv), acc),
                 jax.ShapeDtypeStruct((batch, heads, n_chunks, dk, dv), acc)],
      scratch_shapes=[pltpu.VMEM((dk, dv), acc)],
      compiler_params=_compiler_params(),
      interpret=_interpret_params(interpret),
  )(*map(_heads_major, (q, k, v, c)), h0)
  return _heads_major(o), s_last, states


def backward(q, k, v, c, states, do, ds_last, *, chunk_size, interpret):
  """Gradients (dq, dk, dv, dc, dh0) of the forward kernel's (o, s_last) given theirs."""
  batch, length, heads, dk = q.shape
  dv, dg = v.shape[-1], c.shape[-1]
  n_chunks = length // chunk_size
  acc = states.dtype
  # Chunks in reverse: grid step j handles chunk n_chunks - 1 - j.
  chunk = lambda d: pl.BlockSpec((None, None, chunk_size, d),
                                 lambda b, h, j: (b, h, n_chunks - 1 - j, 0))
  state = pl.BlockSpec((None, None, dk, dv), lambda b, h, j: (b, h, 0, 0))
  chunk_state = pl.BlockSpec((None, None, None, dk, dv),
                             lambda b, h, j: (b, h, n_chunks - 1 - j, 0, 0))
  dq, dk_, dv_, dc, dh0 = pl.pallas_call(
      functools.partial(_backward_kernel, per_channel=dg > 1),
      grid=(batch, heads, n_chunks),
      in_specs=[chunk(dk), chunk(dk), chunk(dv), chunk(dg), chunk_state, chunk(dv), state],
      out_specs=[chunk(dk), chunk(dk), chunk(dv), chunk(dg), state],
      out_shape=[jax.ShapeDtypeStruct((batch, heads, length, dk), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, length, dk), k.dtype),
                 jax.ShapeDtypeStruct((batch, heads, length, dv), v.dtype),
                 jax.ShapeDtypeStruct((batch, heads, length, dg), acc),
                 jax.ShapeDtypeStruct((batch, heads, dk, dv), acc)],
      scratch_shapes=[pltpu.VMEM((dk, dv), acc)],
      compiler_params=_compiler_params(),
      interpret=_interpret_params(interpret),
  )(*map(_heads_major, (q, k, v, c)), states, _heads_major(do), ds_last)
  return (*map(_heads_major, (dq, dk_, dv_, dc)), dh0)


def _heads_major(x):
  """(batch, length, heads, d) <-> (batch, heads, length, d): TPU blocks tile the last two axes."""
  return jnp.swapaxes(x, 1, 2)


def _compiler_params():
  # The chunk axis carries the state, so it must run in order on one core.
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _interpret_params(interpret):
  return pltpu.InterpretParams() if interpret else False


def _dot(a, b, contract=(1, 0)):
  """a @ b contracting a's axis contract[0] with b's contract[1], exact in float32 on TPU too."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=a.dtype)


def _decay(c, per_channel):
  """exp(c_t - c_s) for s <= t, else 0: (size, size) for one log-decay per step, or
  (size, size, dk) per key channel. The exponent is masked before exp, so no inf appears."""
  size = c.shape[0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
  causal = rows >= jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
  if per_channel:
    exponent = c[:, None, :] - c[None, :, :]
    return jnp.exp(jnp.where(causal[:, :, None], exponent, -jnp.inf))
  return jnp.exp(jnp.where(causal, c - c.reshape(1, size), -jnp.inf))


def _load(refs, dtype):
  return (ref[...].astype(dtype) for ref in refs)


def _forward_kernel(q_ref, k_ref, v_ref, c_ref, h0_ref, o_ref, s_last_ref, states_ref, s_ref, *,
                    per_channel):
  acc = s_ref.dtype

  @pl.when(pl.program_id(2) == 0)
  def _():
    s_ref[...] = h0_ref[...]

  q, k, v, c = _load((q_ref, k_ref, v_ref, c_ref), acc)
  s = s_ref[...]
  states_ref[...] = s
  decay = _decay(c, per_channel)
  if per_channel:
    scores = jnp.sum(q[:, None, :] * k[None, :, :] * decay, axis=-1)
  else:
    scores = _dot(q, k, (1, 1)) * decay
  o = _dot(scores, v) + _dot(q * jnp.exp(c), s)
  c_last = c[-1:, :]
  # (1, dk) or (1, 1) -> a column that scales the state's rows.
  state_decay = jnp.exp(c_last).reshape(-1, 1)
  s = state_decay * s + _dot(k * jnp.exp(c_last - c), v, (0, 0))
  s_ref[...] = s
  o_ref[...] = o.astype(o_ref.dtype)
  s_last_ref[...] = s


def _backward_kernel(q_ref, k_ref, v_ref, c_ref, s_ref, do_ref, ds_last_ref,
                     dq_ref, dk_ref, dv_ref, dc_ref, dh0_ref, ds_ref, *, per_channel):
  acc = ds_ref.dtype

  @pl.when(pl.program_id(2) == 0)
  def _():
    ds_ref[...] = ds_last_ref[...]

  q, k, v, c, do = _load((q_ref, k_ref, v_ref, c_ref, do_ref), acc)
  s = s_ref[...]  # The state entering this chunk.
  ds = ds_ref[...]  # The gradient of the state leaving it.
  c_last = c[-1:, :]
  q_decay, k_decay = jnp.exp(c), jnp.exp(c_last - c)
  decay = _decay(c, per_channel)
  d_scores = _dot(do, v, (1, 1))
  if per_channel:
    scores = jnp.sum(q[:, None, :] * k[None, :, :] * decay, axis=-1)
    weighted = d_scores[:, :, None] * decay
    dq_intra = jnp.sum(weighted * k[None, :, :], axis=1)
    dk_intra = jnp.sum(weighted * q[:, None, :], axis=0)
  else:
    scores = _dot(q, k, (1, 1)) * decay
    weighted = d_scores * decay
    dq_intra = _dot(weighted, k)
    dk_intra = _dot(weighted, q, (0, 0))
  dk_inter = _dot(v, ds, (1, 1)) * k_decay
  dq = dq_intra + _dot(do, s, (1, 1)) * q_decay
  dk = dk_intra + dk_inter
  dv = _dot(scores, do, (0, 0)) + _dot(k * k_decay, ds)

  # Every c_t enters through exp(+-c_t) factors on q_t and k_t, so its gradient is q dq - k dk;
  # c_last also scales the carried state and every k in the chunk, which adds to the last row.
  state_decay = jnp.exp(c_last).reshape(-1, 1)
  last_row = (jnp.sum(k * dk_inter, axis=0, keepdims=True)
              + (state_decay * jnp.sum(s * ds, axis=1, keepdims=True)).reshape(1, -1))
  rows = jax.lax.broadcasted_iota(jnp.int32, q.shape, 0)
  dc = q * dq - k * dk + jnp.where(rows == q.shape[0] - 1, last_row, 0)
  if not per_channel:
    dc = jnp.sum(dc, axis=1, keepdims=True)

  ds = state_decay * ds + _dot(q * q_decay, do, (0, 0))
  ds_ref[...] = ds
  dh0_ref[...] = ds
  for ref, value in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv), (dc_ref, dc)):
    ref[...] = value.astype(ref.dtype)
