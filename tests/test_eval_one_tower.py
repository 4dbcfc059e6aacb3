"""scripts/eval_one_tower.py: ParallelGPT scored through both towers and through the stronger one alone."""

import importlib.util
import json
import os

import jax.numpy as jnp
import pytest

from conftest import REPO, tiny_config
from seqmodels import checkpoint, evaluate, trainer

spec = importlib.util.spec_from_file_location("eval_one_tower", os.path.join(REPO, "scripts", "eval_one_tower.py"))
eval_one_tower = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_one_tower)


def test_one_tower_scores_equal_a_model_whose_mix_keeps_that_tower(tmp_path, capsys):
  config = tiny_config("parallel_gpt", total_steps=2, **{"model.n_head": 2})
  workdir = str(tmp_path / "pgpt")
  trainer.train(config, workdir, progress=False)
  text = tmp_path / "text.txt"
  text.write_text("All the world's a stage, and all the men and women merely players. " * 6)
  assert eval_one_tower.main(["--workdir", workdir, "--text", str(text), "--batch_size", "4"]) == 0
  with open(os.path.join(workdir, "eval", "one_tower_2.json")) as f:
    result = json.load(f)
  assert "one_tower" in capsys.readouterr().out

  # Independently: the both-tower forward with the mix saturated towards the kept tower.
  loaded = evaluate.load(workdir)
  both = evaluate.text_perplexity(loaded, [str(text)], batch_size=4, context=config.seq_len // 2, progress=False)
  loaded.model.backbone.mix[...] = jnp.asarray(40.0 if result["kept_tower"] == 0 else -40.0)
  alone = evaluate.text_perplexity(loaded, [str(text)], batch_size=4, context=config.seq_len // 2, progress=False)
  assert result["one_tower"]["ppl"] == pytest.approx(alone["all"]["ppl"], rel=1e-4)
  assert result["both_towers"]["ppl"] == pytest.approx(both["all"]["ppl"], rel=1e-4)
  assert result["one_tower"]["ppl"] != pytest.approx(result["both_towers"]["ppl"], rel=1e-4)


def test_other_architectures_are_refused(tmp_path, capsys):
  workdir = str(tmp_path / "gpt")
  checkpoint.write_config(workdir, tiny_config("gpt"))
  text = tmp_path / "t.txt"
  text.write_text("hello")
  assert eval_one_tower.main(["--workdir", workdir, "--text", str(text)]) == 1
  assert "pass a parallel_gpt run" in capsys.readouterr().err
