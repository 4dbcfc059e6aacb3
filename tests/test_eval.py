"""eval.py: perplexity and bits per byte of a trained checkpoint on text files."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import optax
import pytest

from conftest import REPO, tiny_config
from seqmodels import evaluate, trainer
from seqmodels.errors import UserError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  trainer.train(tiny_config("mamba", total_steps=4), workdir, progress=False)
  return workdir


def test_perplexity_matches_a_direct_forward_pass(trained, tmp_path):
  text = "To be, or not to be."  # Shorter than seq_len (32): one window.
  path = tmp_path / "t.txt"
  path.write_text(text)
  loaded = evaluate.load(trained)
  results = evaluate.text_perplexity(loaded, [str(path)], progress=False)
  tokens = np.asarray([256] + list(text.encode()))  # EOS, then the bytes.
  logits = loaded.model(tokens[None, :-1])
  nll = float(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[None, 1:]).sum())
  r = results[str(path)]
  assert r["tokens"] == len(text.encode())
  np.testing.assert_allclose(r["ppl"], math.exp(nll / len(text)), rtol=1e-5)
  np.testing.assert_allclose(r["bits_per_byte"], nll / math.log(2) / len(text), rtol=1e-5)


def test_eval_cli_writes_json(trained, tmp_path):
  a, b = tmp_path / "a.txt", tmp_path / "b.txt"
  a.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 5)
  b.write_text("All:\nSpeak, speak.\n" * 7)
  out = subprocess.run([sys.executable, "eval.py", "--workdir", trained, "--text", str(a), str(b)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "| all |" in out.stdout
  result = json.load(open(os.path.join(trained, "eval", "4.json")))
  assert result["step"] == 4
  texts = result["text"]
  assert texts["all"]["tokens"] == texts[str(a)]["tokens"] + texts[str(b)]["tokens"]
  assert texts["all"]["bytes"] == len(a.read_bytes()) + len(b.read_bytes())
  assert 1 < texts["all"]["ppl"] < 264


def test_missing_step_and_missing_workdir(trained, tmp_path):
  with pytest.raises(UserError, match=r"no checkpoint for step 3 .* available: \[4\]"):
    evaluate.load(trained, step=3)
  with pytest.raises(UserError, match="no config.json"):
    evaluate.load(str(tmp_path))


@pytest.mark.parametrize("context", [0, 5, 31])
def test_sliding_windows_score_each_token_once_with_enough_context(context):
  tokens = np.arange(100) + 1000
  inputs, targets, mask = evaluate.scoring_windows(tokens, 32, context)
  scored = [(w, i) for w in range(len(inputs)) for i in range(32) if mask[w, i]]
  assert sorted(targets[w, i] for w, i in scored) == list(tokens[1:])  # Every token but the first, once.
  for w, i in scored:
    np.testing.assert_array_equal(inputs[w, i], targets[w, i] - 1)
    assert w == 0 or i >= context  # At least `context` tokens precede it in its window.


def test_long_text_perplexity_uses_the_context(trained, tmp_path):
  path = tmp_path / "long.txt"
  path.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 3)
  loaded = evaluate.load(trained)
  text = path.read_text()
  tokens = np.asarray([256] + list(text.encode()))
  nll = optax.softmax_cross_entropy_with_integer_labels(loaded.model(tokens[None, :-1]), tokens[None, 1:])[0]
  # An independent count: each token scored by the window that ends at it or later, context 16.
  expected, window_nll = 0.0, {}
  for j in range(1, len(tokens)):
    start = 0 if j <= 32 else (j - 32 - 1) // 16 * 16 + 16
    if start not in window_nll:
      window = tokens[start:start + 33]
      window_nll[start] = optax.softmax_cross_entropy_with_integer_labels(
          loaded.model(window[None, :-1]), window[None, 1:])[0]
    expected += float(window_nll[start][j - start - 1])
  r = evaluate.text_perplexity(loaded, [str(path)], context=16, progress=False)[str(path)]
  np.testing.assert_allclose(r["loss"] * r["tokens"], expected, rtol=1e-5)
  assert r["tokens"] == len(tokens) - 1
  full = float(nll.sum())
  assert abs(r["loss"] * r["tokens"] - full) > 1e-3  # The model has seq_len 32: windows differ from one pass.
