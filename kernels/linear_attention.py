"""Causal linear attention with decay, the recurrence under RetNet- and GLA-style models.

For each batch element and head, with a dk x dv state S and g_t = log_decay_t:

  S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,        S_{-1} = h0 (default zeros)
  o_t = S_t^T q_t

Shapes are channels-last: q and k are (batch, length, heads, dk), v is (batch, length, heads, dv),
h0 is (batch, heads, dk, dv). log_decay is None (no decay), (heads,) (a constant per head),
(batch, length, heads) (per token) or (batch, length, heads, dk) (per key channel).

Like selective_scan, the implementations differ only in how they run the recurrence over time:
the shared code brings log_decay to (batch, length, heads, 1 or dk) and handles dtypes and
reversal, so every implementation sees the same four arrays.
"""

import functools

import jax
import jax.numpy as jnp

from kernels import linear_attention_pallas
from kernels._common import accumulation_dtype, check_impl, compose_affine

IMPLS = ("auto", "reference", "associative", "chunked", "pallas")


def linear_attention(q, k, v, log_decay=None, *, h0=None, reverse=False, return_state=False,
                     impl="auto", chunk_size=64):
  """Runs decayed linear attention along the length axis.

  Args:
    q: (batch, length, heads, dk) queries.
    k: (batch, length, heads, dk) keys.
    v: (batch, length, heads, dv) values.
    log_decay: optional log of the per-step state decay: (heads,), (batch, length, heads) or
      (batch, length, heads, dk); normally negative.
    h0: optional (batch, heads, dk, dv) initial state.
    reverse: run from the last time step to the first.
    return_state: also return the state after the last processed step.
    impl: one of IMPLS; "auto" picks the fastest on the current backend.
    chunk_size: time steps per chunk for the "chunked" implementation, and for "pallas" off GPU
      (the GPU kernels use their own).

  Returns:
    o, (batch, length, heads, dv) in the result dtype of q and v; or (o, S_last) when
    return_state, with S_last (batch, heads, dk, dv) in the accumulation dtype (float32, or float64
    for float64 inputs).
  """
  _check_shapes(q, k, v, log_decay, h0, chunk_size)
  impl = _resolve_impl(impl, q, v)
  recurrence = {"reference": _reference, "associative": _associative,
                "chunked": functools.partial(_chunked, chunk_size=chunk_size),
                "pallas": functools.partial(linear_attention_pallas.pallas_recurrence,
                                            chunk_size=chunk_size)}[impl]
  out_dtype = jnp.result_type(q, v)
  acc = accumulation_dtype(q, k, v, log_decay, h0)
  # The kernels read q, k and v in their own dtype (half the bytes for bf16) and accumulate in acc.
  compute = jnp.result_type(q, k, v) if impl == "pallas" else acc
  q, k, v = (jnp.asarray(a, compute) for a in (q, k, v))
  batch, length, heads, dk = q.shape

  if log_decay is None:
    log_decay = jnp.zeros((batch, length, heads, 1), acc)
  else:
    log_decay = jnp.asarray(log_decay, acc)
    if log_decay.ndim == 1:
      log_decay = jnp.broadcast_to(log_decay[:, None], (batch, length, heads, 1))
    elif log_decay.ndim == 3:
      log_decay = log_decay[..., None]
  h0 = jnp.zeros((batch, heads, dk, v.shape[-1]), acc) if h0 is None else jnp.asarray(h0, acc)

  seq = (q, k, v, log_decay)
  if reverse:
    seq = tuple(jnp.flip(a, axis=1) for a in seq)
  o, s_last = recurrence(*seq, h0)
  if reverse:
    o = jnp.flip(o, axis=1)

  o = o.astype(out_dtype)
  return (o, s_last) if return_state else o


def _resolve_impl(impl, q, v):
  """Turns impl into the name of an implementation, choosing the fastest one for "auto"."""
  check_impl(impl, IMPLS)
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  if backend == "tpu" or (backend == "gpu" and linear_attention_pallas.gpu_supports(q, v)):
    return "pallas"
  # Chunked wins even on CPU: jit forward+backward at batch 4, length 512, heads 4, dk = dv = 64
  # with per-token decay took ~10 ms for "chunked" (chunk_size 64) against ~130 ms for "reference"
  # and ~370 ms for "associative", because whole chunks go through matmuls instead of one outer
  # product per step. Per-channel decay is the exception on CPU: its (chunk, chunk, dk) scores
  # took ~240 ms there against ~155 ms for "reference".
  return "chunked"


def _check_shapes(q, k, v, log_decay, h0, chunk_size):
  q_shape = jnp.shape(q)
  if len(q_shape) != 4 or q_shape[1] == 0:
    raise ValueError(f"q must have shape (batch, length, heads, dk) with length >= 1, "
                     f"got {q_shape}")
  batch, length, heads, dk = q_shape
  if jnp.shape(k) != q_shape:
    raise ValueError(f"k must have the same shape as q, {q_shape}, got {jnp.shape(k)}")
  v_shape = jnp.shape(v)
  if len(v_shape) != 4 or v_shape[:3] != q_shape[:3]:
    raise ValueError(f"v must have shape (batch, length, heads, dv) = "
                     f"({batch}, {length}, {heads}, dv), got {v_shape}")
  if log_decay is not None and jnp.shape(log_decay) not in ((heads,), q_shape[:3], q_shape):
    raise ValueError(f"log_decay must have shape {(heads,)}, {q_shape[:3]} or {q_shape} (per head, "
                     f"per token or per key channel), got {jnp.shape(log_decay)}")
  h0_shape = (batch, heads, dk, v_shape[3])
  if h0 is not None and jnp.shape(h0) != h0_shape:
    raise ValueError(f"h0 must have shape {h0_shape}, got {jnp.shape(h0)}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


def _reference(q, k, v, g, h0):
  """One step at a time, holding a single (batch, heads, dk, dv) state."""

  def step(s, inputs):
    q_t, k_t, v_t, g_t = inputs
    s = jnp.exp(g_t)[..., None] * s + k_t[..., :, None] * v_t[..., None, :]
    return s, jnp.einsum("bhkv,bhk->bhv", s, q_t)

  time_major = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g))
  s_last, o = jax.lax.scan(step, h0, time_major)
  return jnp.moveaxis(o, 0, 1), s_last


def _associative(q, k, v, g, h0):
  """Parallel prefix over time: log(length) depth, at the cost of holding every state."""
  decay = jnp.exp(g)[..., None]
  drive = k[..., :, None] * v[..., None, :]
  # The scan starts from a zero state; h0 enters through the first step's affine map instead.
  drive = drive.at[:, 0].add(decay[:, 0] * h0)
  _, s = jax.lax.associative_scan(compose_affine, (decay, drive), axis=1)
  return jnp.einsum("blhkv,blhk->blhv", s, q), s[:, -1]


def _chunked(q, k, v, g, h0, chunk_size):
  """Attention-like matmuls inside chunks of time, the recurrence only from chunk to chunk.

  With c_t the cumulative log-decay since the start of t's chunk, o_t sums exp(c_t - c_s) k_s v_s^T
  q_t over earlier steps s of the chunk, plus the state entering the chunk decayed by exp(c_t).
  Decay factors are only ever exponentials of differences c_t - c_s with s <= t (or of c_t itself),
  all <= 0 for a decaying state, so strong decay over a long chunk underflows to zero instead of
  overflowing to inf.
  """
  batch, length, heads, _ = q.shape
  size = min(chunk_size, length)  # A chunk longer than the sequence would only be padding.
  n_chunks = -(-length // size)

  def to_chunks(x):
    # Padded steps have k = v = 0, which add nothing to the state, and g = 0, which keeps it; their
    # outputs are dropped, so the padding changes neither o nor the final state.
    x = jnp.pad(x, ((0, 0), (0, n_chunks * size - length), (0, 0), (0, 0)))
    return x.reshape(batch, n_chunks, size, heads, -1).transpose(1, 0, 3, 2, 4)

  q, k, v, g = (to_chunks(x) for x in (q, k, v, g))  # (chunks, batch, heads, size, channels)
  c = jnp.cumsum(g, axis=-2)
  c_last = c[..., -1:, :]

  # Masking the exponent rather than its result keeps s > t out of exp, whose inf would otherwise
  # turn into NaN in the gradient of the masked-out entries.
  causal = jnp.tril(jnp.ones((size, size), bool))
  if g.shape[-1] == 1:
    exponent = c[..., :, None, 0] - c[..., None, :, 0]
    scores = jnp.einsum("...tk,...sk->...ts", q, k) * jnp.exp(jnp.where(causal, exponent, -jnp.inf))
  else:
    # Per-channel decay cannot leave the dk sum: a (size, size, dk) tensor per chunk.
    exponent = c[..., :, None, :] - c[..., None, :, :]
    decay = jnp.exp(jnp.where(causal[..., None], exponent, -jnp.inf))
    scores = jnp.sum(q[..., :, None, :] * k[..., None, :, :] * decay, axis=-1)
  o = jnp.einsum("...ts,...sv->...tv", scores, v)

  # Each chunk maps the state entering it to the state leaving it by s -> a * s + b.
  a = jnp.exp(c_last[..., 0, :])[..., None]
  b = jnp.einsum("...sk,...sv->...kv", k * jnp.exp(c_last - c), v)

  def step(s, chunk):
    a_j, b_j = chunk
    return a_j * s + b_j, s

  s_last, s_start = jax.lax.scan(step, h0, (a, b))
  o = o + jnp.einsum("...tk,...kv->...tv", q * jnp.exp(c), s_start)
  o = o.transpose(1, 0, 3, 2, 4).reshape(batch, n_chunks * size, heads, -1)
  return o[:, :length], s_last

