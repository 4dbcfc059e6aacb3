"""LION: its three forms against float64 NumPy, the mask, MLM data, training, BoolQ, memory, sizes."""

import copy
import importlib.util
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, tiny_config
from configs import lion_common
from seqmodels import data, evaluate, lion, lm, trainer
from seqmodels import config as config_lib
from seqmodels.errors import UserError
from seqmodels.tokenizers import ByteTokenizer

BOOLQ = lion_common.BOOLQ
# The released BERT checkpoints' counts (BertModel, with the 768 x 768 pooler), which the BERT
# paper rounds to 110M and 340M.
BERT_PARAMS = {"base": 109_482_240, "large": 335_141_888}


def _randomize(module, seed, scale=0.3):
  """Replaces every parameter by N(0, scale^2) noise: at the N(0, 0.02) init the features are
  nearly constant, so the attention is nearly uniform and would hide a wrong mask or normalizer."""
  leaves, treedef = jax.tree.flatten(nnx.state(module, nnx.Param))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(module, jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
  return module


def _jit_call(module, *args):
  """module(*args), compiled: one XLA program instead of hundreds of op-by-op dispatches."""
  graphdef, state = nnx.split(module)
  return jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))(state, *args)


def _attention(variant, form, seed=0, d_model=32, n_head=4, chunk_size=8):
  cfg = lion_common.lion_model(variant)
  cfg.d_model, cfg.n_head, cfg.n_layer, cfg.lion_form, cfg.chunk_size = d_model, n_head, 1, form, chunk_size
  attn = _randomize(lion.LionAttention(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed)), seed)
  if variant == "lion_d":
    attn.decay_logit[...] = jnp.asarray([-1.0, 0.5, 2.0, 4.0])  # Decays 0.27 ... 0.98.
  return attn


# An independent float64 NumPy implementation of the masked full form.


def _np_feature_map(x, variant):
  if variant == "lion_lit":
    return np.where(x > 0, x + 1, np.exp(x))
  x = x / (1 + np.exp(-x)) + 0.5
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_mask(lam):
  """M_ij = product of lam_t over min(i, j) < t <= max(i, j), by explicit products."""
  n = len(lam)
  return np.array([[np.prod(lam[min(i, j) + 1:max(i, j) + 1]) for j in range(n)] for i in range(n)])


def f64(a):
  return np.asarray(a, np.float64)


def _np_lion_attention(attn, x, variant):
  x = f64(x)
  batch, length, d = x.shape
  heads = attn.n_head
  qkv = x @ f64(attn.qkv.kernel[...]) + f64(attn.qkv.bias[...])
  q, k, v = np.split(qkv.reshape(batch, length, 3 * heads, d // heads), 3, axis=2)
  q, k = _np_feature_map(q, variant), _np_feature_map(k, variant)
  if variant == "lion_lit":
    lam = np.ones((batch, length, heads))
  elif variant == "lion_d":
    lam = np.broadcast_to(1 / (1 + np.exp(-f64(attn.decay_logit[...]))), (batch, length, heads))
  else:
    lam = 1 - 1 / (1 + np.exp(-(x @ f64(attn.decay_proj.kernel[...]) + f64(attn.decay_proj.bias[...]))))
  y = np.zeros_like(v)
  for b, h in itertools.product(range(batch), range(heads)):
    a = (q[b, :, h] @ k[b, :, h].T) * _np_mask(lam[b, :, h])
    y[b, :, h] = a @ v[b, :, h] / a.sum(axis=1, keepdims=True)
  return y.reshape(batch, length, d) @ f64(attn.out.kernel[...]) + f64(attn.out.bias[...])


@pytest.mark.parametrize("form", lion.LION_FORMS)
@pytest.mark.parametrize("variant", lion.LION_VARIANTS)
def test_forms_match_float64_reference(variant, form):
  attn = _attention(variant, form)
  x = jax.random.normal(jax.random.key(1), (2, 19, 32))  # 19: the chunked form pads its last chunk.
  np.testing.assert_allclose(_jit_call(attn, x), _np_lion_attention(attn, x, variant), rtol=2e-4, atol=2e-5)


def test_padding_is_invisible_to_the_tokens():
  """A padded sequence's tokens get what they would get alone, in every form (LION-S, whose decays
  would otherwise reach across the padding)."""
  x = jax.random.normal(jax.random.key(2), (2, 16, 32))
  mask = jnp.asarray([[1] * 16, [1] * 11 + [0] * 5], jnp.float32)
  alone = _jit_call(_attention("lion_s", "full"), x[1:, :11])
  for form in lion.LION_FORMS:
    padded = _jit_call(_attention("lion_s", form), x, mask)
    np.testing.assert_allclose(padded[1, :11], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["lion_s"])
def test_gradients_of_the_forms_agree(variant):
  x = jax.random.normal(jax.random.key(3), (2, 13, 32))
  weights = jax.random.normal(jax.random.key(4), (2, 13, 32))
  grads = {}
  for form in lion.LION_FORMS:
    graphdef, state = nnx.split(_attention(variant, form))

    def loss(state, x):
      return jnp.sum(nnx.merge(graphdef, state)(x) * weights)

    grads[form] = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
  for form in ("chunked", "rnn"):
    for a, b in zip(jax.tree.leaves(grads[form]), jax.tree.leaves(grads["full"]), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_mask_is_the_symmetric_product_of_decays():
  log_lam = -jax.nn.softplus(jax.random.normal(jax.random.key(5), (1, 12, 2)))
  c = lion.cumulative_log_decay(log_lam, 12)
  pos = jnp.arange(12)
  m = np.asarray(jnp.exp(lion.log_mask(c, c, pos, pos)))[0]  # (heads, 12, 12)
  lam = np.exp(np.asarray(log_lam, np.float64))[0]
  for h in range(2):
    np.testing.assert_allclose(m[h], _np_mask(lam[:, h]), rtol=1e-5)
    np.testing.assert_allclose(m[h], m[h].T)
    np.testing.assert_array_equal(np.diag(m[h]), 1.0)
    # Semiseparable: the weight between i < k < j passes through k.
    np.testing.assert_allclose(m[h, 2, 9], m[h, 2, 5] * m[h, 5, 9], rtol=1e-5)
  # LION-D: c_t = t log lambda_h gives lambda_h^|i-j|.
  lam_d = np.asarray([0.5, 0.9])
  c = lion.cumulative_log_decay(jnp.log(jnp.asarray(lam_d, jnp.float32)), 12)
  m = np.asarray(jnp.exp(lion.log_mask(c, c, pos, pos)))[0]
  distance = np.abs(np.arange(12)[:, None] - np.arange(12)[None, :])
  np.testing.assert_allclose(m, lam_d[:, None, None] ** distance, rtol=1e-5)
  # The reverse scan's decay at step i is log lambda_{i+1}.
  np.testing.assert_array_equal(lion.backward_log_decay(log_lam)[:, :-1], log_lam[:, 1:])


def test_strong_decay_keeps_gradients_finite():
  """Cumulative log decays of -30 per token reach -1900; exponentiating the unselected triangle,
  e^{+1900}, would make the gradient NaN, so the triangle must be chosen first."""
  q, k = (jax.nn.softplus(jax.random.normal(jax.random.key(i), (1, 64, 2, 4))) for i in (6, 7))
  v = jax.random.normal(jax.random.key(8), (1, 64, 2, 4))
  log_lam = jnp.full((1, 64, 2), -30.0)
  for form in ("full", "chunked"):  # The forms that build the mask; "rnn" only ever multiplies decays.
    grads = jax.jit(jax.grad(lambda q, k, v, g: jnp.sum(lion.lion_attention(q, k, v, g, form=form, chunk_size=16)),
                             argnums=(0, 1, 2, 3)))(q, k, v, log_lam)
    assert all(np.isfinite(g).all() for g in grads), form


@pytest.mark.parametrize("variant", ["lion_d", "lion_s"])
def test_long_padding_under_strong_decay_stays_finite(variant):
  """40 tokens and 24 padding positions with decays e^-30: no padding row may divide 0 by 0."""
  x = jax.random.normal(jax.random.key(11), (1, 64, 32))
  mask = (jnp.arange(64) < 40).astype(jnp.float32)[None]
  for form in lion.LION_FORMS:
    attn = _attention(variant, form)
    if variant == "lion_d":
      attn.decay_logit[...] = jnp.full((4,), -30.0)
    else:
      attn.decay_proj.bias[...] = jnp.full((4,), 30.0)
    graphdef, state = nnx.split(attn)

    def loss(state, x):
      return jnp.sum(nnx.merge(graphdef, state)(x, mask))

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads)), form


def test_same_weights_run_every_form_of_the_whole_model():
  cfg = tiny_config("lion_s").model
  model = _randomize(lm.build(cfg, seed=1), seed=1, scale=0.1)
  tokens = jax.random.randint(jax.random.key(9), (2, 21), 0, 257)
  expected = _jit_call(model, tokens)
  for form in ("chunked", "rnn"):
    other = copy.deepcopy(cfg)
    other.lion_form = form
    graphdef, _ = nnx.split(lm.abstract(other))
    np.testing.assert_allclose(_jit_call(nnx.merge(graphdef, nnx.state(model)), tokens), expected,
                               rtol=1e-4, atol=1e-4)


def test_encoder_is_bidirectional_and_refuses_causal_decoding():
  cfg = tiny_config("lion_d").model
  model = lm.build(cfg)
  tokens = jax.random.randint(jax.random.key(10), (1, 12), 0, 257)
  changed = tokens.at[0, 8].set((tokens[0, 8] + 1) % 257)
  logits = _jit_call(model, jnp.concatenate([tokens, changed]))
  assert not np.allclose(logits[0, :8], logits[1, :8])  # Earlier outputs see token 8.
  with pytest.raises(UserError, match="bidirectional encoder.*no causal decoding"):
    model.init_cache(1, 12)


# Masked-LM data.


def test_mlm_masking_rates():
  tokens = np.random.default_rng(0).integers(0, 256, (400, 500)).astype(np.int32)
  masked = data.MaskedLM(mask_id=257, vocab_size=257)({"inputs": tokens}, np.random.default_rng(1))
  chosen = masked["weights"] == 1
  np.testing.assert_array_equal(masked["targets"], tokens)
  np.testing.assert_array_equal(masked["inputs"][~chosen], tokens[~chosen])
  assert chosen.mean() == pytest.approx(0.15, abs=0.003)
  inputs, original = masked["inputs"][chosen], tokens[chosen]
  assert (inputs == 257).mean() == pytest.approx(0.8, abs=0.01)
  assert (inputs == original).mean() == pytest.approx(0.1 + 0.1 / 257, abs=0.01)  # Kept, or drawn again.
  replaced = (inputs != 257) & (inputs != original)
  assert replaced.mean() == pytest.approx(0.1 * 256 / 257, abs=0.01)
  assert inputs.max() <= 257 and masked["inputs"].dtype == np.int32


TOKENS = np.arange(24 * 8 + 1, dtype=np.int32) % 256


def _mlm_iterator(seed=0, process_index=0, process_count=1):
  return data.make_train_iterator(TOKENS, seq_len=8, global_batch_size=8, seed=seed, process_index=process_index,
                                  process_count=process_count, mlm=data.MaskedLM(mask_id=257, vocab_size=257, rate=0.5))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_mlm_masks_are_deterministic_and_resume_exactly():
  first, again, other = (_take(_mlm_iterator(seed), 6) for seed in (3, 3, 4))
  assert set(first[0]) == {"inputs", "targets", "weights"}
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert any((a["weights"] != b["weights"]).any() for a, b in zip(first, other))
  # An epoch later the same windows get fresh masks.
  epoch = [(tuple(r), tuple(w)) for b in first[:3] for r, w in zip(b["targets"], b["weights"])]
  later = [(tuple(r), tuple(w)) for b in first[3:] for r, w in zip(b["targets"], b["weights"])]
  assert sorted(r for r, _ in epoch) == sorted(r for r, _ in later) and epoch != later

  iterator = _mlm_iterator(5)
  _take(iterator, 4)
  state = iterator.get_state()
  expected = _take(iterator, 5)
  resumed = _mlm_iterator(5)
  resumed.set_state(state)
  for a, b in zip(_take(resumed, 5), expected):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_mlm_masks_follow_the_global_order_across_processes():
  single = _take(_mlm_iterator(6), 3)
  halves = [_take(_mlm_iterator(6, p, 2), 3) for p in range(2)]
  for step in range(3):
    # Process p holds global positions p, p + 2, ...: rows p::2 of the single-process batch.
    for p in range(2):
      for key in single[step]:
        np.testing.assert_array_equal(halves[p][step][key], single[step][key][p::2])


def test_mlm_needs_a_vocab_slot_for_the_mask_token(tmp_path):
  config = tiny_config("lion_lit", **{"model.vocab_size": 257})
  with pytest.raises(UserError, match=r"mask token \(id 257\).*set --config.model.vocab_size=258"):
    trainer.train(config, str(tmp_path), progress=False)


def test_objectives_must_fit_the_architecture():
  with pytest.raises(UserError, match="bidirectional encoder.*--config.objective=mlm"):
    trainer.check_objective(tiny_config("lion_s", objective="causal_lm"))
  with pytest.raises(UserError, match="needs a bidirectional encoder"):
    trainer.check_objective(tiny_config("gpt", objective="mlm"))
  with pytest.raises(UserError, match="objective must be one of"):
    trainer.check_objective(tiny_config("lion_s", objective="mln"))


# Training.


def _records(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _mlm_run(variant, workdir, steps=16):
  config = tiny_config(variant, total_steps=steps, learning_rate=5e-3, log_every=4, val_every=steps,
                       checkpoint_every=steps, **{"model.n_layer": 1})
  return trainer.train(config, workdir, progress=False)


def _check_mlm_run(workdir, result):
  records = _records(workdir)
  assert records[-1]["loss"] < records[0]["loss"] - 0.5  # From about ln(258) = 5.55.
  assert 0 <= records[-1]["accuracy"] <= 1 and 0 < result.val_accuracy < 1


@pytest.mark.parametrize("variant", ["lion_lit", "lion_s"])
def test_mlm_training_lowers_the_loss(variant, tmp_path):
  _check_mlm_run(str(tmp_path), _mlm_run(variant, str(tmp_path)))


def test_boolq_fine_tuning_from_an_mlm_run(tmp_path):
  """LION-D: pretrain (its MLM smoke test), fine-tune on 240 BoolQ records, report accuracy."""
  mlm_dir, cls_dir = str(tmp_path / "mlm"), str(tmp_path / "boolq")
  _check_mlm_run(mlm_dir, _mlm_run("lion_d", mlm_dir))
  if not os.path.isfile(BOOLQ):
    pytest.skip(f"BoolQ not found at {BOOLQ}")

  boolq = tmp_path / "boolq.jsonl"
  with open(BOOLQ) as f:
    boolq.write_text("".join(itertools.islice(f, 240)))
  config = tiny_config("lion_d", objective="classification", init_from=mlm_dir, total_steps=8, log_every=4,
                       val_every=8, learning_rate=1e-3, seq_len=64,
                       **{"model.n_layer": 1, "data.train_files": (str(boolq),), "data.text_field": "query",
                          "data.val_fraction": 0.25})
  # The encoder starts as the MLM run's, the head from scratch.
  fine_tuner = trainer.Trainer(config, cls_dir)
  state = fine_tuner.load_encoder(fine_tuner.init_state(), mlm_dir)
  pretrained = nnx.state(evaluate.load(mlm_dir).model)
  for a, b in zip(jax.tree.leaves(state["params"]["encoder"]), jax.tree.leaves(pretrained), strict=True):
    np.testing.assert_array_equal(a, b)

  result = trainer.train(config, cls_dir, progress=False)
  records = _records(cls_dir)
  assert records[-1]["val_accuracy"] == result.val_accuracy

  # The reported accuracy is the fine-tuned model's over all 60 held-out records.
  tokenizer = ByteTokenizer()
  _, held_out = data.load_classification(config.data, tokenizer, seq_len=64, num_classes=2)
  assert len(held_out) == 60
  logits = _jit_call(evaluate.load(cls_dir).model, held_out.arrays["inputs"], held_out.arrays["mask"])
  accuracy = float(np.mean(np.argmax(logits, -1) == held_out.arrays["targets"]))
  assert result.val_accuracy == pytest.approx(accuracy, abs=1e-6)
  majority = np.bincount(held_out.arrays["targets"]).max() / 60
  print(f"BoolQ slice: accuracy {accuracy:.1%} against the majority baseline {majority:.1%} "
        "(62.2% on the whole set)")


def test_classification_labels_are_checked(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"query": "a", "gold": 1}\n{"query": "b", "gold": 2}\n')
  with pytest.raises(UserError, match=r"bad.jsonl:2: expected an integer 'gold' field in 0..1"):
    data.read_classification([str(bad)], ByteTokenizer(), seq_len=8, text_field="query", label_field="gold",
                              num_classes=2)


def test_long_queries_keep_their_end_and_eval_batches_cover_every_record(tmp_path):
  path = tmp_path / "q.jsonl"
  path.write_text("".join(json.dumps({"query": text, "gold": i % 2}) + "\n"
                          for i, text in enumerate(["Passage: long\nQuestion: q?", "ab", "c", "d", "e"])))
  examples = data.read_classification([str(path)], ByteTokenizer(), seq_len=6, text_field="query",
                                      label_field="gold", num_classes=2)
  assert bytes(examples.arrays["inputs"][0].tolist()) == b"on: q?"  # The last 6 bytes.
  np.testing.assert_array_equal(examples.arrays["mask"][1], [1, 1, 0, 0, 0, 0])
  batches = data.make_example_batches(examples, batch_size=2)
  assert len(batches) == 3 and sum(b["weights"].sum() for b in batches) == 5
  np.testing.assert_array_equal(batches[-1]["weights"], [1, 0])


# Memory and sizes.


def _bench():
  spec = importlib.util.spec_from_file_location("bench_lion_memory",
                                                os.path.join(REPO, "scripts", "bench_lion_memory.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_rnn_memory_grows_linearly_and_full_memory_quadratically():
  bench = _bench()
  # 4x the length: quadratic memory grows ~16x, linear ~4x. Short lengths would let fixed buffers
  # (which GPU compilers keep more of than the CPU) blur the two.
  temp = {form: [bench.temp_bytes("lion_s", form, n, d_model=64, n_head=4) for n in (256, 1024)]
          for form in ("full", "rnn")}
  assert temp["full"][1] / temp["full"][0] > 10
  assert temp["rnn"][1] / temp["rnn"][0] < 5
  assert temp["rnn"][1] < temp["full"][1] / 4


def _lion_count(n_layer, d, n_head, variant, vocab):
  """Counted independently: per block qkv and out (with biases), two LayerNorms, the 4d FFN and the
  variant's decay parameters; the embeddings, positions, embedding LayerNorm, MLM transform and its
  LayerNorm."""
  decay = {"lion_lit": 0, "lion_d": n_head, "lion_s": d * n_head + n_head}[variant]
  per_block = (3 * d * d + 3 * d) + (d * d + d) + 4 * d + (4 * d * d + 4 * d) + (4 * d * d + d) + decay
  return n_layer * per_block + vocab * d + 512 * d + 2 * d + (d * d + d) + 2 * d


@pytest.mark.parametrize("variant", lion.LION_VARIANTS)
def test_parameter_counts_match_bert(variant):
  for size in ("base", "large"):
    config = config_lib.load(os.path.join(REPO, "configs", f"{variant}.py:{size}"))
    n_layer, d, n_head = lion_common.BERT_SIZES[size]
    assert lm.count_params(lm.abstract(config.model)) == _lion_count(n_layer, d, n_head, variant, 50280)
    # With BERT's WordPiece vocabulary (30522, padded to 30528) the body is BERT's.
    config.model.vocab_size = 30522
    n = lm.count_params(lm.abstract(config.model))
    assert n == _lion_count(n_layer, d, n_head, variant, 30528)
    assert abs(n / BERT_PARAMS[size] - 1) < 0.005, (size, n)


def test_boolq_variant_fine_tunes_the_same_size():
  config = config_lib.load(os.path.join(REPO, "configs", "lion_s.py:tiny_boolq"))
  assert config.objective == "classification" and config.init_from == os.path.join("runs", "lion_s_tiny")
  assert config.model.to_dict() == config_lib.load(os.path.join(REPO, "configs", "lion_s.py:tiny")).model.to_dict()
