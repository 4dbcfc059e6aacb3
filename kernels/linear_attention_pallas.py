"""The "pallas" implementation of linear_attention: chunked kernels with a hand-written backward.

The XLA side pads the length to whole chunks and sums the log-decay within each chunk (c); the
kernels take it from there. Both steps are plain JAX, so autodiff turns dc back into the gradient of
the log-decay (a reversed cumulative sum) and of whichever log_decay form the caller gave. The
kernels sit under one jax.custom_vjp whose residuals are the inputs plus the state entering each
chunk, (batch, heads, chunks, dk, dv) (float32 on TPU, bf16 on GPU): never one state per step.

Backends: Mosaic GPU on NVIDIA Hopper (kernels/linear_attention_gpu.py); Mosaic TPU
(kernels/linear_attention_tpu.py), which CPU runs in TPU interpret mode.
"""

import functools

import jax
import jax.numpy as jnp

from kernels import linear_attention_gpu, linear_attention_tpu


def backend_kernels(backend=None):
  """The kernel module for a JAX backend name (default: the current one)."""
  backend = backend or jax.default_backend()
  return linear_attention_gpu if backend == "gpu" else linear_attention_tpu


def gpu_supports(q, v):
  """Whether the Mosaic GPU kernels take these shapes, so that "auto" can fall back to XLA."""
  return linear_attention_gpu.unsupported_reason(q.shape[-1], v.shape[-1]) is None


def pallas_recurrence(q, k, v, g, h0, *, chunk_size, backend=None):
  """o and the final state for (batch, length, heads, channels) inputs, g of width 1 or dk."""
  if h0.dtype == jnp.float64:
    raise ValueError("impl='pallas' takes float32 or bfloat16 inputs, got float64; use "
                     "impl='reference' or 'chunked' for float64")
  module = backend_kernels(backend)
  # The GPU kernels need whole warpgroup tiles; the TPU and interpret ones take any chunk size.
  size = module.CHUNK if module is linear_attention_gpu else min(chunk_size, q.shape[1])
  if module is linear_attention_gpu:
    reason = linear_attention_gpu.unsupported_reason(q.shape[-1], v.shape[-1])
    if reason:
      raise ValueError(f"impl='pallas' on GPU needs {reason}; use impl='chunked' for these shapes")
  length = q.shape[1]
  n_chunks = -(-length // size)

  def to_chunks(x):
    # Padded steps have k = v = 0 and g = 0: they neither add to nor decay the state.
    return jnp.pad(x, ((0, 0), (0, n_chunks * size - length), (0, 0), (0, 0)))

  q, k, v, g = map(to_chunks, (q, k, v, g))
  batch, padded, heads, dg = g.shape
  c = jnp.cumsum(g.reshape(batch, n_chunks, size, heads, dg), axis=2).reshape(g.shape)
  o, s_last = _kernels(module, size, q, k, v, c, h0)
  return o[:, :length], s_last


def _interpret(module):
  return module is linear_attention_tpu and jax.default_backend() != "tpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kernels(module, size, q, k, v, c, h0):
  o, s_last, _ = module.forward(q, k, v, c, h0, chunk_size=size, interpret=_interpret(module))
  return o, s_last


def _kernels_forward(module, size, q, k, v, c, h0):
  o, s_last, states = module.forward(q, k, v, c, h0, chunk_size=size,
                                     interpret=_interpret(module))
  return (o, s_last), (q, k, v, c, states)


def _kernels_backward(module, size, residuals, cotangents):
  q, k, v, c, states = residuals
  do, ds_last = cotangents
  # The saved states may be narrower than the state (bf16 on GPU); its gradient stays float32.
  return module.backward(q, k, v, c, states, do.astype(q.dtype), ds_last.astype(jnp.float32),
                         chunk_size=size, interpret=_interpret(module))


_kernels.defvjp(_kernels_forward, _kernels_backward)
