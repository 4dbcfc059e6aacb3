"""Model structure, init and the agreement of parallel, prefill and step-by-step forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from seqmodels import lm, optim
from seqmodels.errors import UserError
from seqmodels.layers import NoWeightDecay


@pytest.fixture(params=["mamba", "gpt"])
def arch(request):
  return request.param


def _tokens(batch, length, vocab, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


def test_step_by_step_logits_equal_parallel_forward(arch):
  cfg = tiny_config(arch).model
  model = lm.build(cfg, seed=1)
  tokens = _tokens(2, 11, cfg.vocab_size)
  parallel = model(tokens)
  cache = model.init_cache(2, max_length=16)
  stepped = []
  for t in range(tokens.shape[1]):
    logits, cache = model.step(tokens[:, t], cache)
    stepped.append(logits)
  np.testing.assert_allclose(np.stack(stepped, axis=1), parallel, rtol=1e-4, atol=1e-4)


def test_decoding_continues_from_a_parallel_prefill(arch):
  cfg = tiny_config(arch).model
  model = lm.build(cfg, seed=2)
  tokens = _tokens(3, 13, cfg.vocab_size, seed=1)
  parallel = model(tokens)
  prompt_logits, cache = model.prefill(tokens[:, :7], model.init_cache(3, max_length=13))
  np.testing.assert_allclose(prompt_logits, parallel[:, :7], rtol=1e-4, atol=1e-4)
  for t in range(7, 13):
    logits, cache = model.step(tokens[:, t], cache)
    np.testing.assert_allclose(logits, parallel[:, t], rtol=1e-4, atol=1e-4)


def test_models_are_causal(arch):
  cfg = tiny_config(arch).model
  model = lm.build(cfg)
  tokens = _tokens(1, 12, cfg.vocab_size)
  changed = tokens.at[0, 8].set((tokens[0, 8] + 1) % cfg.vocab_size)
  a, b = model(tokens), model(changed)
  np.testing.assert_array_equal(a[:, :8], b[:, :8])
  assert not np.allclose(a[:, 8:], b[:, 8:])


def test_bfloat16_compute_keeps_float32_parameters(arch):
  cfg = tiny_config(arch, **{"model.dtype": "bfloat16"}).model
  model = lm.build(cfg)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype("float32")}
  logits = model(_tokens(2, 8, cfg.vocab_size))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_mamba_init_follows_the_reference():
  cfg = tiny_config("mamba", **{"model.d_model": 64, "model.n_layer": 4}).model
  model = lm.build(cfg, seed=3)
  mixer = model.backbone.blocks[0].mixer
  d_inner, n, rank = 128, 16, 4
  np.testing.assert_allclose(mixer.A_log[...], np.log(np.tile(np.arange(1, n + 1), (d_inner, 1))), rtol=1e-6)
  np.testing.assert_array_equal(mixer.D[...], np.ones(d_inner))
  dt = np.asarray(jax.nn.softplus(mixer.dt_bias[...]))
  assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001 and dt.std() > 0
  assert np.abs(mixer.dt_proj.kernel[...]).max() <= rank**-0.5
  assert mixer.x_proj.kernel.shape == (d_inner, rank + 2 * n)
  # out_proj: PyTorch's U(+-1/sqrt(fan_in)) scaled by 1/sqrt(n_layer).
  bound = 1 / math.sqrt(d_inner) / math.sqrt(4)
  out = np.asarray(mixer.out_proj.kernel[...])
  assert np.abs(out).max() <= bound and np.abs(out).max() > 0.9 * bound
  assert mixer.conv1d.kernel.shape == (4, d_inner) and mixer.conv1d.bias.shape == (d_inner,)
  assert abs(float(np.std(model.embed.embedding[...])) - 0.02) < 0.002
  assert model.head is None  # Tied to the embedding.
  assert model.vocab_size == 264  # 257 padded to a multiple of 8.


def test_weight_decay_only_on_matrices():
  model = lm.build(tiny_config("mamba").model)
  mask = optim.weight_decay_mask(nnx.state(model))
  decayed = {jax.tree_util.keystr(path): bool(v) for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert len(decayed) == len(jax.tree.leaves(nnx.state(model)))
  for path, value in decayed.items():
    if any(name in path for name in ("A_log", "'D'", "bias", "scale", "dt_bias")):
      assert not value, path
    if any(name in path for name in ("in_proj", "x_proj", "out_proj", "embedding")) and "bias" not in path:
      assert value, path
  assert isinstance(model.backbone.blocks[0].mixer.A_log, NoWeightDecay)


def test_unknown_architecture_lists_known_ones():
  with pytest.raises(UserError, match=r"unknown model.architecture .mambo.; known: .*gpt, .*mamba"):
    lm.build(tiny_config("mamba", **{"model.architecture": "mambo"}).model)


def test_heads_must_divide_width():
  with pytest.raises(UserError, match="n_head=3 must divide"):
    lm.build(tiny_config("gpt", **{"model.n_head": 3}).model)
