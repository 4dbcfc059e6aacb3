"""Reliability: kills, signals, corrupt checkpoints, failed writes, non-finite steps, config and path checks.

Every recovery is checked against an uninterrupted run: the final parameters must be bitwise equal.
"""

import ast
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, tiny_config
from seqmodels import checkpoint, data, nonfinite, trainer
from seqmodels.errors import UserError
from seqmodels.paths import safe_join

# The run every test resumes or breaks: 12 steps, checkpoints at 4, 8 and 12, the last 2 kept.
RUN = dict(total_steps=12, checkpoint_every=4, log_every=2, val_every=100, val_batches=1, keep_checkpoints=2,
           **{"model.n_layer": 1})


def _config(**overrides):
  return tiny_config("mamba", **{**RUN, **overrides})


def _state(workdir, step=None):
  config = checkpoint.read_config(workdir)
  ckpt = checkpoint.Checkpointer(workdir, keep=10)
  try:
    state = ckpt.restore(ckpt.latest_step() if step is None else step, trainer.Trainer(config, workdir).abstract_state)
  finally:
    ckpt.close()
  return jax.device_get(state)


def _assert_bitwise_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The final state of the uninterrupted run, and a copy of the same run stopped at step 8."""
  root = tmp_path_factory.mktemp("reference")
  trainer.train(_config(), str(root / "straight"), progress=False)
  trainer.train(_config(), str(root / "stopped"), max_steps=8, progress=False)
  return _state(str(root / "straight")), str(root / "stopped")


def _copy_stopped(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[1], workdir)
  return workdir


def _write_other_shape_checkpoint(workdir, step):
  """A complete checkpoint, with a valid manifest, of a wider model at `step`: wrong shapes for this run."""
  other = trainer.Trainer(_config(**{"model.d_model": 48}), workdir)
  tokens = np.arange(2000, dtype=np.int32) % 250
  iterator = data.make_train_iterator(tokens, seq_len=32, global_batch_size=8, seed=0)
  ckpt = checkpoint.Checkpointer(workdir, keep=10)
  ckpt.save(step, other.init_state(), iterator)
  ckpt.close()


def _corrupt(workdir, how):
  step_dir = os.path.join(workdir, "checkpoints", "8")
  arrays = sorted(p for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True))
  if how == "truncated":
    with open(arrays[0], "r+b") as f:
      f.truncate(os.path.getsize(arrays[0]) // 2)
  elif how == "flipped bytes":
    with open(arrays[-1], "r+b") as f:
      f.seek(os.path.getsize(arrays[-1]) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0xFF]))
  elif how == "missing item":
    shutil.rmtree(os.path.join(step_dir, "data"))
  elif how == "no manifest":  # As a kill between Orbax's commit and the manifest leaves it.
    os.remove(os.path.join(step_dir, checkpoint.MANIFEST))
  elif how == "wrong shapes":
    shutil.rmtree(step_dir)
    _write_other_shape_checkpoint(workdir, 8)


@pytest.mark.parametrize("how, reason", [
    ("truncated", "bytes, the manifest says"),
    ("flipped bytes", "does not match its checksum"),
    ("missing item", "is missing"),
    ("no manifest", "has no manifest"),
])
def test_corrupt_checkpoints_fail_verification(reference, tmp_path, how, reason):
  workdir = _copy_stopped(reference, tmp_path)
  assert checkpoint.verify(os.path.join(workdir, "checkpoints", "8")) is None
  _corrupt(workdir, how)
  assert reason in checkpoint.verify(os.path.join(workdir, "checkpoints", "8"))
  assert checkpoint.verify(os.path.join(workdir, "checkpoints", "4")) is None


def test_corrupt_checkpoint_is_reported_and_the_run_falls_back_exactly(reference, tmp_path, capsys):
  workdir = _copy_stopped(reference, tmp_path)
  _corrupt(workdir, "flipped bytes")
  trainer.train(_config(), workdir, progress=True)
  log = capsys.readouterr().err
  step_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  rejected = os.path.join(workdir, "rejected_checkpoints", "8")
  assert f"checkpoint {step_dir}/8 is unusable (" in log and "does not match its checksum" in log
  assert f"moved it to {rejected}" in log
  assert f"resuming from the previous good checkpoint {step_dir}/4" in log
  _assert_bitwise_equal(_state(workdir), reference[0])
  assert os.path.isdir(rejected) and sorted(os.listdir(step_dir)) == ["12", "8"]


def test_a_checkpoint_of_the_wrong_shapes_falls_back_to_the_previous_one(reference, tmp_path):
  workdir = _copy_stopped(reference, tmp_path)
  _corrupt(workdir, "wrong shapes")
  assert checkpoint.verify(os.path.join(workdir, "checkpoints", "8")) is None  # Complete, just not this model's.
  messages = []
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  step, state = ckpt.restore_latest(trainer.Trainer(_config(), workdir).abstract_state, None, messages.append)
  ckpt.close()
  assert step == 4 and "could not be restored into this model" in messages[0]
  _assert_bitwise_equal(jax.device_get(state), _state(reference[1], 4))


def test_only_checkpoints_of_another_model_is_a_config_error(reference, tmp_path):
  workdir = _copy_stopped(reference, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(UserError, match=r"checkpoints/8 could not be restored into this model"):
    trainer.train(_config(**{"model.d_model": 48}), workdir, progress=False)
  assert not os.path.exists(os.path.join(workdir, "rejected_checkpoints"))  # Nothing is moved for a config error.


def test_old_checkpoints_are_deleted_only_after_a_newer_one_is_complete(reference, tmp_path):
  workdir = _copy_stopped(reference, tmp_path)
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  assert ckpt.complete_steps() == [4, 8]
  # A newer checkpoint that Orbax committed but that lacks its manifest (a kill before it was
  # written) does not count, so pruning keeps both complete ones.
  step_dir = os.path.join(workdir, "checkpoints", "12")
  shutil.copytree(os.path.join(workdir, "checkpoints", "8"), step_dir)
  os.remove(os.path.join(step_dir, checkpoint.MANIFEST))
  ckpt.manager.reload()
  ckpt._prune()
  assert ckpt.complete_steps() == [4, 8] and ckpt.manager.all_steps() == [4, 8, 12]
  # Once it is complete, the oldest goes.
  checkpoint.write_manifest(step_dir)
  ckpt._prune()
  assert ckpt.complete_steps() == [8, 12] and ckpt.manager.all_steps() == [8, 12]
  ckpt.close()


def test_checkpoint_write_error_is_clear_and_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  monkeypatch.setenv("SEQMODELS_FAULTS", "write_error_at=8")
  with pytest.raises(checkpoint.CheckpointWriteError) as error:
    trainer.train(_config(), workdir, progress=False)
  message = str(error.value)
  assert f"writing checkpoint {os.path.abspath(workdir)}/checkpoints/8 failed" in message
  assert "No space left on device" in message
  assert f"the last complete checkpoint {os.path.abspath(workdir)}/checkpoints/4 is intact" in message
  assert checkpoint.verify(os.path.join(workdir, "checkpoints", "4")) is None
  monkeypatch.delenv("SEQMODELS_FAULTS")
  trainer.train(_config(), workdir, progress=False)
  _assert_bitwise_equal(_state(workdir), reference[0])


def test_sigint_saves_and_returns_interrupted(tmp_path, monkeypatch):
  write = trainer.MetricsWriter.write

  def write_then_interrupt(self, step, record):
    write(self, step, record)
    if step == 2:
      os.kill(os.getpid(), signal.SIGINT)
  monkeypatch.setattr(trainer.MetricsWriter, "write", write_then_interrupt)
  result = trainer.train(_config(), str(tmp_path / "run"), progress=False)
  # Step 2's record is written once step 3 is dispatched, so the signal finds step 3 running.
  assert result.interrupted and result.step == 3
  assert checkpoint.verify(str(tmp_path / "run" / "checkpoints" / "3")) is None


def test_a_log_step_is_written_once_the_next_step_is_dispatched(tmp_path, monkeypatch):
  dispatches, written_after = [0], {}  # Steps dispatched so far; per record, how many when it was written.
  init, write = trainer.Trainer.__init__, trainer.MetricsWriter.write

  def counting_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    train_step = self.train_step

    def counted(*step_args):
      dispatches[0] += 1
      return train_step(*step_args)
    self.train_step = counted

  def noting_write(self, step, record):
    written_after[step] = dispatches[0]
    write(self, step, record)
  monkeypatch.setattr(trainer.Trainer, "__init__", counting_init)
  monkeypatch.setattr(trainer.MetricsWriter, "write", noting_write)
  trainer.train(_config(), str(tmp_path / "run"), progress=False)
  # A plain log step's record waits for the next dispatch; a checkpoint step's (4, 8) and the last
  # step's (12) are written before it, since they need that step's state.
  assert written_after == {2: 3, 4: 4, 6: 7, 8: 8, 10: 11, 12: 12}
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]


def test_nonfinite_step_with_skip_leaves_params_and_optimizer_state_untouched(tmp_path, monkeypatch):
  trainer.train(_config(), str(tmp_path / "clean"), max_steps=2, progress=False)
  monkeypatch.setenv("SEQMODELS_FAULTS", "nonfinite_at=3")
  trainer.train(_config(log_every=1), str(tmp_path / "nan"), max_steps=3, progress=False)
  clean, skipped = _state(str(tmp_path / "clean")), _state(str(tmp_path / "nan"))
  assert int(skipped["step"]) == 3
  _assert_bitwise_equal((clean["params"], clean["opt_state"]), (skipped["params"], skipped["opt_state"]))
  records = [json.loads(line) for line in open(tmp_path / "nan" / "metrics.jsonl")]
  assert [r["nonfinite_steps"] for r in records] == [0, 0, 1]
  assert np.isnan(records[2]["loss"])  # The only step of that record was dropped: nothing finite to average.


def test_nonfinite_steps_in_a_row_halt_under_skip(tmp_path, monkeypatch):
  monkeypatch.setenv("SEQMODELS_FAULTS", "nonfinite_at=5,6,7")
  with pytest.raises(nonfinite.NonfiniteHalt, match=r"not finite at step 7 \(3 steps in a row, the "
                     r"max_nonfinite_steps limit\).*last good checkpoint is .*checkpoints/4;"):
    trainer.train(_config(max_nonfinite_steps=3), str(tmp_path / "run"), progress=False)


def test_nonfinite_halt_names_the_step_and_the_last_good_checkpoint_and_resumes_exactly(reference, tmp_path,
                                                                                      monkeypatch):
  workdir = str(tmp_path / "run")
  monkeypatch.setenv("SEQMODELS_FAULTS", "nonfinite_at=6")
  with pytest.raises(nonfinite.NonfiniteHalt, match=r"not finite at step 6 \(nonfinite_policy is 'halt'\); its "
                     r"update was dropped and the last good checkpoint is .*checkpoints/4;"):
    trainer.train(_config(nonfinite_policy="halt"), workdir, progress=False)
  ckpt = checkpoint.Checkpointer(workdir, keep=10)
  assert ckpt.complete_steps() == [4]
  ckpt.close()
  monkeypatch.delenv("SEQMODELS_FAULTS")
  trainer.train(_config(), workdir, progress=False)  # The policy may change on resume.
  _assert_bitwise_equal(_state(workdir), reference[0])


def test_training_config_errors_come_before_any_data_or_device_work(tmp_path, monkeypatch):
  def untouched(*args, **kwargs):
    raise AssertionError("reached data loading or device work")
  monkeypatch.setattr(data, "load_splits", untouched)
  monkeypatch.setattr(trainer, "Trainer", untouched)
  cases = [({"nonfinite_policy": "ignore"}, "nonfinite_policy must be one of skip, halt"),
           ({"max_nonfinite_steps": 0}, "max_nonfinite_steps is 0 but must be at least 1"),
           ({"mesh.data": 64}, "needs 64 devices but only"),
           ({"batch_size": 7, "mesh.data": -1}, "batch_size 7 is not divisible")]
  for overrides, message in cases:
    with pytest.raises(UserError, match=message):
      trainer.train(_config(**overrides), str(tmp_path / "run"), progress=False)


def test_workdir_of_another_run_needs_override_config(reference, tmp_path):
  workdir = _copy_stopped(reference, tmp_path)
  with pytest.raises(UserError, match=r"holds a run with another config \(learning_rate: 0.003 there, 0.001 here\);"
                     r".*--override_config"):
    trainer.train(_config(learning_rate=1e-3), workdir, progress=False)
  # Keys that only change how the run is watched or saved resume freely.
  assert checkpoint.check_same_run(workdir, _config(log_every=1, checkpoint_every=2), override=False) == []
  result = trainer.train(_config(learning_rate=1e-3), workdir, progress=False, override_config=True)
  assert result.step == 12 and checkpoint.read_config(workdir).learning_rate == 1e-3


def test_safe_join_keeps_names_inside_the_directory(tmp_path):
  assert safe_join(str(tmp_path), "state/d/abc") == os.path.join(str(tmp_path), "state", "d", "abc")
  assert safe_join(str(tmp_path), "a/./b") == os.path.join(str(tmp_path), "a", "b")
  for name in ("../x", "a/../../x", "/etc/passwd", "a/../..", "..\\x", "", "a\0b", None, 3):
    with pytest.raises(UserError):
      safe_join(str(tmp_path), name)


def test_a_manifest_naming_files_outside_the_checkpoint_is_rejected(reference, tmp_path):
  workdir = _copy_stopped(reference, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "8")
  path = os.path.join(step_dir, checkpoint.MANIFEST)
  manifest = json.load(open(path))
  manifest["files"]["../../config.json"] = {"bytes": 1, "sha256": "0"}
  json.dump(manifest, open(path, "w"))
  assert "leads outside its directory" in checkpoint.verify(step_dir)


def _calls(tree):
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      func = node.func
      name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
      owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
      yield node, owner, name


def test_no_load_path_can_execute_code():
  """Static check of every module: no pickle-family loader, torch.load only weights-only, no eval of data."""
  sources = glob.glob(os.path.join(REPO, "seqmodels", "*.py")) + glob.glob(os.path.join(REPO, "scripts", "*.py")) + [
      os.path.join(REPO, "train.py"), os.path.join(REPO, "eval.py")]
  # Config and sweep files are Python by design (named on the command line, never read from a run
  # directory); config.call_python_file loads both.
  allowed_exec = {("config.py", "exec_module")}
  for path in sources:
    if path.endswith("make_hf_mamba_fixture.py"):  # Runs outside the project, to make test fixtures.
      continue
    tree = ast.parse(open(path).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                             if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}, path
    for node, owner, name in _calls(tree):
      keywords = {k.arg: k.value for k in node.keywords}
      if owner == "torch" and name == "load":
        assert isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True, path
      if owner == "np" and name == "load":
        assert not (isinstance(keywords.get("allow_pickle"), ast.Constant) and keywords["allow_pickle"].value), path
      if name in ("eval", "exec", "exec_module") and not owner.startswith("ast"):
        assert (os.path.basename(path), name) in allowed_exec, f"{path}: {name}"
      if owner == "yaml" and name == "load":
        raise AssertionError(f"{path}: yaml.load; use yaml.safe_load")


def test_chaos_script_recovers_from_every_injected_fault(tmp_path):
  """The CI version of scripts/chaos.py: a kill mid-write and a corrupted checkpoint (seed 1)."""
  out = subprocess.run([sys.executable, "scripts/chaos.py", "--trials", "2", "--seed", "1", "--workdir",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "2 faults injected, 2 recovered exactly, 0 lost data" in out.stdout
  assert "kill_mid_write" in out.stdout and "corrupt" in out.stdout
  assert "chaos: trial 2/2" in out.stderr  # Progress.
