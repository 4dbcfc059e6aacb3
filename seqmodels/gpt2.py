"""GPT-2 and its three variants from "Towards Smaller, Faster Decoder-Only Transformers" (Suresh & P, 2024).

The base is the paper's nanoGPT GPT-2 (nanoGPT's bias=False: no biases in the blocks' projections):
learned positions added to the token embedding, an untied head, and pre-norm blocks

    u = u + W_o attention(W_q x, W_k x, W_v x),   x = LayerNorm(u)   (causal, no RoPE)
    u = u + W_2 gelu(W_1 x),                      x = LayerNorm(u)   W_1: d -> 4d

ParallelGPT (pgpt) splits the L blocks into two towers T_1, T_2 of L/2 blocks, each fed by its own
projection P_i = Linear(d, d) with bias, and mixes them with one learned scalar w (0.5 at init):

    y = sigmoid(w) T_1(P_1 u) + (1 - sigmoid(w)) T_2(P_2 u)

One-tower inference drops the tower of smaller weight: y = T_1(P_1 u) if sigmoid(w) >= 1/2, else
T_2(P_2 u), unweighted as in the paper's code. That code also skips the final LayerNorm there; we keep
it, which also makes leaving out the factor sigmoid(w) immaterial.

LinearGPT (lgpt) and ConvGPT (cgpt) group the blocks into stages of 2 (`blocks_per_stage`) and halve
the width after every stage, with R_s = Linear(d_s, d_s / 2) or a kernel-1 Conv1d(d_s, d_s / 2),
both with bias:

    u = R_s(B_{2s+1}(B_{2s}(u))),   d_s = d / 2^s,   s = 0 .. L/2 - 1

The head count stays n_head, so the head dim halves with the width; the final norm and the head
read d / 2^(L/2) (32 for the paper's 8 x 512).

Init (nanoGPT): every Linear and embedding N(0, 0.02) with zero biases; the two projections writing
into the residual stream (W_o, W_2) are scaled by 1/sqrt(2 L), L = n_layer also in pgpt's towers.
nanoGPT's init rule covers only Linear and Embedding, so cgpt's Conv1d keeps PyTorch's default,
U(+-1/sqrt(fan_in)) for weight and bias; this is the one place where cgpt and lgpt differ. (The
released code applies the rule before it builds the blocks, so there the blocks keep PyTorch's
defaults; we follow the stated nanoGPT init.)

Decoding keeps gpt.CausalSelfAttention's KV cache in every block; P_i and R_s act on each token
alone, so they carry no state.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from seqmodels import layers
from seqmodels.errors import UserError
from seqmodels.gpt import CausalSelfAttention, TransformerBlock


class GeluMLP(nnx.Module):

  def __init__(self, d, n_layer, *, dtype, rngs):
    init = layers.normal_init(0.02)
    self.fc = layers.linear(d, 4 * d, axes=("embed", "mlp"), dtype=dtype, rngs=rngs, kernel_init=init)
    self.proj = layers.linear(4 * d, d, axes=("mlp", "embed"), dtype=dtype, rngs=rngs,
                              kernel_init=layers.scaled(init, 1 / math.sqrt(2 * n_layer)))

  def __call__(self, x):
    # The exact (erf) GELU of PyTorch's nn.GELU(), which the paper's code uses.
    return self.proj(jax.nn.gelu(self.fc(x), approximate=False))


class GPT2Block(TransformerBlock):
  """The Transformer++ block's residual wiring, KV cache and flops with GPT-2's parts, at `width`."""

  def __init__(self, cfg, layer_index, *, dtype, rngs, width=None):
    del layer_index
    d = width or cfg.d_model
    self.attn_norm = layers.make_norm(cfg.norm, d, eps=cfg.norm_eps, dtype=dtype)
    self.attn = CausalSelfAttention(d, cfg.n_head, cfg.n_layer, dtype=dtype, rngs=rngs)
    self.mlp_norm = layers.make_norm(cfg.norm, d, eps=cfg.norm_eps, dtype=dtype)
    self.mlp = GeluMLP(d, cfg.n_layer, dtype=dtype, rngs=rngs)
    self.d_model = d

  @staticmethod
  def check_config(cfg):
    if cfg.n_head <= 0 or cfg.d_model % cfg.n_head:
      raise UserError(f"model.n_head={cfg.n_head} must divide model.d_model={cfg.d_model}; "
                      "pick a head count that divides the width")


class GPT2(layers.BlockStack):
  block_class = GPT2Block


class ParallelGPT(nnx.Module):
  """Two towers of n_layer / 2 GPT-2 blocks, mixed by sigmoid(w); see the module docstring."""

  def __init__(self, cfg, *, dtype, rngs):
    d = cfg.d_model
    init = layers.normal_init(0.02)
    self.proj = nnx.List([layers.linear(d, d, axes=("embed", None), use_bias=True, dtype=dtype, rngs=rngs,
                                        kernel_init=init) for _ in range(2)])
    self.towers = nnx.List([nnx.List([GPT2Block(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.n_layer // 2)])
                            for _ in range(2)])
    self.mix = nnx.Param(jnp.asarray(0.5, jnp.float32), **layers.logical_axes())
    # Decoding (prefill and step) runs one tower when set; training always runs both.
    self.one_tower_inference = cfg.one_tower_inference
    self.out_dim = d
    self.remat = cfg.get("remat", "none")

  @classmethod
  def check_config(cls, cfg):
    GPT2.check_config(cfg)
    if cfg.n_layer % 2:
      raise UserError(f"model.n_layer={cfg.n_layer} must be even to split into two towers; "
                      "use an even layer count")

  def init_cache(self, batch, max_length):
    return [[blk.init_cache(batch, max_length) for blk in tower] for tower in self.towers]

  def __call__(self, u, cache=None):
    if cache is not None and self.one_tower_inference:
      return self.one_tower(u, cache)
    (x1, c1), (x2, c2) = (self._tower(i, u, None if cache is None else cache[i]) for i in range(2))
    g = jax.nn.sigmoid(self.mix[...])
    return g * x1 + (1 - g) * x2, (None if cache is None else [c1, c2])

  def one_tower(self, u, cache=None):
    """Runs only the tower with sigmoid(w) >= 1/2 (a lax.cond, so the other never executes).

    The other tower's cache passes through untouched.
    """
    def branch(i):
      def run(module, u, cache):
        x, tower_cache = module._tower(i, u, None if cache is None else cache[i])
        return x, (None if cache is None else [tower_cache if j == i else cache[j] for j in range(2)])
      return run
    return nnx.cond(jax.nn.sigmoid(self.mix[...]) >= 0.5, branch(0), branch(1), self, u, cache)

  def _tower(self, i, u, cache):
    return layers.run_blocks(self.towers[i], self.proj[i](u).astype(jnp.float32), cache, self.remat)

  def extra_flops_per_token(self, seq_len):
    return sum(blk.extra_flops_per_token(seq_len) for tower in self.towers for blk in tower)


def stage_widths(cfg) -> list[int]:
  """The width of each stage of `blocks_per_stage` blocks, then the width the head reads."""
  return [cfg.d_model // 2**s for s in range(cfg.n_layer // cfg.blocks_per_stage + 1)]


class CompressingGPT(nnx.Module):
  """Stages of GPT-2 blocks at widths d, d/2, ..., each followed by a width-halving `reducer`.

  Subclasses name the reducer: reducer(d_in, d_out, *, dtype, rngs) -> a module mapping the last axis.
  """
  reducer: Callable[..., nnx.Module]

  def __init__(self, cfg, *, dtype, rngs):
    widths = stage_widths(cfg)
    k = cfg.blocks_per_stage
    self.stages = nnx.List([
        nnx.List([GPT2Block(cfg, s * k + i, dtype=dtype, rngs=rngs, width=width) for i in range(k)])
        for s, width in enumerate(widths[:-1])])
    self.reducers = nnx.List([self.reducer(widths[s], widths[s + 1], dtype=dtype, rngs=rngs)
                              for s in range(len(widths) - 1)])
    self.out_dim = widths[-1]
    self.remat = cfg.get("remat", "none")

  @classmethod
  def check_config(cls, cfg):
    GPT2.check_config(cfg)
    k = cfg.blocks_per_stage
    if k <= 0 or cfg.n_layer % k:
      raise UserError(f"model.n_layer={cfg.n_layer} must be a multiple of model.blocks_per_stage={k} "
                      "(the width halves after every stage); change either")
    halvings = cfg.n_layer // k
    if cfg.d_model % 2**halvings:
      raise UserError(f"model.d_model={cfg.d_model} must be a multiple of 2^{halvings} to halve {halvings} "
                      f"times (model.n_layer={cfg.n_layer} / model.blocks_per_stage={k}); "
                      "widen the model or use fewer layers")
    widths = stage_widths(cfg)[:-1]
    for width in widths:
      if width % cfg.n_head:
        raise UserError(f"model.n_head={cfg.n_head} must divide every stage width {widths} "
                        f"but not {width}; pick a head count that divides {widths[-1]}")

  def init_cache(self, batch, max_length):
    return [[blk.init_cache(batch, max_length) for blk in stage] for stage in self.stages]

  def __call__(self, u, cache=None):
    new_cache = []
    for s, (stage, reducer) in enumerate(zip(self.stages, self.reducers)):
      u, stage_cache = layers.run_blocks(stage, u, None if cache is None else cache[s], self.remat)
      u = reducer(u).astype(jnp.float32)
      new_cache.append(stage_cache)
    return u, (None if cache is None else new_cache)

  def extra_flops_per_token(self, seq_len):
    return sum(blk.extra_flops_per_token(seq_len) for stage in self.stages for blk in stage)


class LinearGPT(CompressingGPT):

  @staticmethod
  def reducer(d_in, d_out, *, dtype, rngs):
    return layers.linear(d_in, d_out, axes=("embed", None), use_bias=True, dtype=dtype, rngs=rngs,
                         kernel_init=layers.normal_init(0.02))


class ConvGPT(CompressingGPT):

  @staticmethod
  def reducer(d_in, d_out, *, dtype, rngs):
    """Conv1d(d_in, d_out, kernel_size=1) over time, channels last, with PyTorch's default init."""
    return nnx.Conv(d_in, d_out, kernel_size=(1,), use_bias=True, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=layers.torch_default_init,
                    bias_init=layers.symmetric_uniform(1 / math.sqrt(d_in)), rngs=rngs,
                    kernel_metadata=layers.logical_axes(None, "embed", None), bias_metadata=layers.logical_axes(None))
