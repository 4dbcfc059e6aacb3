"""Sweeps: many train.py runs from one definition, each in its own workdir, run and resumed as a set.

A sweep file is a Python module whose `get_sweep(arg)` returns a `Sweep`:

    from seqmodels.sweep import Sweep, grid

    def get_sweep(arg=None):
      return Sweep("lr", base="configs/mamba.py:tiny",
                   runs=grid({"learning_rate": [1e-3, 3e-3], "seed": [0, 1]}))

Each run is a dict of config overrides ({"model.d_model": 256} is --config.model.d_model=256) and
three reserved keys: "config" (another config file and variant than `base`), "name" (the run's
name; by default made from the overrides that differ between runs, e.g. "learning_rate=0.001,seed=1") and "after" (names of
runs that must finish first, e.g. the pretraining run a fine-tuning run starts from). In string
values, "{sweep_dir}" stands for the sweep's folder, e.g. {"init_from": "{sweep_dir}/pretrain"}. A run trains in
`<root>/<sweep>/<run>` (root: "runs"), so `tensorboard --logdir runs/<sweep>` shows every run by
name. `Sweep.eval_args` are eval.py arguments run on each causal LM once it has trained.

A run is finished once `sweep_status.json` in its workdir says so; it is skipped on later
invocations. Any other run (new, interrupted, failed) is started again with the same train.py
command, which resumes from the workdir's latest checkpoint. A run that fails records the last line
of its stderr, and the others go on.
"""

import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

from seqmodels import config as config_lib
from seqmodels.errors import UserError

RESERVED_KEYS = ("config", "name", "after")
STATUS_FILE = "sweep_status.json"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_INTERRUPTED = 75  # train.py's code for "stopped by a signal after saving a checkpoint".
STOP_GRACE_S = 30  # How long a stopped sweep waits for a job to save its checkpoint before killing it.


@dataclasses.dataclass
class Sweep:
  name: str
  base: str  # The config every run starts from, "path.py[:variant]".
  runs: list  # Override dicts, see the module docstring.
  eval_args: tuple = ()  # eval.py arguments for each causal LM run after training, e.g. ("--tasks", "lambada_openai").


@dataclasses.dataclass
class Run:
  name: str
  config_spec: str
  overrides: dict  # Config key -> value, in the order the sweep file gave them.
  after: tuple
  workdir: str

  def override_args(self) -> list[str]:
    return [f"--config.{key}={format_value(value)}" for key, value in self.overrides.items()]

  def status(self) -> dict:
    return read_status(self.workdir)

  @property
  def finished(self) -> bool:
    return self.status().get("status") == "done"


def grid(axes: dict) -> list[dict]:
  """Every combination of the axes' values, the last axis varying fastest.

  grid({"seed": [0, 1], "model.d_model": [64, 128]}) gives 4 override dicts.
  """
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def format_value(value) -> str:
  """The --config.KEY=VALUE text of an override value (tuples and lists as Python literals)."""
  if isinstance(value, (tuple, list)):
    return repr(list(value))
  return str(value)


def _name_part(key: str, value) -> str:
  if key == "config":
    path, _, variant = str(value).partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{stem}-{variant}" if variant else stem
  text = f"{key.split('.')[-1]}={format_value(value)}"
  return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-")


def default_run_name(overrides: dict, keys=None) -> str:
  """A readable name from the overrides (those in `keys` when given):
  {"config": "configs/gpt.py:tiny", "seed": 1} -> "gpt-tiny,seed=1"."""
  return ",".join(_name_part(k, v) for k, v in overrides.items()
                  if k not in ("name", "after") and (keys is None or k in keys)) or "base"


def varying_keys(entries: list[dict]) -> set:
  """The override keys whose values differ between runs: what names them apart."""
  keys = {k for entry in entries for k in entry}
  missing = object()
  return {k for k in keys if len({repr(entry.get(k, missing)) for entry in entries}) > 1}


def check_path_component(text: str, what: str) -> str:
  """`text` if it is one plain path component, else a UserError: a sweep never writes outside its folder."""
  if (not text or os.path.isabs(text) or "/" in text or "\\" in text or text in (".", "..")
      or text.startswith(".") or "\0" in text):
    raise UserError(f"{what} '{text}' must be a plain name (no '/', '..', leading '.' or absolute path); "
                    "rename it in the sweep file")
  return text


def load_sweep(spec: str, root: str = "runs") -> tuple[Sweep, list[Run]]:
  """Loads `path.py[:arg]` (its get_sweep(arg)) and resolves its runs' names and workdirs."""
  sweep = config_lib.call_python_file(spec, "get_sweep", "sweep file", "--sweep configs/sweeps/<name>.py",
                                      "a seqmodels.sweep.Sweep")
  if not isinstance(sweep, Sweep):
    raise UserError(f"get_sweep() in '{spec.partition(':')[0]}' returned {type(sweep).__name__}; return a seqmodels.sweep.Sweep")
  check_path_component(sweep.name, "sweep name")
  for entry in sweep.runs:
    if not isinstance(entry, dict):
      raise UserError(f"sweep '{sweep.name}': each run must be a dict of overrides, got {entry!r}")
  varying = varying_keys([e for e in sweep.runs if "name" not in e]) or None
  runs, seen = [], set()
  for entry in sweep.runs:
    name = check_path_component(str(entry.get("name") or default_run_name(entry, varying)), "run name")
    if name in seen:
      raise UserError(f"sweep '{sweep.name}' has two runs named '{name}'; give one a distinct \"name\"")
    seen.add(name)
    after = entry.get("after", ())
    after = (after,) if isinstance(after, str) else tuple(after)
    sweep_dir = os.path.join(root, sweep.name)
    overrides = {k: v.replace("{sweep_dir}", sweep_dir) if isinstance(v, str) else v
                 for k, v in entry.items() if k not in RESERVED_KEYS}
    runs.append(Run(name=name, config_spec=entry.get("config", sweep.base), overrides=overrides, after=after,
                    workdir=os.path.join(sweep_dir, name)))
  for run in runs:
    unknown = [a for a in run.after if a not in seen]
    if unknown:
      raise UserError(f"run '{run.name}' comes after unknown run(s) {', '.join(unknown)}; "
                      f"known: {', '.join(sorted(seen))}")
  return sweep, runs


def resolve_config(run: Run):
  """The run's full config (base file plus overrides); raises UserError for a bad key or value."""
  config = config_lib.load(run.config_spec)
  config_lib.apply_overrides(config, [(k, format_value(v)) for k, v in run.overrides.items()])
  return config


def select(runs: list[Run], pattern: str | None) -> list[Run]:
  """The runs whose name matches the regular expression `pattern` (all when None)."""
  if not pattern:
    return runs
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise UserError(f"--only '{pattern}' is not a valid regular expression ({e}); quote it or simplify it")
  chosen = [r for r in runs if regex.search(r.name)]
  if not chosen:
    raise UserError(f"--only '{pattern}' matches none of the runs: {', '.join(r.name for r in runs)}")
  return chosen


def read_status(workdir: str) -> dict:
  path = os.path.join(workdir, STATUS_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def write_status(workdir: str, status: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, STATUS_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(status, f, indent=2)
  os.replace(tmp, os.path.join(workdir, STATUS_FILE))


def last_line(path: str) -> str:
  """The last non-empty line of a log, progress-bar carriage returns counted as line ends."""
  if not os.path.isfile(path):
    return ""
  with open(path, errors="replace") as f:
    lines = [line.strip() for line in re.split(r"[\r\n]", f.read()) if line.strip()]
  return lines[-1] if lines else ""


def last_step(workdir: str) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return 0
  with open(path) as f:
    lines = f.read().splitlines()
  return json.loads(lines[-1])["step"] if lines else 0


class _Job:
  """One run's stages (train, then eval for causal LMs) as subprocesses, on one device slot."""

  def __init__(self, run: Run, config, eval_args, device, env):
    self.run, self.device = run, device
    self.total_steps = config.total_steps
    commands = [("train", [sys.executable, os.path.join(REPO_ROOT, "train.py"), "--config", run.config_spec,
                           "--workdir", run.workdir, *run.override_args()])]
    if eval_args and config.objective == "causal_lm":
      commands.append(("eval", [sys.executable, os.path.join(REPO_ROOT, "eval.py"), "--workdir", run.workdir,
                                *eval_args]))
    self.previous = run.status()
    if self.previous.get("status") == "trained" or self.previous.get("stage") == "eval":
      commands.pop(0)  # Training finished in an earlier invocation; only its evaluation is left.
    self.commands = commands
    self.env = dict(env, CUDA_VISIBLE_DEVICES=str(device)) if device is not None else dict(env)
    self.wall = float(self.previous.get("wall_s", 0.0))
    self.eval_wall = 0.0
    self.process = None
    self._start_next()

  def _start_next(self):
    self.stage, command = self.commands.pop(0)
    os.makedirs(self.run.workdir, exist_ok=True)
    self.stdout = open(os.path.join(self.run.workdir, f"{self.stage}.log"), "a")
    self.stderr_path = os.path.join(self.run.workdir, f"{self.stage}.stderr")
    self.stderr = open(self.stderr_path, "w")
    self.started = time.perf_counter()
    self.process = subprocess.Popen(command, stdout=self.stdout, stderr=self.stderr, env=self.env)

  def poll(self) -> dict | None:
    """None while running; otherwise the run's final status (which is also written to its workdir)."""
    code = self.process.poll()
    if code is None:
      return None
    elapsed = time.perf_counter() - self.started
    self.stdout.close()
    self.stderr.close()
    if self.stage == "train":
      self.wall += elapsed
    else:
      self.eval_wall += elapsed
    if code == 0 and self.commands:
      write_status(self.run.workdir, {"status": "trained", "wall_s": self.wall})
      self._start_next()
      return None
    if code == 0:
      status = {"status": "done", "wall_s": self.wall, "eval_wall_s": self.eval_wall}
    elif code in (EXIT_INTERRUPTED, -signal.SIGTERM, -signal.SIGINT, -signal.SIGKILL):
      status = {"status": "interrupted", "wall_s": self.wall, "stage": self.stage}
    else:
      died = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
      status = {"status": "failed", "wall_s": self.wall, "stage": self.stage, "exit_code": code,
                "error": last_line(self.stderr_path) if code > 0 and last_line(self.stderr_path) else died}
    write_status(self.run.workdir, status)
    return status


def execute(runs: list[Run], sweep: Sweep, *, parallel: int = 1, devices=None, log=print) -> dict:
  """Trains (and evaluates) every unfinished run, `parallel` at a time; returns {name: status}.

  Slot i runs its jobs with CUDA_VISIBLE_DEVICES=devices[i % len(devices)] (devices None: no
  pinning). On Ctrl-C (KeyboardInterrupt) it stops the running jobs, lets them save their
  checkpoints, records them as interrupted and raises the KeyboardInterrupt again.
  """
  total = len(runs)
  outcome = {}
  pending = []
  for index, run in enumerate(runs, 1):
    if run.finished:
      outcome[run.name] = run.status()
      log(f"[{index}/{total}] {run.name}: finished earlier, skipped")
    else:
      pending.append((index, run))
  env = dict(os.environ)
  env.setdefault("PYTHONUNBUFFERED", "1")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
  running = {}  # slot -> (index, _Job)
  heartbeat = time.perf_counter()
  try:
    while pending or running:
      for slot in range(parallel):
        if slot in running or not pending:
          continue
        picked = _next_ready(pending, outcome, runs)
        if picked is None:
          break
        index, run, blocker = picked
        if blocker:
          outcome[run.name] = {"status": "failed", "stage": "after", "error": blocker}
          write_status(run.workdir, outcome[run.name])
          log(f"[{index}/{total}] {run.name}: FAILED ({blocker})")
          continue
        try:
          config = resolve_config(run)
        except UserError as e:
          outcome[run.name] = {"status": "failed", "stage": "config", "error": f"error: {e}"}
          write_status(run.workdir, outcome[run.name])
          log(f"[{index}/{total}] {run.name}: FAILED (error: {e})")
          continue
        device = None if devices is None else devices[slot % len(devices)]
        checkpoints = os.path.join(run.workdir, "checkpoints")
        resumed = " (resuming)" if os.path.isdir(checkpoints) and os.listdir(checkpoints) else ""
        job = _Job(run, config, sweep.eval_args, device, env)
        where = "" if device is None else f" on device {device}"
        log(f"[{index}/{total}] {run.name}: started{resumed}{where}, {config.total_steps} steps")
        running[slot] = (index, job)
      if pending and not running and _next_ready(list(pending), outcome, runs) is None:
        for index, run in pending:
          outcome[run.name] = {"status": "failed", "stage": "after", "error": "its \"after\" runs wait on each other"}
          log(f"[{index}/{total}] {run.name}: FAILED (its \"after\" runs wait on each other)")
        pending.clear()
      for slot, (index, job) in list(running.items()):
        status = job.poll()
        if status is None:
          continue
        del running[slot]
        outcome[job.run.name] = status
        if status["status"] == "done":
          log(f"[{index}/{total}] {job.run.name}: done in {status['wall_s']:.0f}s")
        elif status["status"] == "interrupted":
          log(f"[{index}/{total}] {job.run.name}: interrupted during {status['stage']}; rerun the sweep to resume")
        else:
          log(f"[{index}/{total}] {job.run.name}: FAILED in {status['stage']} ({status['error']}); "
              f"log: {job.stderr_path}")
      if running and time.perf_counter() - heartbeat > 30:
        heartbeat = time.perf_counter()
        log("running: " + ", ".join(f"{j.run.name} ({j.stage}, step {last_step(j.run.workdir)}/{j.total_steps})"
                                    for _, j in running.values()))
      time.sleep(0.2)
  except KeyboardInterrupt:
    # `timeout` and a terminal signal the sweep's whole process group, which reaches it more than once.
    for stop in (signal.SIGTERM, signal.SIGINT):
      signal.signal(stop, signal.SIG_IGN)
    log("interrupted: waiting for the running jobs to save their checkpoints")
    for _, job in running.values():
      job.process.send_signal(signal.SIGTERM)  # Ctrl-C reached them already; a SIGTERM to the sweep did not.
    for _, job in running.values():
      try:
        job.process.wait(timeout=STOP_GRACE_S)
      except subprocess.TimeoutExpired:  # Stuck, e.g. compiling: its last checkpoint is where it resumes.
        job.process.kill()
        job.process.wait()
      outcome[job.run.name] = job.poll() or {"status": "interrupted"}
    raise
  return outcome


def _next_ready(pending, outcome, runs):
  """The first pending run whose "after" runs are finished: (index, run, blocker) or None.

  `blocker` is an error when a run it needs has failed or is not part of this invocation.
  """
  names = {r.name for r in runs}
  for position, (index, run) in enumerate(pending):
    blocker, waiting = "", False
    for needed in run.after:
      state = outcome.get(needed, {}).get("status")
      if state == "done":
        continue
      if state in ("failed", "interrupted"):
        blocker = f"needs run '{needed}', which did not finish"
      elif needed not in names and read_status(os.path.join(os.path.dirname(run.workdir), needed)).get(
          "status") != "done":
        blocker = f"needs run '{needed}', which is not selected and not finished; include it in --only"
      elif needed in names:
        waiting = True
      if blocker:
        break
    if waiting and not blocker:
      continue
    del pending[position]
    return index, run, blocker
  return None
