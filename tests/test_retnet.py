"""RetNet and DenseRetNet: retention forms, decoding, dense connections, sizes and training.

Numerics are checked against float64 NumPy written straight from the papers' equations.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from conftest import tiny_config
from configs import dense_retnet as dense_retnet_configs
from configs import retnet as retnet_configs
from seqmodels import lm, optim, retnet, trainer
from seqmodels.errors import UserError

FORMS = ("parallel", "chunkwise", "recurrent")
ARCHS = ("retnet", "dense_retnet")


def _np(x):
  return np.asarray(x[...] if isinstance(x, nnx.Variable) else x, np.float64)


def _tokens(batch, length, vocab, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


def _gammas(n_head):
  return 1 - 2.0 ** (-5 - np.arange(n_head))


def np_retention(q, k, v, gammas, state=None):
  """S_t = gamma S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, one head and one step at a time."""
  batch, length, heads, dk = q.shape
  s = np.zeros((batch, heads, dk, v.shape[-1])) if state is None else state.copy()
  o = np.zeros(v.shape)
  for h in range(heads):
    for t in range(length):
      s[:, h] = gammas[h] * s[:, h] + np.einsum("bk,bv->bkv", k[:, t, h], v[:, t, h])
      o[:, t, h] = np.einsum("bkv,bk->bv", s[:, h], q[:, t, h])
  return o, s


def np_rotary(x, positions, theta=10000.0):
  half = x.shape[-1] // 2
  angles = positions[:, None] * theta ** (-np.arange(half) / half)
  cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_silu(x):
  return x / (1 + np.exp(-x))


def np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def np_layer_norm(x, scale, bias, eps):
  x = x - x.mean(axis=-1, keepdims=True)
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale + bias


def np_retnet_block(blk, u, eps):
  """Y = X + MSR(LN(X)), X' = Y + FFN(LN(Y)), with the multi-scale retention spelled out."""
  msr = blk.retention
  x = np_layer_norm(u, _np(blk.retention_norm.scale), _np(blk.retention_norm.bias), eps)
  batch, length, _ = x.shape
  heads, dk = msr.n_head, msr.key_dim
  positions = np.arange(length)
  q = np_rotary((x @ _np(msr.q_proj.kernel)).reshape(batch, length, heads, dk), positions)
  k = np_rotary((x @ _np(msr.k_proj.kernel)).reshape(batch, length, heads, dk), positions) / np.sqrt(dk)
  v = (x @ _np(msr.v_proj.kernel)).reshape(batch, length, heads, -1)
  o, _ = np_retention(q, k, v, _gammas(heads))
  o = np_layer_norm(o, _np(msr.group_norm.scale), _np(msr.group_norm.bias), eps)
  y = u + (np_silu(x @ _np(msr.g_proj.kernel)) * o.reshape(batch, length, -1)) @ _np(msr.out_proj.kernel)
  h = np_layer_norm(y, _np(blk.ffn_norm.scale), _np(blk.ffn_norm.bias), eps)
  h = h @ _np(blk.ffn.fc1.kernel)
  gelu = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  return y + gelu @ _np(blk.ffn.fc2.kernel)


def np_dense_kv(mixer, x, previous, eps):
  """q, the dense-connected k and v, the gate, and the raw (k, v), from the DenseSSM equations."""
  q = np_silu(x @ _np(mixer.q_proj.kernel))
  k = np_silu(x @ _np(mixer.k_proj.kernel)) / np.sqrt(mixer.key_dim)
  v, g = np.split(np_silu(x @ _np(mixer.to_hidden.kernel)), 2, axis=-1)
  raw = (k, v)
  if len(mixer.k_gates):
    def gate(g_i):
      return np_silu(np_silu(x @ _np(g_i.fc1.kernel)) @ _np(g_i.fc2.kernel))

    for i, (k_past, v_past) in enumerate(previous[:len(mixer.k_gates)]):
      k = k + gate(mixer.k_gates[i]) * k_past
      v = v + gate(mixer.v_gates[i]) * v_past
    k = np_rms_norm(k, _np(mixer.k_norm.scale), eps)
    v = np_rms_norm(v, _np(mixer.v_norm.scale), eps)
  return q, k, v, g, raw


def np_dense_retnet_backbone(backbone, u, m, eps):
  """The whole DenseRetNet stack, each layer fed the raw (k, v) of layers l-1, ..., l-m."""
  raws = []
  for blk in backbone.blocks:
    mixer = blk.mixer
    x = np_rms_norm(u, _np(blk.norm.scale), eps)
    previous = raws[::-1][:m]
    q, k, v, g, raw = np_dense_kv(mixer, x, previous, eps)
    raws.append(raw)
    batch, length, _ = x.shape
    shape = (batch, length, mixer.n_head, -1)
    positions = np.arange(length)
    o, _ = np_retention(np_rotary(q.reshape(shape), positions), np_rotary(k.reshape(shape), positions),
                        v.reshape(shape), _gammas(mixer.n_head))
    o = np_rms_norm(o, _np(mixer.group_norm.scale), eps).reshape(batch, length, -1)
    u = u + (g * o) @ _np(mixer.to_out.kernel)
  return u


def _backbone(model, u):
  """The backbone's training forward of a float64 residual stream u, run in float32."""
  return nnx.jit(lambda m, x: m.backbone(x)[0])(model, jnp.asarray(u, jnp.float32))


# Retention itself.

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_state", [False, True])
def test_retention_forms_equal_float64_recurrence(form, with_state):
  rng = np.random.default_rng(0)
  batch, length, heads, dk, dv = 2, 13, 3, 4, 6
  q, k = rng.normal(size=(2, batch, length, heads, dk))
  v = rng.normal(size=(batch, length, heads, dv))
  state = rng.normal(size=(batch, heads, dk, dv)) if with_state else None
  # Fast decays as well as slow ones, so that a wrong exponent shows.
  log_gamma = np.log([0.5, 0.9, 1 - 2.0**-5])
  o, new_state = retnet.retention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v, log_gamma)), form=form,
                                  chunk_size=4, state=None if state is None else jnp.asarray(state, jnp.float32))
  expected_o, expected_state = np_retention(q, k, v, np.exp(log_gamma), state)
  np.testing.assert_allclose(o, expected_o, rtol=1e-4, atol=1e-4)
  if with_state:
    np.testing.assert_allclose(new_state, expected_state, rtol=1e-4, atol=1e-4)
  else:
    assert new_state is None


def test_parallel_form_is_the_decay_masked_matmul():
  rng = np.random.default_rng(1)
  q, k, v = rng.normal(size=(3, 1, 5, 2, 4))
  gammas = np.array([0.8, 0.95])
  o = retnet.parallel_retention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v, np.log(gammas))))
  n = np.arange(5)
  for h in range(2):
    d = np.where(n[:, None] >= n[None, :], gammas[h] ** (n[:, None] - n[None, :]), 0.0)
    expected = (q[0, :, h] @ k[0, :, h].T * d) @ v[0, :, h]
    np.testing.assert_allclose(o[0, :, h], expected, rtol=1e-5, atol=1e-5)


def test_head_decays_are_one_minus_two_to_the_minus_five_minus_h():
  gammas = np.exp(np.asarray(retnet.head_log_decays(16), np.float64))
  np.testing.assert_allclose(gammas, 1 - 2.0 ** -np.arange(5, 21), rtol=0, atol=1e-7)
  assert gammas[0] == pytest.approx(31 / 32) and retnet.head_log_decays(16).dtype == jnp.float32
  assert np.all(np.diff(gammas) > 0)  # Every head is distinct, down to 1 - 2^-20.


# The models against float64 NumPy, in every form.

@pytest.mark.parametrize("form", FORMS)
def test_retnet_block_equals_float64_equations(form):
  cfg = tiny_config("retnet", **{"model.n_layer": 1, "model.retention_form": form, "model.chunk_size": 4}).model
  model = lm.build(cfg, seed=3)
  u = np.random.default_rng(2).normal(size=(2, 9, cfg.d_model))
  got = _backbone(model, u)
  expected = np_retnet_block(model.backbone.blocks[0], u, cfg.norm_eps)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _randomize_gates(backbone, seed):
  """Gates of std 1, so that every dense connection moves the output by far more than rtol."""
  rng = np.random.default_rng(seed)
  for blk in backbone.blocks:
    for gate in [*blk.mixer.k_gates, *blk.mixer.v_gates]:
      for kernel in (gate.fc1.kernel, gate.fc2.kernel):
        kernel.set_value(jnp.asarray(rng.normal(size=kernel.shape), jnp.float32))


def _dense_model(m, seed=4, **overrides):
  cfg = tiny_config("dense_retnet", **{"model.n_layer": 4, "model.dense_layers": m, **overrides}).model
  model = lm.build(cfg, seed=seed)
  _randomize_gates(model.backbone, seed=0)
  return cfg, model


@pytest.mark.parametrize("form", FORMS)
def test_dense_retnet_backbone_equals_float64_equations(form):
  cfg, model = _dense_model(2, **{"model.retention_form": form, "model.chunk_size": 4})
  assert [len(blk.mixer.k_gates) for blk in model.backbone.blocks] == [0, 1, 2, 2]
  u = np.random.default_rng(3).normal(size=(2, 9, cfg.d_model))
  got = _backbone(model, u)
  np.testing.assert_allclose(got, np_dense_retnet_backbone(model.backbone, u, 2, cfg.norm_eps), rtol=1e-4,
                             atol=1e-4)


def test_dense_connections_change_the_model():
  _, dense = _dense_model(2)
  cfg, plain = _dense_model(0)
  assert all(len(blk.mixer.k_gates) == 0 and blk.mixer.k_norm is None for blk in plain.backbone.blocks)
  # Give the plain model every weight the two share, so that only the dense connections differ.
  shared = dict(nnx.to_flat_state(nnx.state(dense)))
  plain_state = nnx.state(plain)
  for path, variable in nnx.to_flat_state(plain_state):
    variable.set_value(shared[path].get_value())
  nnx.update(plain, plain_state)
  u = np.random.default_rng(5).normal(size=(2, 9, cfg.d_model))
  with_dense, without = _backbone(dense, u), _backbone(plain, u)
  np.testing.assert_allclose(without, np_dense_retnet_backbone(plain.backbone, u, 0, cfg.norm_eps), rtol=1e-4,
                             atol=1e-4)
  assert not np.allclose(with_dense, without, rtol=1e-2, atol=1e-2)
  # Threading only layer l-1 (m = 1) through the m = 2 model's gates is also far off.
  assert not np.allclose(with_dense, np_dense_retnet_backbone(dense.backbone, u, 1, cfg.norm_eps), rtol=1e-2,
                         atol=1e-2)


def test_zeroed_gates_leave_rmsnorm_of_the_raw_keys_and_values():
  cfg, model = _dense_model(2)
  mixer = model.backbone.blocks[2].mixer
  for gate in [*mixer.k_gates, *mixer.v_gates]:
    gate.fc2.kernel.set_value(jnp.zeros(gate.fc2.kernel.shape))
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 5, cfg.d_model))
  previous = [(rng.normal(size=(2, 5, cfg.d_model // 2)), rng.normal(size=(2, 5, 2 * cfg.d_model)))
              for _ in range(2)]
  _, k, v, _, (k_raw, v_raw) = mixer.project(jnp.asarray(x, jnp.float32),
                                            [tuple(jnp.asarray(a, jnp.float32) for a in p) for p in previous])

  def rms(a):
    return a / np.sqrt(np.mean(a**2, axis=-1, keepdims=True) + cfg.norm_eps)

  np.testing.assert_allclose(k, rms(_np(k_raw)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v, rms(_np(v_raw)), rtol=1e-5, atol=1e-5)
  # The raw ones are the GAU projections: silu(W_k x) / sqrt(d_k) and the first half of silu(W_h x).
  np.testing.assert_allclose(k_raw, np_silu(x @ _np(mixer.k_proj.kernel)) / np.sqrt(mixer.key_dim), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(v_raw, np_silu(x @ _np(mixer.to_hidden.kernel))[..., :2 * cfg.d_model], rtol=1e-5,
                             atol=1e-6)


# Decoding through the language model.

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("form", ["parallel", "recurrent"])
def test_decoding_equals_the_parallel_forward(arch, form):
  """Step by step from an empty cache, and continuing after a parallel prefill of 6 tokens."""
  cfg = tiny_config(arch, **{"model.retention_form": form, "model.chunk_size": 4}).model
  model = lm.build(cfg, seed=1)
  tokens = _tokens(2, 11, cfg.vocab_size)
  parallel = nnx.jit(lambda m, t: m(t))(model, tokens)
  step = nnx.jit(lambda m, t, c: m.step(t, c))
  cache = model.init_cache(2, max_length=16)
  for t in range(tokens.shape[1]):
    logits, cache = step(model, tokens[:, t], cache)
    np.testing.assert_allclose(logits, parallel[:, t], rtol=1e-4, atol=1e-4)
  prompt_logits, cache = nnx.jit(lambda m, t, c: m.prefill(t, c))(model, tokens[:, :6], model.init_cache(2, 16))
  np.testing.assert_allclose(prompt_logits, parallel[:, :6], rtol=1e-4, atol=1e-4)
  for t in range(6, tokens.shape[1]):
    logits, cache = step(model, tokens[:, t], cache)
    np.testing.assert_allclose(logits, parallel[:, t], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_compute_keeps_float32_parameters(arch):
  cfg = tiny_config(arch, **{"model.dtype": "bfloat16"}).model
  model = lm.build(cfg)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype("float32")}
  logits = nnx.jit(lambda m, t: m(t))(model, _tokens(2, 11, cfg.vocab_size))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_group_norm_parameters_are_not_weight_decayed():
  model = lm.build(tiny_config("retnet").model)
  mask = optim.weight_decay_mask(nnx.state(model))
  retention = mask["backbone"]["blocks"][0]["retention"]
  assert retention["group_norm"]["scale"] is False  # 2-D, yet a norm's scale.
  assert retention["group_norm"]["bias"] is False
  assert retention["q_proj"]["kernel"] is True


# Sizes.

def _retnet_count(n_layer, d, vocab=50280):
  """Tied embeddings; per block W_Q, W_K (d x d), W_V, W_G (d x 2d), W_O (2d x d), FFN 2 x (d x 2d),
  two LayerNorms (scale and bias) and the GroupNorm's per-channel scale and bias over 2d."""
  return n_layer * (12 * d * d + 2 * 2 * d + 2 * 2 * d) + vocab * d + 2 * d


def _dense_retnet_count(n_layer, d, n_head, m, vocab=32000):
  """Untied embeddings; per block W_q, W_k (d x d/2), W_h (d x 4d), W_o (2d x d), the block RMSNorm
  and the shared per-head RMSNorm (2d/h); layer l >= 1 adds min(l, m) gate pairs and two RMSNorms."""
  hidden = d // 32
  gates = (d * hidden + hidden * d // 2) + (d * hidden + hidden * 2 * d)
  blocks = sum(7 * d * d + d + 2 * d // n_head + min(layer, m) * gates + (d // 2 + 2 * d if min(layer, m) else 0)
               for layer in range(n_layer))
  return blocks + 2 * vocab * d + d


RETNET_PUBLISHED = {"1.3b": 1.3e9, "2.7b": 2.7e9, "6.7b": 6.7e9}
DENSE_RETNET_NAMED = {"350m": 350e6, "1.3b": 1.3e9}


@pytest.mark.parametrize("variant", list(RETNET_PUBLISHED))
def test_retnet_paper_sizes(variant):
  cfg = retnet_configs.get_config(variant).model
  n = lm.count_params(lm.abstract(cfg))
  assert n == _retnet_count(cfg.n_layer, cfg.d_model)
  # The published sizes are round names (GPT-3's for the same shapes); ours land within 2.1%.
  assert abs(n / RETNET_PUBLISHED[variant] - 1) < 0.021, n
  assert cfg.d_model // cfg.n_head == 256


@pytest.mark.parametrize("variant", list(DENSE_RETNET_NAMED))
def test_dense_retnet_released_sizes(variant):
  cfg = dense_retnet_configs.get_config(variant).model
  n = lm.count_params(lm.abstract(cfg))
  assert n == _dense_retnet_count(cfg.n_layer, cfg.d_model, cfg.n_head, cfg.dense_layers)
  assert cfg.dense_layers == 1 and cfg.vocab_size == 32000 and not cfg.tie_embeddings
  # 367.6M and 1333.1M: the names round them down by 5.0% and 2.5%.
  assert 0 < n / DENSE_RETNET_NAMED[variant] - 1 < 0.051, n


# Configuration errors.

@pytest.mark.parametrize("arch, overrides, message", [
    ("retnet", {"model.n_head": 3}, "n_head=3 must divide"),
    ("retnet", {"model.n_head": 32}, "must be even for the rotary"),
    ("retnet", {"model.retention_form": "fused"}, "retention_form must be one of parallel, chunkwise"),
    ("retnet", {"model.chunk_size": 0}, "chunk_size must be positive"),
    ("retnet", {"model.ffn_factor": 0}, "ffn_factor must be positive"),
    ("dense_retnet", {"model.n_head": 3}, "n_head=3 must divide the key width 16"),
    ("dense_retnet", {"model.d_model": 30}, "d_model=30 must be even and at least 32"),
    ("dense_retnet", {"model.dense_layers": -1}, "dense_layers must be >= 0"),
])
def test_bad_dims_are_user_errors(arch, overrides, message):
  with pytest.raises(UserError, match=message):
    lm.check_config(tiny_config(arch, **overrides).model)


# Training.

@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_the_loss(arch, tmp_path):
  config = tiny_config(arch, total_steps=20, learning_rate=1e-2, log_every=5, val_every=20, checkpoint_every=20)
  trainer.train(config, str(tmp_path), progress=False)
  losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
  assert losses[-1] < losses[0] - 0.5, losses
