"""The language-model wrapper every causal architecture shares: embedding -> blocks -> norm -> head.

Blocks come from `ARCHITECTURES`, keyed by `config.model.architecture`. A block is an nnx.Module with

    Block(cfg, layer_index, *, dtype, rngs)
    block(u, cache=None) -> (u, cache)      u is the float32 residual stream (batch, length, d)
    block.init_cache(batch, max_length)
    block.extra_flops_per_token(seq_len)    training flops beyond 6 x params (attention, scans)
    Block.check_config(cfg)                 raises UserError for impossible dims

With `cache=None` a block runs its parallel training form and returns `None`; with a cache it
continues from it, so prefill and one-token decoding share the training code.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from seqmodels import layers
from seqmodels.errors import UserError
from seqmodels.gpt import TransformerBlock
from seqmodels.mamba import MambaBlock

ARCHITECTURES = {
    "mamba": MambaBlock,
    "gpt": TransformerBlock,
}


def block_class(architecture: str):
  if architecture not in ARCHITECTURES:
    raise UserError(f"unknown model.architecture '{architecture}'; known: {', '.join(sorted(ARCHITECTURES))}")
  return ARCHITECTURES[architecture]


class LanguageModel(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    block = block_class(cfg.architecture)
    block.check_config(cfg)
    dtype = layers.compute_dtype(cfg.dtype)
    self.vocab_size = layers.pad_vocab(cfg.vocab_size, cfg.pad_vocab_multiple)
    self.embed = nnx.Embed(self.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
                           embedding_init=layers.normal_init(0.02), rngs=rngs)
    self.blocks = nnx.List([block(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.n_layer)])
    self.norm_f = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    self.head = None if cfg.tie_embeddings else layers.linear(
        cfg.d_model, self.vocab_size, dtype=dtype, rngs=rngs, kernel_init=layers.normal_init(0.02))

  def __call__(self, tokens):
    """tokens: int (batch, length) -> float32 logits (batch, length, padded vocab)."""
    logits, _ = self._forward(tokens, None)
    return logits

  def init_cache(self, batch: int, max_length: int = 0):
    """Decoding state for `batch` sequences; attention blocks preallocate `max_length` positions."""
    return [blk.init_cache(batch, max_length) for blk in self.blocks]

  def prefill(self, tokens, cache):
    """Runs a prompt (batch, length) in parallel from `cache`; returns its logits and the new cache."""
    return self._forward(tokens, cache)

  def step(self, tokens_t, cache):
    """One decoding step: tokens_t (batch,) -> logits (batch, vocab), cache."""
    logits, cache = self._forward(tokens_t[:, None], cache)
    return logits[:, 0], cache

  def _forward(self, tokens, cache):
    u = self.embed(tokens).astype(jnp.float32)
    new_cache = []
    for i, blk in enumerate(self.blocks):
      u, blk_cache = blk(u, None if cache is None else cache[i])
      new_cache.append(blk_cache)
    x = self.norm_f(u)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    return logits.astype(jnp.float32), (None if cache is None else new_cache)

  def extra_flops_per_token(self, seq_len: int) -> int:
    return sum(blk.extra_flops_per_token(seq_len) for blk in self.blocks)


def build(model_cfg, seed: int = 0) -> LanguageModel:
  return LanguageModel(model_cfg, rngs=nnx.Rngs(params=seed))


def abstract(model_cfg) -> LanguageModel:
  """The model with shapes only: no memory, no compute (for counting and for checkpoint restore)."""
  return nnx.eval_shape(lambda: build(model_cfg))


def count_params(model: nnx.Module) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def flops_per_token(model: LanguageModel, seq_len: int) -> float:
  """Training flops per token: 6 x (matmul parameters) plus the blocks' attention or scan work.

  The input embedding is a lookup, not a matmul, so it only counts when tied to the head.
  """
  n = count_params(model)
  if model.head is not None:
    n -= model.embed.embedding.size
  return 6 * n + model.extra_flops_per_token(seq_len)
