"""GPT-2, ParallelGPT, LinearGPT and ConvGPT: sizes, equations, decoding, one-tower mode, bad dims, training."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from conftest import REPO, tiny_config
from seqmodels import config as config_lib
from seqmodels import lm, trainer
from seqmodels.errors import UserError
from seqmodels.gpt2 import GPT2, GPT2Block, ParallelGPT, stage_widths

ARCHS = ["gpt2", "parallel_gpt", "linear_gpt", "conv_gpt"]
PUBLISHED = {"gpt2": 77.2e6, "parallel_gpt": 77.7e6, "linear_gpt": 36.4e6, "conv_gpt": 36.4e6}


def _expected_count(arch, n_layer=8, d=512, vocab=50304, positions=1024):
  """Counted by hand: untied embeddings, no biases in the blocks' Linears, LayerNorm scale + bias."""
  def blocks(n, w):
    return n * (12 * w * w + 4 * w)
  if arch in ("gpt2", "parallel_gpt"):
    n = 2 * vocab * d + positions * d + blocks(n_layer, d) + 2 * d
    return n + (2 * (d * d + d) + 1 if arch == "parallel_gpt" else 0)
  widths = [d // 2**s for s in range(n_layer // 2 + 1)]
  body = sum(blocks(2, w) + w * (w // 2) + w // 2 for w in widths[:-1])
  return vocab * d + positions * d + body + 2 * widths[-1] + widths[-1] * vocab


@pytest.mark.parametrize("arch", ARCHS)
def test_paper_configs_count_the_published_parameters(arch):
  config = config_lib.load(os.path.join(REPO, "configs", f"{arch}.py") + ":8x512")
  n = lm.count_params(lm.abstract(config.model))
  assert n == _expected_count(arch)
  assert abs(n / PUBLISHED[arch] - 1) < 0.005, n


@pytest.mark.parametrize("arch", ["linear_gpt", "conv_gpt"])
def test_width_halves_after_every_two_blocks_with_fixed_heads(arch):
  config = config_lib.load(os.path.join(REPO, "configs", f"{arch}.py") + ":8x512")
  model = lm.abstract(config.model)
  assert stage_widths(config.model) == [512, 256, 128, 64, 32]
  assert config.model.d_model == 512  # Building never rewrites the config.
  for stage, width in zip(model.backbone.stages, [512, 256, 128, 64], strict=True):
    assert [blk.d_model for blk in stage] == [width, width]
    for blk in stage:
      assert blk.attn.qkv.kernel.shape == (width, 3 * width)
      assert (blk.attn.n_head, blk.attn.head_dim) == (8, width // 8)
      assert blk.mlp.fc.kernel.shape == (width, 4 * width)
  kernels = [r.kernel.shape for r in model.backbone.reducers]
  if arch == "linear_gpt":
    assert kernels == [(512, 256), (256, 128), (128, 64), (64, 32)]
  else:
    assert kernels == [(1, 512, 256), (1, 256, 128), (1, 128, 64), (1, 64, 32)]
  assert [r.bias.shape for r in model.backbone.reducers] == [(256,), (128,), (64,), (32,)]
  assert model.backbone.out_dim == 32
  assert model.norm_f.scale.shape == (32,) and model.head.kernel.shape == (32, 50304)


# An independent float64 NumPy forward pass of all four models, from their parameters.

def _np(x):
  return np.asarray(x[...], np.float64)


def _layernorm(x, norm):
  x = x - x.mean(-1, keepdims=True)
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * _np(norm.scale) + _np(norm.bias)


def _attention(x, attn):
  b, t, d = x.shape
  h = attn.n_head
  q, k, v = (y.reshape(b, t, h, d // h).transpose(0, 2, 1, 3) for y in np.split(x @ _np(attn.qkv.kernel), 3, -1))
  s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // h)
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  o = (p / p.sum(-1, keepdims=True)) @ v
  return o.transpose(0, 2, 1, 3).reshape(b, t, d) @ _np(attn.out.kernel)


def _block(u, blk):
  u = u + _attention(_layernorm(u, blk.attn_norm), blk.attn)
  h = _layernorm(u, blk.mlp_norm) @ _np(blk.mlp.fc.kernel)
  return u + (0.5 * h * (1 + erf(h / math.sqrt(2)))) @ _np(blk.mlp.proj.kernel)


def _affine(x, layer):
  kernel = _np(layer.kernel)
  return x @ kernel.reshape(-1, kernel.shape[-1]) + _np(layer.bias)


def _reference_logits(model, tokens, tower=None):
  """tower=None: the full model; tower=i: ParallelGPT's one-tower inference through tower i."""
  tokens = np.asarray(tokens)
  u = _np(model.embed.embedding)[tokens] + _np(model.positions.embedding)[: tokens.shape[1]]
  backbone = model.backbone
  if isinstance(backbone, GPT2):
    for blk in backbone.blocks:
      u = _block(u, blk)
  elif isinstance(backbone, ParallelGPT):
    outs = []
    for proj, blocks in zip(backbone.proj, backbone.towers, strict=True):
      x = _affine(u, proj)
      for blk in blocks:
        x = _block(x, blk)
      outs.append(x)
    g = 1 / (1 + math.exp(-float(backbone.mix[...])))
    u = g * outs[0] + (1 - g) * outs[1] if tower is None else outs[tower]
  else:
    for stage, reducer in zip(backbone.stages, backbone.reducers, strict=True):
      for blk in stage:
        u = _block(u, blk)
      u = _affine(u, reducer)
  return _layernorm(u, model.norm_f) @ _np(model.head.kernel)


def _tokens(batch, length, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, 257)


def _tiny(arch, **overrides):
  # Two stages for the compressing variants: widths 32 -> 16 -> 8, 2 heads.
  return tiny_config(arch, **{"model.n_layer": 4, "model.n_head": 2, **overrides}).model


# One model and one parallel forward per architecture, shared by the tests that only read them.
TOKENS_SEED, BATCH, LENGTH = 7, 2, 12


@functools.cache
def _model(arch):
  return lm.build(_tiny(arch), seed=1)


@functools.cache
def _parallel_logits(arch):
  return np.asarray(_model(arch)(_tokens(BATCH, LENGTH, TOKENS_SEED)))


_step = nnx.jit(lambda model, tokens_t, cache: model.step(tokens_t, cache))


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_a_float64_reference(arch):
  expected = _reference_logits(_model(arch), _tokens(BATCH, LENGTH, TOKENS_SEED))
  np.testing.assert_allclose(_parallel_logits(arch), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_step_by_step_logits_equal_parallel_forward(arch):
  model, tokens = _model(arch), _tokens(BATCH, LENGTH, TOKENS_SEED)
  cache = model.init_cache(BATCH, max_length=LENGTH)
  stepped = []
  for t in range(LENGTH):
    logits, cache = _step(model, tokens[:, t], cache)
    stepped.append(logits)
  np.testing.assert_allclose(np.stack(stepped, axis=1), _parallel_logits(arch), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_continues_from_a_parallel_prefill(arch):
  model, tokens, parallel = _model(arch), _tokens(BATCH, LENGTH, TOKENS_SEED), _parallel_logits(arch)
  prompt_logits, cache = model.prefill(tokens[:, :7], model.init_cache(BATCH, max_length=LENGTH))
  np.testing.assert_allclose(prompt_logits, parallel[:, :7], rtol=1e-4, atol=1e-4)
  for t in range(7, LENGTH):
    logits, cache = _step(model, tokens[:, t], cache)
    np.testing.assert_allclose(logits, parallel[:, t], rtol=1e-4, atol=1e-4)


def test_init_follows_nanogpt():
  cfg = tiny_config("parallel_gpt", **{"model.d_model": 64, "model.n_layer": 8, "model.n_head": 4}).model
  backbone = lm.build(cfg, seed=5).backbone
  assert float(backbone.mix[...]) == 0.5
  blk = backbone.towers[1][2]
  for kernel, std in [(blk.attn.qkv.kernel, 0.02), (blk.mlp.fc.kernel, 0.02), (backbone.proj[0].kernel, 0.02),
                      (blk.attn.out.kernel, 0.02 / 4), (blk.mlp.proj.kernel, 0.02 / 4)]:  # 1/sqrt(2 x 8 layers)
    assert abs(float(np.std(kernel[...])) / std - 1) < 0.1
  np.testing.assert_array_equal(backbone.proj[1].bias[...], 0)
  conv = _model("conv_gpt").backbone.reducers[0]  # PyTorch's Conv1d default: U(+-1/sqrt(32)).
  for param in (conv.kernel[...], conv.bias[...]):
    assert 0.8 / math.sqrt(32) < np.abs(param).max() <= 1 / math.sqrt(32)


@pytest.mark.parametrize("w, tower", [(1.0, 0), (-1.0, 1)])
def test_one_tower_inference_runs_only_the_heavier_tower(monkeypatch, w, tower):
  model = lm.build(_tiny("parallel_gpt", **{"model.one_tower_inference": True}), seed=4)
  model.backbone.mix[...] = jnp.float32(w)
  tokens = _tokens(2, 9, seed=2)
  # Training still mixes both towers.
  np.testing.assert_allclose(model(tokens), _reference_logits(model, tokens), rtol=1e-4, atol=1e-5)

  ran = []  # The first qkv weight of every block that actually executes.
  call = GPT2Block.__call__

  def recording_call(blk, u, cache=None):
    jax.debug.callback(lambda x: ran.append(float(x)), blk.attn.qkv.kernel[0, 0])
    return call(blk, u, cache)

  monkeypatch.setattr(GPT2Block, "__call__", recording_call)
  prompt_logits, cache = model.prefill(tokens[:, :5], model.init_cache(2, max_length=9))
  jax.effects_barrier()
  towers = [{float(blk.attn.qkv.kernel[0, 0]) for blk in t} for t in model.backbone.towers]
  assert sorted(ran) == sorted(towers[tower]) and not towers[0] & towers[1]
  monkeypatch.undo()

  expected = _reference_logits(model, tokens, tower=tower)
  np.testing.assert_allclose(prompt_logits, expected[:, :5], rtol=1e-4, atol=1e-5)
  assert int(cache["backbone"][1 - tower][0]["pos"]) == 0  # The dropped tower's cache is untouched.
  step = nnx.jit(lambda m, t, c: m.step(t, c))
  for t in range(5, 9):
    logits, cache = step(model, tokens[:, t], cache)
    np.testing.assert_allclose(logits, expected[:, t], rtol=1e-4, atol=1e-5)


def test_one_tower_mode_is_a_switch_and_a_method():
  model = _model("parallel_gpt")  # Built with one_tower_inference off: decoding mixes both towers.
  tokens = _tokens(1, 6, seed=3)
  both, _ = model.prefill(tokens, model.init_cache(1, max_length=6))
  np.testing.assert_allclose(both, _reference_logits(model, tokens), rtol=1e-4, atol=1e-5)
  try:
    model.backbone.one_tower_inference = True
    one, _ = model.prefill(tokens, model.init_cache(1, max_length=6))
  finally:
    model.backbone.one_tower_inference = False
  np.testing.assert_allclose(one, _reference_logits(model, tokens, tower=0), rtol=1e-4, atol=1e-5)
  u = model.embed(tokens) + model.positions(jnp.arange(6))
  x, cache = model.backbone.one_tower(u)
  assert cache is None
  np.testing.assert_allclose(model.head(model.norm_f(x)), one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch, overrides, message", [
    ("gpt2", {"model.n_head": 3}, r"model.n_head=3 must divide model.d_model=32"),
    ("parallel_gpt", {"model.n_layer": 3}, r"model.n_layer=3 must be even"),
    ("linear_gpt", {"model.n_layer": 3}, r"model.n_layer=3 must be a multiple of model.blocks_per_stage=2"),
    ("conv_gpt", {"model.n_layer": 12}, r"model.d_model=32 must be a multiple of 2\^6"),
    ("linear_gpt", {"model.n_layer": 6, "model.d_model": 48, "model.n_head": 8},
     r"model.n_head=8 must divide every stage width \[48, 24, 12\] but not 12"),
])
def test_bad_dims_fail_at_config_time_in_one_line(arch, overrides, message):
  cfg = tiny_config(arch, **overrides).model
  with pytest.raises(UserError, match=message) as error:
    lm.check_config(cfg)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_trains(arch, tmp_path):
  config = tiny_config(arch, total_steps=30, learning_rate=5e-3, log_every=5, val_every=30, checkpoint_every=30)
  trainer.train(config, str(tmp_path), progress=False)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert records[-1]["loss"] < records[0]["loss"] - 0.5
