"""The language-model wrapper every architecture shares: embedding -> backbone -> norm -> head.

The backbone comes from `ARCHITECTURES`, keyed by `config.model.architecture`. A backbone is an
nnx.Module class with

    Backbone(cfg, *, dtype, rngs)
    backbone(u, cache=None) -> (u, cache)   u: the float32 residual stream, (batch, length, d_model)
                                            in and (batch, length, backbone.out_dim) out
    backbone.out_dim
    backbone.init_cache(batch, max_length)
    backbone.extra_flops_per_token(seq_len) training flops beyond 6 x params (attention, scans)
    Backbone.check_config(cfg)              raises UserError for impossible dims

Most backbones are a `layers.BlockStack` of identical blocks. With `cache=None` a backbone runs its
parallel training form and returns `None`; with a cache it continues from it, so prefill and
one-token decoding share the training code.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from seqmodels import layers
from seqmodels.dense_mamba import DenseMamba
from seqmodels.dense_retnet import DenseRetNet
from seqmodels.errors import UserError
from seqmodels.gpt import Transformer
from seqmodels.gpt2 import GPT2, ConvGPT, LinearGPT, ParallelGPT
from seqmodels.lion import LionEncoder
from seqmodels.mamba import Mamba
from seqmodels.retnet import RetNet

ARCHITECTURES = {
    "mamba": Mamba,
    "gpt": Transformer,
    "gpt2": GPT2,
    "parallel_gpt": ParallelGPT,
    "linear_gpt": LinearGPT,
    "conv_gpt": ConvGPT,
    "dense_mamba": DenseMamba,
    "retnet": RetNet,
    "dense_retnet": DenseRetNet,
    # Bidirectional encoders (masked-LM / classification objectives; no causal decoding).
    "lion_lit": LionEncoder,
    "lion_d": LionEncoder,
    "lion_s": LionEncoder,
    "bert": LionEncoder,  # The same encoder with softmax attention (seqmodels/lion.py).
}


def backbone_class(architecture: str):
  if architecture not in ARCHITECTURES:
    raise UserError(f"unknown model.architecture '{architecture}'; known: {', '.join(sorted(ARCHITECTURES))}")
  return ARCHITECTURES[architecture]


def check_config(cfg) -> None:
  """Raises UserError for a model config that cannot be built, before any device work."""
  backbone_class(cfg.architecture).check_config(cfg)
  layers.check_layer_options(cfg, backbone_class(cfg.architecture))
  if cfg.position_embedding not in ("none", "learned"):
    raise UserError(f"model.position_embedding must be 'none' or 'learned', got '{cfg.position_embedding}'")
  if cfg.position_embedding == "learned" and cfg.max_positions <= 0:
    raise UserError("model.position_embedding='learned' needs model.max_positions > 0; set it to the context length")
  layers.check_norm(cfg.norm)


class LanguageModel(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    check_config(cfg)
    dtype = layers.compute_dtype(cfg.dtype)
    self.vocab_size = layers.pad_vocab(cfg.vocab_size, cfg.pad_vocab_multiple)
    init = layers.normal_init(0.02)
    self.embed = nnx.Embed(self.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
                           embedding_init=init, rngs=rngs, embedding_metadata=layers.logical_axes("vocab", "embed"))
    # One assignment: NNX makes an attribute first set to None static, so it could not hold the table.
    self.positions = nnx.Embed(cfg.max_positions, cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
                               embedding_init=init, rngs=rngs, embedding_metadata=layers.logical_axes(None, "embed")
                               ) if cfg.position_embedding == "learned" else None
    self.backbone = backbone_class(cfg.architecture)(cfg, dtype=dtype, rngs=rngs)
    out_dim = self.backbone.out_dim
    self.norm_f = layers.make_norm(cfg.norm, out_dim, eps=cfg.norm_eps, dtype=dtype)
    if cfg.tie_embeddings and out_dim != cfg.d_model:
      raise UserError(f"model.tie_embeddings needs the backbone to end at d_model={cfg.d_model}, "
                      f"but it ends at {out_dim}; set --config.model.tie_embeddings=false")
    self.head = None if cfg.tie_embeddings else layers.linear(out_dim, self.vocab_size, axes=("embed", "vocab"),
                                                               dtype=dtype, rngs=rngs,
                                                               kernel_init=init)

  def __call__(self, tokens):
    """tokens: int (batch, length) -> float32 logits (batch, length, padded vocab)."""
    return self.training_logits(tokens).astype(jnp.float32)

  def training_logits(self, tokens):
    """The logits in the compute dtype, as the head's matmul writes them (for losses.cross_entropy)."""
    return self._forward(tokens, None)[0]

  def init_cache(self, batch: int, max_length: int = 0):
    """Decoding state for `batch` sequences; attention blocks preallocate `max_length` positions."""
    return {"pos": jnp.zeros((), jnp.int32), "backbone": self.backbone.init_cache(batch, max_length)}

  def prefill(self, tokens, cache, last_only: bool = False):
    """Runs a prompt (batch, length) in parallel from `cache`; returns its logits and the new cache.

    With last_only the logits are the last position's alone, (batch, 1, vocab): a sampler needs no
    more, and a long prompt's full logits can outweigh the model.
    """
    return self._forward(tokens, cache, last_only)

  def step(self, tokens_t, cache):
    """One decoding step: tokens_t (batch,) -> logits (batch, vocab), cache."""
    logits, cache = self._forward(tokens_t[:, None], cache)
    return logits[:, 0], cache

  def _forward(self, tokens, cache, last_only=False):
    u = self.embed(tokens).astype(jnp.float32)
    start = 0 if cache is None else cache["pos"]
    if self.positions is not None:
      u = u + self.positions(start + jnp.arange(tokens.shape[1])).astype(jnp.float32)
    u, backbone_cache = self.backbone(u, None if cache is None else cache["backbone"])
    x = self.norm_f(u[:, -1:] if last_only else u)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    if cache is None:
      return logits, None
    return logits.astype(jnp.float32), {"pos": start + tokens.shape[1], "backbone": backbone_cache}

  def extra_flops_per_token(self, seq_len: int) -> int:
    return self.backbone.extra_flops_per_token(seq_len)


def build(model_cfg, seed: int = 0) -> LanguageModel:
  return LanguageModel(model_cfg, rngs=nnx.Rngs(params=seed))


def abstract(model_cfg) -> LanguageModel:
  """The model with shapes only: no memory, no compute (for counting and for checkpoint restore)."""
  return nnx.eval_shape(lambda: build(model_cfg))


def count_params(model: nnx.Module) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def flops_per_token(model: LanguageModel, seq_len: int) -> float:
  """Training flops per token: 6 x (matmul parameters) plus the blocks' attention or scan work."""
  return 6 * matmul_params(model) + model.extra_flops_per_token(seq_len)


def matmul_params(model: LanguageModel) -> int:
  """Parameters used in matmuls: embedding lookups (positions, and tokens unless tied to the head) are not."""
  n = count_params(model)
  if model.head is not None:
    n -= model.embed.embedding.size
  if model.positions is not None:
    n -= model.positions.embedding.size
  return n
