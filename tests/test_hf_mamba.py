"""Hugging Face / state-spaces Mamba checkpoints: parity with transformers, round trips, bad files.

tests/fixtures/hf_mamba_tiny comes from scripts/make_hf_mamba_fixture.py: a random transformers
MambaForCausalLM (2 layers, d_model 48, vocab 264) saved by save_pretrained, the same weights in the
state-spaces layout, and transformers' float32 logits for fixed input ids.
"""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx, traverse_util

from conftest import REPO, tiny_config
from seqmodels import evaluate, hf_mamba, lm, trainer
from seqmodels.errors import UserError

FIXTURE = os.path.join(REPO, "tests", "fixtures", "hf_mamba_tiny")
REFERENCE = np.load(os.path.join(FIXTURE, "logits.npz"))


def _convert_script():
  path = os.path.join(REPO, "scripts", "convert_checkpoint.py")
  spec = importlib.util.spec_from_file_location("convert_checkpoint", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _assert_reference_logits(model):
  logits = np.asarray(model(REFERENCE["input_ids"]))
  np.testing.assert_allclose(logits, REFERENCE["logits"], rtol=1e-4, atol=1e-4)


def _user_error(match, fn, *args):
  with pytest.raises(UserError, match=match) as info:
    fn(*args)
  assert "\n" not in str(info.value)


def _assert_same_tree(a, b):
  flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=str(key))


# Parity with transformers.

@pytest.mark.parametrize("layout", ["hf", "state_spaces"])
def test_logits_match_transformers(layout):
  # state_spaces/ also holds pytorch_model.bin, but model.safetensors comes first.
  model, config = hf_mamba.load_hf_mamba(os.path.join(FIXTURE, layout))
  model_cfg = config.model
  assert isinstance(model, lm.LanguageModel)
  assert (model_cfg.n_layer, model_cfg.d_model, model_cfg.d_state, model.vocab_size) == (2, 48, 16, 264)
  _assert_reference_logits(model)


def test_state_spaces_pytorch_bin(tmp_path):
  pytest.importorskip("torch")
  for name in ("config.json", "pytorch_model.bin"):
    shutil.copy(os.path.join(FIXTURE, "state_spaces", name), tmp_path)
  _assert_reference_logits(hf_mamba.load_hf_mamba(str(tmp_path))[0])


def test_pytorch_bin_without_torch_is_a_user_error(tmp_path):
  if importlib.util.find_spec("torch") is not None:
    pytest.skip("torch is installed")
  for name in ("config.json", "pytorch_model.bin"):
    shutil.copy(os.path.join(FIXTURE, "state_spaces", name), tmp_path)
  _user_error("torch is not installed.*model.safetensors", hf_mamba.load_hf_mamba, str(tmp_path))


def test_sharded_index_loads(tmp_path):
  tensors = hf_mamba.read_safetensors(os.path.join(FIXTURE, "hf", "model.safetensors"))
  names = sorted(tensors)
  shards = {"a.safetensors": names[:10], "b.safetensors": names[10:]}
  for file, part in shards.items():
    hf_mamba.write_safetensors(str(tmp_path / file), {n: tensors[n] for n in part})
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    json.dump({"weight_map": {n: file for file, part in shards.items() for n in part}}, f)
  shutil.copy(os.path.join(FIXTURE, "hf", "config.json"), tmp_path)
  _assert_reference_logits(hf_mamba.load_hf_mamba(str(tmp_path))[0])


# Round trips.

@pytest.mark.parametrize("layout,overrides", [
    ("hf", {}),
    ("hf", {"model.tie_embeddings": False}),
    ("state-spaces", {"model.norm": "layernorm", "model.tie_embeddings": False}),
    ("state-spaces", {}),
])
def test_ours_to_checkpoint_to_ours_is_identical(tmp_path, layout, overrides):
  cfg = tiny_config("mamba", **overrides).model
  params = nnx.to_pure_dict(nnx.state(lm.build(cfg, seed=3)))
  hf_mamba.save_checkpoint(str(tmp_path), cfg, params, layout)
  config, _, loaded = hf_mamba.load_params(str(tmp_path))
  _assert_same_tree(params, loaded)
  for key in ("d_model", "n_layer", "d_state", "expand", "d_conv", "norm", "tie_embeddings"):
    assert config.model[key] == cfg[key], key


def test_export_reproduces_transformers_files(tmp_path):
  model, config = hf_mamba.load_hf_mamba(os.path.join(FIXTURE, "hf"))
  hf_mamba.save_checkpoint(str(tmp_path), config.model, nnx.to_pure_dict(nnx.state(model)))
  _assert_same_tree(hf_mamba.read_safetensors(os.path.join(FIXTURE, "hf", "model.safetensors")),
                    hf_mamba.read_safetensors(str(tmp_path / "model.safetensors")))
  with open(os.path.join(FIXTURE, "hf", "config.json")) as f:
    reference = json.load(f)
  with open(tmp_path / "config.json") as f:
    written = json.load(f)
  assert {k: reference[k] for k in written if k != "pad_vocab_size_multiple"} == \
      {k: v for k, v in written.items() if k != "pad_vocab_size_multiple"}


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  command = _convert_script().import_checkpoint(os.path.join(FIXTURE, "hf"), workdir)
  return workdir, command


def test_imported_workdir_evaluates_resumes_and_exports(imported_run, tmp_path):
  workdir, command = imported_run
  loaded = evaluate.load(workdir)
  assert loaded.step == 0
  _assert_reference_logits(loaded.model)

  # train.py with the printed flags resumes from step 0; at learning rate 0 the weights stay put.
  # The changed learning rate and length make it another config, hence override_config.
  spec = command[command.index("train.py") + 1].removeprefix("--config=")
  overrides = [a for a in command if a.startswith("--config.")] + ["--config.learning_rate=0.0",
                                                                   "--config.total_steps=1"]
  result = trainer.train(trainer.resolved_config(spec, overrides), workdir, progress=False, override_config=True)
  assert result.step == 1
  loaded = evaluate.load(workdir, 1)
  _assert_reference_logits(loaded.model)

  out = str(tmp_path / "hf")
  assert _convert_script().main(["--from_workdir", workdir, "--step", "1", "--to_checkpoint", out]) == 0
  _assert_same_tree(hf_mamba.read_safetensors(os.path.join(FIXTURE, "hf", "model.safetensors")),
                    hf_mamba.read_safetensors(os.path.join(out, "model.safetensors")))


def test_import_refuses_an_existing_run(imported_run, capsys):
  workdir, _ = imported_run
  assert _convert_script().main(["--from_checkpoint", os.path.join(FIXTURE, "hf"), "--to_workdir", workdir]) == 1
  assert "already holds a run" in capsys.readouterr().err


# Safetensors reading and bad files.

def _raw_safetensors(path, header, data=b""):
  text = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(text).to_bytes(8, "little") + text + data)


def test_safetensors_dtypes(tmp_path):
  values = np.array([[1.5, -2.25, 3.0e-3], [65504.0, -0.0, 7.0]], np.float32)
  half = values.astype("<f2").tobytes()
  bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()  # Exact: these values fit in bfloat16's 8 bits.
  ints = np.arange(4, dtype="<i8").tobytes()
  path = str(tmp_path / "x.safetensors")
  _raw_safetensors(path, {
      "__metadata__": {"format": "pt"},
      "h": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]},
      "b": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [12, 24]},
      "i": {"dtype": "I64", "shape": [4], "data_offsets": [24, 56]},
  }, half + bf16 + ints)
  tensors = hf_mamba.read_safetensors(path)
  np.testing.assert_array_equal(tensors["h"], values.astype(np.float16).astype(np.float32))
  np.testing.assert_array_equal(tensors["b"], (values.view(np.uint32) & 0xFFFF0000).view(np.float32))
  assert tensors["h"].dtype == tensors["b"].dtype == np.float32
  np.testing.assert_array_equal(tensors["i"], np.arange(4))


def test_safetensors_writer_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"a.weight": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float32),
             "scalar": np.float32(2.0).reshape(())}
  path = str(tmp_path / "x.safetensors")
  hf_mamba.write_safetensors(path, tensors)
  with open(path, "rb") as f:
    assert (8 + int.from_bytes(f.read(8), "little")) % 8 == 0
  _assert_same_tree(tensors, hf_mamba.read_safetensors(path))


@pytest.mark.parametrize("header,data,match", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 8, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "malformed"),
    ({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "not supported"),
])
def test_safetensors_bad_header_is_rejected(tmp_path, header, data, match):
  path = str(tmp_path / "x.safetensors")
  _raw_safetensors(path, header, data)
  _user_error(match, hf_mamba.read_safetensors, path)


def test_safetensors_truncated_or_garbage(tmp_path):
  path = str(tmp_path / "x.safetensors")
  with open(path, "wb") as f:
    f.write(b"\x05\0")
  _user_error("shorter than", hf_mamba.read_safetensors, path)
  with open(path, "wb") as f:
    f.write((1000).to_bytes(8, "little") + b"{}")
  _user_error("truncated", hf_mamba.read_safetensors, path)
  with open(path, "wb") as f:
    f.write((4).to_bytes(8, "little") + b"{{{{")
  _user_error("no valid safetensors JSON header", hf_mamba.read_safetensors, path)


def _copy_fixture(tmp_path):
  directory = tmp_path / "ckpt"
  shutil.copytree(os.path.join(FIXTURE, "hf"), directory)
  return str(directory)


def test_bad_checkpoint_directories(tmp_path):
  directory = _copy_fixture(tmp_path)
  weights = os.path.join(directory, "model.safetensors")
  config = os.path.join(directory, "config.json")
  tensors = hf_mamba.read_safetensors(weights)

  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) - 100)
  _user_error("data_offsets", hf_mamba.load_hf_mamba, directory)

  hf_mamba.write_safetensors(weights, {**tensors, "backbone.layers.0.mixer.extra": np.zeros(2, np.float32)})
  _user_error("no place for.*mixer.extra", hf_mamba.load_hf_mamba, directory)

  hf_mamba.write_safetensors(weights, {k: v for k, v in tensors.items() if "layers.1.mixer.D" not in k})
  _user_error("no tensor 'backbone.layers.1.mixer.D'", hf_mamba.load_hf_mamba, directory)

  hf_mamba.write_safetensors(weights, {**tensors, "lm_head.weight": tensors["backbone.embeddings.weight"] + 1})
  _user_error("different lm_head.weight", hf_mamba.load_hf_mamba, directory)

  hf_mamba.write_safetensors(weights, tensors)
  with open(config) as f:
    raw = json.load(f)
  with open(config, "w") as f:
    json.dump({**raw, "state_size": 8}, f)
  _user_error("A_log' has shape \\(96, 16\\), but config.json implies \\(96, 8\\)", hf_mamba.load_hf_mamba, directory)
  with open(config, "w") as f:
    json.dump({**raw, "model_type": "mamba2"}, f)
  _user_error("not Mamba", hf_mamba.load_hf_mamba, directory)
  with open(config, "w") as f:
    json.dump({k: v for k, v in raw.items() if k != "num_hidden_layers"}, f)
  _user_error("lacks the key 'num_hidden_layers'", hf_mamba.load_hf_mamba, directory)
  with open(config, "w") as f:
    f.write("{not json")
  _user_error("not valid JSON", hf_mamba.load_hf_mamba, directory)
  os.remove(config)
  _user_error("no config.json", hf_mamba.load_hf_mamba, directory)

  with open(config, "w") as f:
    json.dump(raw, f)
  os.remove(weights)
  _user_error("has none of model.safetensors", hf_mamba.load_hf_mamba, directory)


def test_missing_directory(tmp_path):
  _user_error("does not exist", hf_mamba.load_hf_mamba, str(tmp_path / "nowhere"))


def test_checkpoint_without_conv_bias_loads_a_zero_bias(tmp_path):
  directory = _copy_fixture(tmp_path)
  tensors = hf_mamba.read_safetensors(os.path.join(directory, "model.safetensors"))
  hf_mamba.write_safetensors(os.path.join(directory, "model.safetensors"),
                             {k: v for k, v in tensors.items() if not k.endswith("conv1d.bias")})
  with open(os.path.join(directory, "config.json")) as f:
    raw = json.load(f)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({**raw, "use_conv_bias": False}, f)
  _, _, params = hf_mamba.load_params(directory)
  for block in params["backbone"]["blocks"].values():
    np.testing.assert_array_equal(block["mixer"]["conv1d"]["bias"], 0.0)


def test_index_may_not_name_files_outside_the_directory(tmp_path):
  directory = _copy_fixture(tmp_path)
  shutil.copy(os.path.join(directory, "model.safetensors"), tmp_path / "outside.safetensors")
  os.remove(os.path.join(directory, "model.safetensors"))
  for escape in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump({"weight_map": {"backbone.norm_f.weight": escape}}, f)
    _user_error("outside its directory", hf_mamba.load_hf_mamba, directory)


def test_eval_cli_scores_a_hugging_face_checkpoint(tmp_path):
  import shutil
  import subprocess
  import sys
  checkpoint = tmp_path / "mamba-tiny-hf"
  shutil.copytree(os.path.join(FIXTURE, "hf"), checkpoint)
  text = tmp_path / "t.txt"
  text.write_text("A short text to score.")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(checkpoint), "--text", str(text),
                        "--tokenizer", "byte"], cwd=repo, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  result = json.load(open(str(checkpoint) + ".eval.json"))
  assert result["text"]["all"]["tokens"] == len("A short text to score.")
  assert result["checkpoint"] == str(checkpoint)
