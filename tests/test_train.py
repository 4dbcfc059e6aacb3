"""The training loop: learning, exact resume, metrics, signals, dry runs and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, tiny_config
from seqmodels import checkpoint, trainer


def _final_params(workdir, config):
  t = trainer.Trainer(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, keep=10)
  state = ckpt.restore(ckpt.latest_step(), t.abstract_state)
  ckpt.close()
  return jax.device_get(state)


def test_resumed_run_is_bitwise_identical(tmp_path):
  config = tiny_config("mamba", total_steps=8, checkpoint_every=100)
  straight = trainer.train(config, str(tmp_path / "straight"), progress=False)
  first = trainer.train(config, str(tmp_path / "resumed"), max_steps=4, progress=False)
  assert first.step == 4
  second = trainer.train(config, str(tmp_path / "resumed"), progress=False)
  assert second.step == 8
  a = _final_params(str(tmp_path / "straight"), config)
  b = _final_params(str(tmp_path / "resumed"), config)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  assert straight.val_loss == second.val_loss

  records = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert [r["step"] for r in records] == [2, 4, 6, 8]
  for r in records:
    assert {"loss", "lr", "grad_norm", "tokens_per_sec"} <= set(r)
  assert "val_loss" in records[1] and "val_loss" in records[3]
  assert os.listdir(tmp_path / "resumed" / "tensorboard")
  saved = json.load(open(tmp_path / "resumed" / "config.json"))
  assert saved["model"]["architecture"] == "mamba"


def test_gpt_learns_the_corpus(tmp_path):
  config = tiny_config("gpt", total_steps=100, learning_rate=5e-3, val_every=100, log_every=10,
                       **{"model.d_model": 64, "model.n_head": 4})
  result = trainer.train(config, str(tmp_path / "gpt"), progress=False)
  records = [json.loads(line) for line in open(tmp_path / "gpt" / "metrics.jsonl")]
  assert records[-1]["loss"] < records[0]["loss"] - 1.0
  assert result.val_loss < 3.25  # The byte unigram entropy of the corpus is 3.31 nats.


def test_workdir_of_another_model_is_refused(tmp_path):
  trainer.train(tiny_config("mamba", total_steps=2), str(tmp_path), progress=False)
  from seqmodels.errors import UserError
  with pytest.raises(UserError, match=r"another model \(model.architecture: 'mamba' there, 'gpt' here"):
    trainer.train(tiny_config("gpt", total_steps=2), str(tmp_path), progress=False)


def _run_cli(*args, cwd=REPO, timeout=300):
  return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=cwd, capture_output=True,
                        text=True, timeout=timeout)


def test_dry_run_prints_config_params_and_flops():
  out = _run_cli("--config", "configs/mamba.py:130m", "--dry_run", "--config.seq_len=1024")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert "params: 129135360" in lines
  flops = [line for line in lines if line.startswith("flops_per_token: ")]
  assert len(flops) == 1 and float(flops[0].split()[1]) > 6 * 129135360
  assert '"seq_len": 1024' in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/mamba.py:tiny", "--config.modle.d_model=8"], "unknown config key 'modle.d_model'"),
    (["--config", "configs/mamba.py:tiny", "--config.model.d_modle=8"], "did you mean 'd_model'"),
    (["--config", "configs/mamba.py:tiny", "--config.total_steps=many"], "expected a int"),
    (["--config", "configs/mamba.py:9b"], "unknown variant '9b'"),
    (["--config", "configs/nope.py:tiny"], "config file 'configs/nope.py' not found"),
    (["--config", "configs/mamba.py:tiny", "--config.data.train_files=missing.txt"], "missing.txt"),
    (["--config", "configs/mamba.py:tiny", "--config.data.tokenizer=nope/tokenizer.json"], "nope/tokenizer.json"),
])
def test_bad_input_is_one_line_error(tmp_path, args, message):
  out = _run_cli(*args, "--workdir", str(tmp_path / "w"))
  assert out.returncode == 1
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
  assert message in lines[0]


def test_empty_corpus_is_one_line_error(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  out = _run_cli("--config", "configs/mamba.py:tiny", f"--config.data.train_files={empty}",
                 "--workdir", str(tmp_path / "w"))
  assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
  assert "empty" in out.stderr


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
  workdir = tmp_path / "run"
  args = ["--config", "configs/mamba.py:tiny", "--workdir", str(workdir), "--config.model.d_model=32",
          "--config.model.n_layer=1", "--config.seq_len=32", "--config.total_steps=100000",
          "--config.log_every=1", "--config.checkpoint_every=100000", "--config.mesh.data=1"]
  proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  signalled = time.time()
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 75, stderr
  # The bound: the current step plus one checkpoint write (milliseconds each here), with room for a busy CI machine.
  assert time.time() - signalled < 60
  assert "stopped by SIGTERM" in stderr
  steps = ocp.utils.checkpoint_steps(str(workdir / "checkpoints"))
  assert len(steps) == 1 and steps[0] >= 3

  # A shorter run than the saved config's is another config: it resumes only with --override_config.
  out = _run_cli(*args[:-7], "--config.model.d_model=32", "--config.model.n_layer=1", "--config.seq_len=32",
                 f"--config.total_steps={steps[0] + 2}", "--config.log_every=1", "--config.mesh.data=1",
                 "--override_config")
  assert out.returncode == 0, out.stderr
  assert f"resuming {workdir} from step {steps[0]}" in out.stderr
  assert f"--override_config: continuing {workdir} with total_steps: 100000 there, {steps[0] + 2} here" in out.stderr


def test_data_parallel_mesh_matches_one_device(tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by `make test`)")
  losses = {}
  for data_axis in (1, 8):
    config = tiny_config("mamba", total_steps=3, log_every=1, **{"mesh.data": data_axis})
    trainer.train(config, str(tmp_path / str(data_axis)), progress=False)
    losses[data_axis] = [json.loads(line)["loss"] for line in open(tmp_path / str(data_axis) / "metrics.jsonl")]
  np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5)


def test_mesh_larger_than_the_devices_is_refused():
  from seqmodels.errors import UserError
  from seqmodels.sharding import mesh_shape
  with pytest.raises(UserError, match="needs 16 devices but only 8"):
    mesh_shape({"data": 16, "fsdp": 1, "tensor": 1}, 8)
  with pytest.raises(UserError, match="does not divide 8 devices"):
    mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)


def test_checkpoint_of_another_shape_without_config_json_is_refused(tmp_path):
  from seqmodels.errors import UserError
  trainer.train(tiny_config("mamba", total_steps=2), str(tmp_path), progress=False)
  os.remove(tmp_path / "config.json")
  with pytest.raises(UserError, match=r"checkpoint .*/checkpoints/2 could not be restored into this model"):
    trainer.train(tiny_config("mamba", total_steps=4, **{"model.d_model": 48}), str(tmp_path), progress=False)


def test_seq_len_beyond_learned_positions_is_refused(tmp_path):
  from seqmodels.errors import UserError
  config = tiny_config("gpt2", seq_len=64, **{"model.max_positions": 32})
  with pytest.raises(UserError, match="seq_len 64 exceeds model.max_positions 32"):
    trainer.train(config, str(tmp_path), progress=False)
