"""Sweeps (scripts/sweep.py): definitions, names and paths, skip, resume, failure isolation and reports."""

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from seqmodels import config as config_lib, sweep as sweep_lib, sweep_report, trainer
from seqmodels.errors import UserError

SCRIPT = os.path.join(REPO, "scripts", "sweep.py")
GPT_TINY = os.path.join(REPO, "configs", "gpt.py") + ":tiny"

# A 1 x 16 GPT on the embedded corpus with the byte tokenizer: a few seconds per run on a CPU.
SWEEP_FILE = '''
from seqmodels.sweep import Sweep

def get_sweep(arg=None):
  common = {{"model.n_layer": 1, "model.d_model": 16, "model.n_head": 2, "seq_len": 32, "batch_size": 4,
            "total_steps": 4, "warmup_steps": 1, "log_every": 1, "val_every": 2, "val_batches": 1,
            "checkpoint_every": 2, "mesh.data": 1}}
  return Sweep("demo", base={base!r}, eval_args=("--text", {text!r}, "--batch_size", "4"), runs=[
      {{**common, "seed": 0}},
      {{**common, "seed": 1}},
      {{**common, "name": "missing-data", "data.train_files": ("no/such/file.txt",)}},
      {{**common, "name": "bad-key", "model.no_such_key": 3}},
      {{**common, "name": "needs-missing", "after": "missing-data"}},
  ])
'''


def write_sweep(tmp_path, body: str) -> str:
  path = tmp_path / "sweep_def.py"
  path.write_text(body)
  return str(path)


def run_cli(args, cwd):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=600)


def test_grid_names_and_placeholders(tmp_path):
  assert sweep_lib.grid({"seed": [0, 1], "model.d_model": [8, 16]}) == [
      {"seed": 0, "model.d_model": 8}, {"seed": 0, "model.d_model": 16},
      {"seed": 1, "model.d_model": 8}, {"seed": 1, "model.d_model": 16}]
  assert sweep_lib.default_run_name({"config": "configs/mamba.py:tiny", "learning_rate": 0.001, "seed": 1}) == \
      "mamba-tiny,learning_rate=0.001,seed=1"
  assert sweep_lib.default_run_name({"data.train_files": ("a b.txt",)}) == "train_files=-a-b.txt"
  path = write_sweep(tmp_path, f'''
from seqmodels.sweep import Sweep, grid
def get_sweep(arg=None):
  return Sweep("s", base={GPT_TINY!r},
               runs=[*grid({{"seed": [0, 1]}}), {{"name": "ft", "after": "seed=0", "init_from": "{{sweep_dir}}/seed=0"}}])
''')
  sweep, runs = sweep_lib.load_sweep(path, str(tmp_path / "root"))
  assert [r.name for r in runs] == ["seed=0", "seed=1", "ft"]
  assert runs[1].workdir == str(tmp_path / "root" / "s" / "seed=1")
  assert runs[2].after == ("seed=0",)
  assert runs[2].overrides == {"init_from": str(tmp_path / "root" / "s" / "seed=0")}
  config = sweep_lib.resolve_config(runs[1])
  assert config.seed == 1 and config.model.architecture == "gpt"


@pytest.mark.parametrize("bad", ["../escape", "/abs/path", "a/b", "..", ".hidden"])
def test_paths_cannot_escape_the_sweep_folder(tmp_path, bad):
  for field in ("name", "sweep"):
    runs = f'[{{"name": {bad!r}}}]' if field == "name" else '[{"seed": 0}]'
    sweep_name = bad if field == "sweep" else "ok"
    path = write_sweep(tmp_path, f'''
from seqmodels.sweep import Sweep
def get_sweep(arg=None):
  return Sweep({sweep_name!r}, base="configs/gpt.py:tiny", runs={runs})
''')
    with pytest.raises(UserError, match="must be a plain name"):
      sweep_lib.load_sweep(path)


def test_bad_definitions_are_one_line_errors(tmp_path):
  duplicate = write_sweep(tmp_path, '''
from seqmodels.sweep import Sweep
def get_sweep(arg=None):
  return Sweep("s", base="configs/gpt.py:tiny", runs=[{"seed": 0}, {"seed": 0}])
''')
  with pytest.raises(UserError, match="two runs named 'seed=0'"):
    sweep_lib.load_sweep(duplicate)
  with pytest.raises(UserError, match="not found"):
    sweep_lib.load_sweep(str(tmp_path / "nope.py"))
  _, runs = sweep_lib.load_sweep(write_sweep(tmp_path, SWEEP_FILE.format(text="t.txt", base=GPT_TINY)))
  with pytest.raises(UserError, match="matches none"):
    sweep_lib.select(runs, "zzz")
  assert [r.name for r in sweep_lib.select(runs, "^seed")] == ["seed=0", "seed=1"]


def test_sweep_skips_resumes_isolates_failures_and_reports(tmp_path):
  text = tmp_path / "heldout.txt"
  text.write_text("To be, or not to be, that is the question.\n" * 20)
  path = write_sweep(tmp_path, SWEEP_FILE.format(text=str(text), base=GPT_TINY))
  _, runs = sweep_lib.load_sweep(path, str(tmp_path / "runs"))
  # seed=1 was interrupted after 2 of its 4 steps: the sweep must resume it, not restart it.
  trainer.train(sweep_lib.resolve_config(runs[1]), runs[1].workdir, max_steps=2, progress=False)

  dry = run_cli(["--sweep", path, "--root", "runs", "--dry_run"], tmp_path)
  assert dry.returncode == 0, dry.stderr
  assert "5 of 5 runs" in dry.stdout and "--config.seed=1" in dry.stdout
  assert "unknown config key 'model.no_such_key'" in dry.stdout
  assert not os.path.exists(tmp_path / "runs" / "demo" / "seed=0")  # A dry run writes nothing.

  first = run_cli(["--sweep", path, "--root", "runs", "--parallel", "2"], tmp_path)
  assert first.returncode == 2, first.stdout + first.stderr  # Some runs failed; the others finished.
  assert "seed=1: started (resuming)" in first.stdout
  with open(tmp_path / "runs" / "demo" / "seed=1" / "train.stderr") as f:
    assert "from step 2" in f.read()
  records = sweep_report.read_metrics(runs[1].workdir)
  assert [r["step"] for r in records] == [1, 2, 3, 4]

  with open(tmp_path / "runs" / "demo" / "results.csv") as f:
    rows = {row["run"]: row for row in csv.DictReader(f)}
  assert [rows[n]["status"] for n in ("seed=0", "seed=1", "missing-data", "bad-key", "needs-missing")] == \
      ["done", "done", "failed", "failed", "failed"]
  assert "no/such/file.txt" in rows["missing-data"]["error"] and rows["missing-data"]["error"].startswith("error:")
  assert "model.no_such_key" in rows["bad-key"]["error"]
  assert "needs run 'missing-data'" in rows["needs-missing"]["error"]
  config = sweep_lib.resolve_config(runs[0])
  total, non_embedding = sweep_report.non_embedding_params(config)
  assert int(rows["seed=0"]["params"]) == total == trainer.describe(config)["params"]
  vocab = config.model.vocab_size + (-config.model.vocab_size) % config.model.pad_vocab_multiple
  assert int(rows["seed=0"]["non_embedding_params"]) == non_embedding == total - vocab * 16
  for name in ("seed=0", "seed=1"):
    row, metrics = rows[name], sweep_report.read_metrics(os.path.join(tmp_path, "runs", "demo", name))
    assert int(row["steps"]) == 4 and int(row["tokens"]) == 4 * 4 * 32
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert float(row["final_val_loss"]) == pytest.approx(val[-1])
    assert float(row["best_val_loss"]) == pytest.approx(min(val))
    assert float(row["tokens_per_sec"]) > 0 and float(row["wall_s"]) > 0
    with open(os.path.join(tmp_path, "runs", "demo", name, "eval", "4.json")) as f:
      assert float(row["text_ppl"]) == pytest.approx(json.load(f)["text"]["all"]["ppl"])
  markdown = (tmp_path / "runs" / "demo" / "results.md").read_text()
  assert "| seed=0 | done |" in markdown and "## Failures" in markdown
  assert "`missing-data`: error:" in markdown
  assert "## Across seeds" in markdown and "seed=0 seed=1" in markdown
  assert sorted(os.listdir(tmp_path / "runs" / "demo" / "seed=0" / "tensorboard"))  # One logdir for all runs.

  # A second invocation skips the finished runs and retries only the failed ones.
  mtime = os.path.getmtime(runs[0].workdir + "/metrics.jsonl")
  second = run_cli(["--sweep", path, "--root", "runs", "--only", "seed"], tmp_path)
  assert second.returncode == 0, second.stderr
  assert "seed=0: finished earlier, skipped" in second.stdout and "seed=1: finished earlier, skipped" in second.stdout
  assert os.path.getmtime(runs[0].workdir + "/metrics.jsonl") == mtime


def test_cli_leaves_the_environment_of_the_runs_alone(tmp_path, monkeypatch):
  """The sweep process keeps itself on the CPU without telling its train.py children to do the same."""
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  spec = importlib.util.spec_from_file_location("sweep_cli", SCRIPT)
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  path = write_sweep(tmp_path, SWEEP_FILE.format(text="t.txt", base=GPT_TINY))
  assert cli.main(["--sweep", path, "--root", str(tmp_path), "--dry_run"]) == 0
  assert "JAX_PLATFORMS" not in os.environ


def test_signals_to_the_process_group_stop_the_sweep_cleanly(tmp_path):
  """`timeout` and Ctrl-C signal the whole group, the sweep more than once: it still waits for its
  runs to checkpoint, records them as interrupted and writes the report."""
  path = write_sweep(tmp_path, f'''
from seqmodels.sweep import Sweep
def get_sweep(arg=None):
  return Sweep("long", base={GPT_TINY!r}, runs=[{{"name": "base", "model.n_layer": 1, "model.d_model": 16, "model.n_head": 2,
      "seq_len": 32, "batch_size": 4, "total_steps": 100000, "log_every": 1, "mesh.data": 1}}])
''')
  metrics = tmp_path / "runs" / "long" / "base" / "metrics.jsonl"
  sweep = subprocess.Popen([sys.executable, SCRIPT, "--sweep", path, "--root", "runs"], cwd=tmp_path,
                           env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, text=True,
                           start_new_session=True)
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
    time.sleep(0.5)
  for _ in range(2):
    os.killpg(sweep.pid, signal.SIGTERM)
    time.sleep(0.2)
  assert sweep.wait(timeout=120) == 75
  assert sweep_lib.read_status(str(tmp_path / "runs" / "long" / "base"))["status"] == "interrupted"
  with open(tmp_path / "runs" / "long" / "results.csv") as f:
    assert next(csv.DictReader(f))["status"] == "interrupted"


def test_report_without_matplotlib_says_so(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  lines = []
  run = sweep_lib.Run(name="never", config_spec=GPT_TINY, overrides={}, after=(),
                      workdir=str(tmp_path / "s" / "never"))
  rows = sweep_report.write_report(str(tmp_path / "s"), [run], log=lines.append)
  assert rows == [{"run": "never", "status": "not started", "error": "", "overrides": "", "wall_s": None}]
  assert lines[-1] == "plots skipped: matplotlib is not installed (pip install '.[plot]')"


def test_training_curve_reconstructs_wall_clock():
  records = [{"step": 2, "tokens_per_sec": 100.0, "loss": 3.0},
             {"step": 6, "tokens_per_sec": 400.0, "loss": 2.0, "val_loss": 2.5}]
  curve = sweep_report.training_curve(records, tokens_per_step=50)
  assert [p["tokens"] for p in curve] == [100, 300]
  assert [p["seconds"] for p in curve] == pytest.approx([1.0, 1.5])
  assert curve[1]["val_loss"] == 2.5


def test_wandb_enabled_without_wandb_is_a_one_line_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)
  config = config_lib.load(os.path.join(REPO, "configs", "gpt.py") + ":tiny")
  config.wandb.enabled = True
  with pytest.raises(UserError, match="wandb is not installed; pip install wandb"):
    trainer.train(config, str(tmp_path / "w"), progress=False)
  assert not os.path.exists(tmp_path / "w")


def test_gpt2_style_bpe_folder(tmp_path):
  """A vocab.json + merges.txt folder loads as byte-level BPE ("Ġ" is the space byte, as in GPT-2)."""
  vocab = {"a": 0, "b": 1, "Ġ": 2, "ab": 3, "Ġab": 4, "<|endoftext|>": 5}
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nĠ ab\n")
  from seqmodels.tokenizers import load_tokenizer
  tokenizer = load_tokenizer(str(tmp_path))
  assert (tokenizer.vocab_size, tokenizer.eos_id) == (6, 5)
  assert tokenizer.encode("ab ab ba") == [3, 4, 2, 1, 0]
  assert tokenizer.decode([3, 4, 5]) == "ab ab"
  with pytest.raises(UserError, match="vocab.json and merges.txt"):
    load_tokenizer(str(tmp_path / "missing"))
