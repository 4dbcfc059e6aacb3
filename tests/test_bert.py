"""BERT (architecture "bert"): the LION encoder with softmax attention, against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import REPO, tiny_config
from configs import lion_common
from seqmodels import config as config_lib, lion, trainer
from test_lion import _jit_call, _randomize, f64


def _bert_attention(seed=0, d_model=32, n_head=4):
  cfg = lion_common.lion_model("bert")
  cfg.d_model, cfg.n_head, cfg.n_layer = d_model, n_head, 1
  return _randomize(lion.LionAttention(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed)), seed)


def _np_softmax_attention(attn, x, mask):
  """softmax(q k^T / sqrt(dk)) v per head over the unmasked keys, in float64."""
  x = f64(x)
  batch, length, d = x.shape
  heads, dk = attn.n_head, d // attn.n_head
  qkv = x @ f64(attn.qkv.kernel[...]) + f64(attn.qkv.bias[...])
  q, k, v = np.split(qkv.reshape(batch, length, 3 * heads, dk), 3, axis=2)
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dk)
  scores = np.where(f64(mask)[:, None, None, :] > 0, scores, -np.inf)
  weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
  weights /= weights.sum(axis=-1, keepdims=True)
  y = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, d)
  return y @ f64(attn.out.kernel[...]) + f64(attn.out.bias[...])


def test_bert_attention_matches_float64_softmax_with_padding():
  attn = _bert_attention()
  x = jax.random.normal(jax.random.key(1), (2, 13, 32))
  mask = jnp.asarray([[1] * 13, [1] * 9 + [0] * 4], jnp.float32)
  ones = jnp.ones((2, 13), jnp.float32)
  np.testing.assert_allclose(_jit_call(attn, x), _np_softmax_attention(attn, x, ones), rtol=2e-4, atol=2e-5)
  padded = _jit_call(attn, x, mask)
  np.testing.assert_allclose(padded, _np_softmax_attention(attn, x, mask), rtol=2e-4, atol=2e-5)
  # Bidirectional: the first token sees the last one.
  changed = _jit_call(attn, x.at[0, -1].add(1.0))
  assert not np.allclose(changed[0, 0], _jit_call(attn, x)[0, 0])


def test_bert_config_has_lion_lit_size_and_trains_mlm(tmp_path):
  bert = config_lib.load(f"{REPO}/configs/bert.py:base")
  lit = config_lib.load(f"{REPO}/configs/lion_lit.py:base")
  assert trainer.describe(bert)["params"] == trainer.describe(lit)["params"]
  assert bert.model.architecture == "bert" and bert.objective == "mlm"
  config = tiny_config("bert", total_steps=4, **{"model.n_head": 2, "model.n_layer": 1})
  result = trainer.train(config, str(tmp_path), progress=False)
  assert result.val_loss < np.log(config.model.vocab_size) and 0 < result.val_accuracy < 1
