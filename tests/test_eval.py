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
