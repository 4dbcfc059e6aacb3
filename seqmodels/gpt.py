"""The Transformer++ baseline: pre-norm blocks of RoPE attention and a SwiGLU MLP, RMSNorm, no biases.

Per block:

    u = u + W_o attention(rope(W_q x), rope(W_k x), W_v x),   x = norm(u)   (causal)
    u = u + W_down (silu(W_gate x) * W_up x),                   x = norm(u)

Weights start N(0, 0.02); the two projections that write into the residual stream are scaled by
1/sqrt(2 n_layer) so its variance does not grow with depth. Training attention goes through
`jax.nn.dot_product_attention`, asking for cuDNN's flash attention on GPU with bf16 inputs (JAX's
default there is XLA's attention, which writes out the full score matrix).

Decoding keeps a preallocated KV cache of `max_length` positions per layer; a forward over L new
tokens writes them at the cache position and attends to everything written so far (the unwritten
rest is masked). The cache is heads-major, (batch, heads, max_length, head_dim), so that a
decoding step's q K^T and weighted sum of V are batched matrix-vector products over contiguous
keys rather than reads through a transpose.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from seqmodels import layers, sharding
from seqmodels.errors import UserError


def ffn_dim(cfg) -> int:
  """SwiGLU width: 8d/3 (same parameters as a 4d GELU MLP), rounded up to a multiple of 256."""
  if cfg.ffn_dim > 0:
    return cfg.ffn_dim
  return 256 * math.ceil(8 * cfg.d_model / 3 / 256)


def attention_implementation(q):
  """cuDNN's fused flash attention where it runs (GPU, 16-bit inputs, head dim a multiple of 8 up to
  128), else None: XLA's, which materializes the (batch, heads, length, length) scores.
  """
  fused = (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
           and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0)
  return "cudnn" if fused else None


class CausalSelfAttention(nnx.Module):
  """Multi-head causal attention of width d, with RoPE on q and k unless rope_theta is None.

  GPT-2 passes None: its positions are learned and added to the token embedding instead.
  """

  def __init__(self, d, n_head, n_layer, *, rope_theta=None, dtype, rngs):
    self.n_head, self.head_dim = n_head, d // n_head
    self.rope_theta = rope_theta
    self.dtype = dtype
    init = layers.normal_init(0.02)
    self.qkv = layers.linear(d, 3 * d, axes=("embed", "heads"), dtype=dtype, rngs=rngs, kernel_init=init)
    self.out = layers.linear(d, d, axes=("heads", "embed"), dtype=dtype, rngs=rngs,
                             kernel_init=layers.scaled(init, 1 / math.sqrt(2 * n_layer)))

  def init_cache(self, batch, max_length):
    shape = (batch, self.n_head, max_length, self.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype),
            "pos": jnp.zeros((), jnp.int32)}

  def __call__(self, x, cache=None):
    batch, length, _ = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(batch, length, 3 * self.n_head, self.head_dim), 3, axis=2)
    start = 0 if cache is None else cache["pos"]
    positions = start + jnp.arange(length)
    if self.rope_theta is not None:
      q = layers.rotary(q, positions, self.rope_theta)
      k = layers.rotary(k, positions, self.rope_theta)
    if cache is None:
      o = sharding.causal_attention(q, k, v, implementation=attention_implementation(q))
    else:
      heads_major = lambda a: jnp.swapaxes(a.astype(self.dtype), 1, 2)
      k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], heads_major(k), start, axis=2)
      v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], heads_major(v), start, axis=2)
      visible = jnp.arange(k_all.shape[2])[None, :] <= positions[:, None]  # (length, max_length)
      o = cached_attention(q, k_all, v_all, visible)
      cache = {"k": k_all, "v": v_all, "pos": start + length}
    return self.out(o.reshape(batch, length, -1)), cache


def cached_attention(q, k_all, v_all, visible):
  """softmax(q K^T / sqrt(head_dim), masked to `visible`) V against a heads-major KV cache.

  q: (batch, length, heads, head_dim); k_all, v_all: (batch, heads, max_length, head_dim);
  visible: (length, max_length). Scores and softmax are float32, as in jax.nn.dot_product_attention.
  """
  scores = jnp.einsum("blnh,bnsh->bnls", q.astype(k_all.dtype), k_all, preferred_element_type=jnp.float32)
  scores = jnp.where(visible, scores * q.shape[-1] ** -0.5, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_all.dtype)
  return jnp.einsum("bnls,bnsh->blnh", probs, v_all, preferred_element_type=jnp.float32).astype(q.dtype)


class SwiGLU(nnx.Module):

  def __init__(self, cfg, *, dtype, rngs):
    d, hidden = cfg.d_model, ffn_dim(cfg)
    init = layers.normal_init(0.02)
    self.gate = layers.linear(d, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs, kernel_init=init)
    self.up = layers.linear(d, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs, kernel_init=init)
    self.down = layers.linear(hidden, d, axes=("mlp", "embed"), dtype=dtype, rngs=rngs,
                              kernel_init=layers.scaled(init, 1 / math.sqrt(2 * cfg.n_layer)))

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class TransformerBlock(nnx.Module):

  def __init__(self, cfg, layer_index, *, dtype, rngs):
    del layer_index
    self.attn_norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    self.attn = CausalSelfAttention(cfg.d_model, cfg.n_head, cfg.n_layer, rope_theta=cfg.rope_theta,
                                    dtype=dtype, rngs=rngs)
    self.mlp_norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    self.mlp = SwiGLU(cfg, dtype=dtype, rngs=rngs)
    self.d_model = cfg.d_model

  @staticmethod
  def check_config(cfg):
    if cfg.n_head <= 0 or cfg.d_model % cfg.n_head:
      raise UserError(f"model.n_head={cfg.n_head} must divide model.d_model={cfg.d_model}; "
                      "pick a head count that divides the width")
    if (cfg.d_model // cfg.n_head) % 2:
      raise UserError(f"head dim {cfg.d_model // cfg.n_head} must be even for RoPE; "
                      "change model.n_head or model.d_model")

  def init_cache(self, batch, max_length):
    return self.attn.init_cache(batch, max_length)

  def __call__(self, u, cache=None):
    y, cache = self.attn(self.attn_norm(u), cache)
    u = u + y.astype(jnp.float32)
    u = u + self.mlp(self.mlp_norm(u)).astype(jnp.float32)
    return u, cache

  def extra_flops_per_token(self, seq_len):
    # Attention scores and the weighted sum: 2 matmuls of 2 * seq_len * d flops each per token,
    # halved by the causal mask, times 3 for forward plus backward.
    return 3 * 2 * seq_len * self.d_model


class Transformer(layers.BlockStack):
  block_class = TransformerBlock
