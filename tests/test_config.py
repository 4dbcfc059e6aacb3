"""Config files, variants and command-line overrides."""

import glob
import importlib
import os

import pytest

from conftest import REPO
from seqmodels import config as config_lib
from seqmodels import lm, trainer
from seqmodels.errors import UserError

MAMBA_PUBLISHED = {"130m": 129.1e6, "370m": 371.5e6, "790m": 793.2e6, "1.4b": 1372.2e6, "2.8b": 2768.3e6}


def _gpt_count(n_layer, d, vocab=50280):
  """Transformer++ parameters, counted independently: qkv, out, SwiGLU, 2 norms per block."""
  ffn = 256 * -(-8 * d // 3 // 256) if (8 * d / 3) % 256 else 8 * d // 3
  per_block = 4 * d * d + 3 * d * ffn + 2 * d
  return n_layer * per_block + vocab * d + d


def _shipped_configs():
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    module = importlib.import_module(f"configs.{os.path.basename(path)[:-3]}")
    for variant in getattr(module, "VARIANTS", {}):
      yield f"{os.path.relpath(path, REPO)}:{variant}"


@pytest.mark.parametrize("spec", list(_shipped_configs()))
def test_every_shipped_config_builds(spec):
  config = config_lib.load(os.path.join(REPO, spec))
  n = lm.count_params(lm.abstract(config.model))
  name, variant = os.path.basename(spec).split(".py:")
  if name == "mamba" and variant in MAMBA_PUBLISHED:
    assert abs(n / MAMBA_PUBLISHED[variant] - 1) < 0.005, (spec, n)
  if name == "gpt" and variant != "tiny":
    assert n == _gpt_count(config.model.n_layer, config.model.d_model), (spec, n)
  model = lm.abstract(config.model)
  assert trainer.describe(config)["flops_per_token"] >= 6 * lm.matmul_params(model) > 0
  assert config.model.architecture in lm.ARCHITECTURES
  doc = importlib.import_module(f"configs.{name}").__doc__
  assert f"--config configs/{name}.py:" in doc  # The launch command is documented.


def test_overrides_keep_types():
  config = config_lib.load(os.path.join(REPO, "configs/mamba.py:tiny"))
  overrides, rest = config_lib.split_override_args([
      "--config.total_steps=5", "--config.learning_rate", "1e-4", "--config.model.tie_embeddings=false",
      "--config.data.train_files=a.txt,b.jsonl", "--config.data.tokenizer=gpt-neox", "--other"])
  config_lib.apply_overrides(config, overrides)
  assert rest == ["--other"]
  assert config.total_steps == 5 and config.learning_rate == 1e-4
  assert config.model.tie_embeddings is False
  assert config.data.train_files == ("a.txt", "b.jsonl")
  assert config.data.tokenizer == "gpt-neox"


@pytest.mark.parametrize("override, message", [
    (("totl_steps", "5"), "unknown config key 'totl_steps': config has no 'totl_steps'; did you mean 'total_steps'"),
    (("model.nope", "5"), "config.model has no 'nope'"),
    (("total_steps", "1.5"), "expected a int"),
    (("model.tie_embeddings", "maybe"), "use true or false"),
    (("model", "3"), "a whole section cannot be set"),
])
def test_bad_overrides_name_the_problem(override, message):
  config = config_lib.load(os.path.join(REPO, "configs/mamba.py:tiny"))
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_lib.apply_overrides(config, [override])


def test_unknown_variant_lists_known_ones():
  with pytest.raises(UserError, match="known: tiny, 130m, 370m, 790m, 1.4b, 2.8b"):
    config_lib.load(os.path.join(REPO, "configs/mamba.py:9b"))


def test_config_json_round_trip(tmp_path):
  config = config_lib.load(os.path.join(REPO, "configs/gpt.py:125m"))
  path = tmp_path / "c.json"
  path.write_text(config_lib.to_json(config))
  assert config_lib.from_json_file(str(path)).to_dict() == config.to_dict()
