"""Building blocks shared by the architectures: norms, projections, rotary embeddings, inits.

Parameters are always float32; `dtype` is the compute dtype. Norm statistics are taken in float32.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch's nn.Linear / nn.Conv1d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)). The Mamba reference
# keeps it for in_proj, x_proj and conv1d, so a faithful port must too.
torch_default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
normal_init = nnx.initializers.normal


def symmetric_uniform(bound):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def scaled(init, factor):
  def scaled_init(key, shape, dtype=jnp.float32):
    return init(key, shape, dtype) * factor
  return scaled_init


class NoWeightDecay(nnx.Param):
  """A parameter that the optimizer must not decay, whatever its rank (Mamba's A_log and D)."""


def compute_dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def linear(d_in, d_out, *, dtype, rngs, use_bias=False, kernel_init=torch_default_init):
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=kernel_init, bias_init=nnx.initializers.zeros, rngs=rngs)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, computed in float32 and returned in the compute dtype."""

  def __init__(self, dim: int, *, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...]).astype(self.dtype)


def pad_vocab(vocab_size: int, multiple: int) -> int:
  return int(math.ceil(vocab_size / multiple) * multiple)


def rotary(x, positions, theta: float):
  """Rotates channel pairs (i, i + d/2) of x (..., length, heads, d) by angle position * theta^(-2i/d)."""
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., :, None] * inv_freq  # (..., length, half)
  cos = jnp.cos(angles)[..., None, :]
  sin = jnp.sin(angles)[..., None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
