"""Fault injection: a tiny training job is killed, corrupted, poisoned and starved of disk, and must recover exactly.

  python scripts/chaos.py --trials 20 [--seed 0] [--workdir DIR]

Trial t injects fault number (seed + t) mod 6 of the list below, so six trials cover them all, at
points (times, steps, files, bytes) drawn from a generator seeded by (seed, t). It runs the tiny
job (train.py on configs/mamba.py:tiny, shrunk to 24 steps of 4 x 16 tokens, a checkpoint every 4
steps, the last 2 kept) in subprocesses:

  sigkill         SIGKILL at a random moment of training, 1 to 3 times, then a rerun to the end
  kill_mid_write  SIGKILL while the checkpoint of a random step is half written (stall_write_at)
  corrupt         SIGKILL once two checkpoints are complete, then truncate, flip a byte in or delete
                  a file, delete an item, or delete the manifest of the newest one; then a rerun
  write_error     every write of a random step's checkpoint fails with ENOSPC (write_error_at): the
                  run must stop with a clear error and the previous checkpoint must verify; then a rerun
  nan_halt        NaN loss and gradients at a random step under nonfinite_policy=halt: the run must
                  stop naming the step and the last good checkpoint; then a rerun without the fault
  nan_skip        NaN at a random step under the default policy (skip), and a SIGKILL; the rerun
                  keeps the fault, so it must equal an uninterrupted run with the same fault

The faults go through SEQMODELS_FAULTS (seqmodels/faults.py). After every trial the final state
(parameters, optimizer state, step) must be bitwise equal to the reference run's; every rerun must
have resumed from the newest complete checkpoint (apart from one the fault itself broke); the
checkpoints left must be exactly the last two and verify. A trial that fails any check has lost
data. The table goes to stdout, progress to stderr; the exit code is 1 if any trial lost data.
The subprocesses share a JAX compilation cache under the work directory, so only the first compiles.
"""

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

TOTAL_STEPS, CHECKPOINT_EVERY, KEEP, LOG_EVERY = 24, 4, 2, 2
JOB = ["--config", "configs/mamba.py:tiny", "--config.model.n_layer=1", "--config.model.d_model=16",
       "--config.seq_len=16", "--config.batch_size=4", f"--config.total_steps={TOTAL_STEPS}",
       "--config.warmup_steps=2", f"--config.checkpoint_every={CHECKPOINT_EVERY}",
       f"--config.keep_checkpoints={KEEP}", f"--config.log_every={LOG_EVERY}", "--config.val_every=1000",
       "--config.val_batches=1", "--config.mesh.data=1"]
FAULTS = ("sigkill", "kill_mid_write", "corrupt", "write_error", "nan_halt", "nan_skip")
CORRUPTIONS = ("truncate a file", "flip a byte", "delete a file", "delete an item", "delete the manifest")
NAN_SKIP_STEPS = (5, 14)  # Few, so their references are computed once each.
RUN_TIMEOUT = 300


class Job:
  """Starts train.py runs of the tiny job with a shared compilation cache."""

  def __init__(self, root: str):
    self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": os.path.join(root, "jax_cache"),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    self.env.pop("SEQMODELS_FAULTS", None)

  def start(self, workdir: str, faults: str = "", *extra: str) -> subprocess.Popen:
    env = {**self.env, "SEQMODELS_FAULTS": faults} if faults else self.env
    return subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *JOB, *extra, "--workdir", workdir],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

  def run(self, workdir: str, faults: str = "", *extra: str) -> tuple[int, str]:
    proc = self.start(workdir, faults, *extra)
    try:
      _, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
      kill(proc)
      raise
    return proc.returncode, stderr


def kill(proc: subprocess.Popen) -> str:
  proc.send_signal(signal.SIGKILL)
  _, stderr = proc.communicate(timeout=RUN_TIMEOUT)
  return stderr


def wait_for(condition, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> bool:
  """Polls `condition` until it holds (True) or the run ends or times out (False)."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if condition():
      return True
    time.sleep(0.05)
  return condition()


def logged_steps(workdir: str) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return f.read().count("\n")


def complete_steps(workdir: str) -> list[int]:
  from seqmodels import checkpoint
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isfile(os.path.join(directory, name, checkpoint.MANIFEST)))


def resumed_from(stderr: str) -> int:
  found = re.search(r"resuming .* from step (\d+)", stderr)
  return int(found.group(1)) if found else 0


def final_state(workdir: str):
  import jax

  from seqmodels import checkpoint, trainer
  config = checkpoint.read_config(workdir)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    state = ckpt.restore(ckpt.latest_step(), trainer.Trainer(config, workdir).abstract_state)
  finally:
    ckpt.close()
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def bitwise_equal(a, b) -> bool:
  return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
                                  for x, y in zip(a, b))


class Trial:
  """One fault and its checks; `problems` lists every guarantee it broke."""

  def __init__(self, job: Job, workdir: str, rng: np.random.Generator, reference):
    """`reference(faults)` is the final state of an uninterrupted run with those faults."""
    self.job, self.workdir, self.rng, self.reference = job, workdir, rng, reference
    self.problems, self.detail, self.resumed = [], "", None

  def expect(self, ok: bool, problem: str) -> None:
    if not ok:
      self.problems.append(problem)

  def random_step(self, low: int = CHECKPOINT_EVERY) -> int:
    return int(self.rng.choice(np.arange(low, TOTAL_STEPS, CHECKPOINT_EVERY)))

  def rerun(self, faults: str = "", broken: int | None = None) -> None:
    """Reruns to the end and checks the resume point, the checkpoints left and the final state.

    `broken` is a checkpoint the fault corrupted: the rerun must report it and resume from the one before.
    """
    newest = max((s for s in complete_steps(self.workdir) if s != broken), default=0)
    code, stderr = self.job.run(self.workdir, faults)
    self.expect(code == 0, f"rerun exited {code}: {stderr.strip().splitlines()[-1:]}")
    self.resumed = resumed_from(stderr)
    self.expect(self.resumed == newest, f"resumed from step {self.resumed}, newest complete checkpoint was {newest}")
    self.expect(broken is None or f"checkpoints/{broken} is unusable (" in stderr,
                "the corrupt checkpoint was not reported")
    self.check_end(self.reference(faults))

  def check_end(self, reference) -> None:
    from seqmodels import checkpoint
    left = complete_steps(self.workdir)
    wanted = list(range(TOTAL_STEPS - CHECKPOINT_EVERY * (KEEP - 1), TOTAL_STEPS + 1, CHECKPOINT_EVERY))
    self.expect(left == wanted, f"checkpoints left {left}, expected {wanted}")
    for step in left:
      reason = checkpoint.verify(os.path.join(self.workdir, "checkpoints", str(step)))
      self.expect(reason is None, f"checkpoint {step} does not verify: {reason}")
    self.expect(not glob.glob(os.path.join(self.workdir, "checkpoints", "*tmp*")), "a temporary checkpoint is left")
    self.expect(bitwise_equal(final_state(self.workdir), reference), "final state differs from the reference")

  def sigkill(self):
    kills = int(self.rng.integers(1, 4))
    self.detail = f"{kills} kill(s) at " + ", ".join(self.kill_during_training() for _ in range(kills))
    self.rerun()

  def kill_during_training(self, faults: str = "") -> str:
    """Kills a run at a random moment of its training: 0 to 0.2 s after a random one of the metrics
    records it has left to write (one every LOG_EVERY steps). Says where."""
    newest = max(complete_steps(self.workdir), default=0)
    logged = logged_steps(self.workdir)
    target = logged + int(self.rng.integers(1, max(2, (TOTAL_STEPS - newest) // LOG_EVERY + 1)))
    delay = self.rng.uniform(0.0, 0.2)
    proc = self.job.start(self.workdir, faults)
    wait_for(lambda: logged_steps(self.workdir) >= target, proc)
    time.sleep(delay)
    if proc.poll() is not None:
      proc.communicate()
      return "after the end"
    stderr = kill(proc)
    self.expect(resumed_from(stderr) == newest, f"a killed run resumed from {resumed_from(stderr)}, not {newest}")
    return f"record {target - logged} + {delay:.2f}s (step {max(complete_steps(self.workdir), default=0)} complete)"

  def kill_mid_write(self):
    step = self.random_step()
    proc = self.job.start(self.workdir, f"stall_write_at={step}")
    pattern = os.path.join(self.workdir, "checkpoints", f"{step}.orbax-checkpoint-tmp*")
    self.expect(wait_for(lambda: glob.glob(pattern), proc), f"the checkpoint of step {step} was never started")
    time.sleep(self.rng.uniform(0.0, 0.5))
    kill(proc)
    self.detail = f"killed while writing step {step}"
    self.expect(step not in complete_steps(self.workdir), f"half-written checkpoint {step} counts as complete")
    self.rerun()

  def corrupt(self):
    from seqmodels import checkpoint
    proc = self.job.start(self.workdir)
    wait_for(lambda: len(complete_steps(self.workdir)) >= 2, proc)
    kill(proc)
    steps = complete_steps(self.workdir)
    victim = os.path.join(self.workdir, "checkpoints", str(steps[-1]))
    how = str(self.rng.choice(CORRUPTIONS))
    files = sorted(p for p in glob.glob(os.path.join(victim, "**", "*"), recursive=True)
                   if os.path.isfile(p) and os.path.getsize(p) > 0 and not p.endswith(checkpoint.MANIFEST))
    target = files[int(self.rng.integers(len(files)))]
    if how == "truncate a file":
      os.truncate(target, int(self.rng.integers(os.path.getsize(target))))
    elif how == "flip a byte":
      with open(target, "r+b") as f:
        f.seek(int(self.rng.integers(os.path.getsize(target))))
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ (1 << int(self.rng.integers(8)))]))
    elif how == "delete a file":
      os.remove(target)
    elif how == "delete an item":
      target = os.path.join(victim, str(self.rng.choice(["state", "data"])))
      shutil.rmtree(target)
    else:
      target = os.path.join(victim, checkpoint.MANIFEST)
      os.remove(target)
    self.detail = f"{how}: {os.path.relpath(target, self.workdir)}"
    self.rerun(broken=steps[-1])

  def write_error(self):
    from seqmodels import checkpoint
    step = self.random_step()
    code, stderr = self.job.run(self.workdir, f"write_error_at={step}")
    self.detail = f"ENOSPC writing step {step}"
    self.expect(code == 1 and f"checkpoints/{step} failed" in stderr and "No space left on device" in stderr,
                f"no clear error (exit {code}): {stderr.strip().splitlines()[-1:]}")
    previous = step - CHECKPOINT_EVERY
    if previous:
      reason = checkpoint.verify(os.path.join(self.workdir, "checkpoints", str(previous)))
      self.expect(reason is None, f"the previous checkpoint {previous} does not verify: {reason}")
    self.rerun()

  def nan_halt(self):
    step = int(self.rng.integers(2, TOTAL_STEPS + 1))
    code, stderr = self.job.run(self.workdir, f"nonfinite_at={step}", "--config.nonfinite_policy=halt")
    self.detail = f"NaN at step {step}, halt"
    good = max(complete_steps(self.workdir), default=0)
    named = (f"last good checkpoint is {os.path.abspath(self.workdir)}/checkpoints/{good}" if good
             else "no checkpoint yet")
    self.expect(code == 1 and f"not finite at step {step}" in stderr and named in stderr,
                f"no clear halt (exit {code}): {stderr.strip().splitlines()[-1:]}")
    self.expect(good < step, f"checkpoint {good} was written after the NaN at step {step}")
    self.rerun()

  def nan_skip(self):
    step = int(self.rng.choice(NAN_SKIP_STEPS))
    self.detail = f"NaN at step {step}, skip; killed at {self.kill_during_training(f'nonfinite_at={step}')}"
    self.rerun(f"nonfinite_at={step}")
    with open(os.path.join(self.workdir, "metrics.jsonl")) as f:
      self.expect('"nonfinite_steps": 1' in f.read(), "the skipped step is not in the metrics")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--trials", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", help="where the runs go (default: a temporary directory, removed at the end)")
  args = parser.parse_args(argv)

  root = args.workdir or tempfile.mkdtemp(prefix="seqmodels_chaos_")
  os.makedirs(root, exist_ok=True)
  job = Job(root)
  started = time.time()
  print(f"chaos: {args.trials} trials, seed {args.seed}, runs in {root}", file=sys.stderr)
  references = {}

  def reference(faults: str = ""):
    if faults not in references:
      workdir = os.path.join(root, f"reference{len(references)}")
      shutil.rmtree(workdir, ignore_errors=True)
      begun = time.time()
      code, stderr = job.run(workdir, faults)
      if code != 0:
        raise SystemExit(f"chaos: the reference run failed (exit {code}):\n{stderr}")
      references[faults] = final_state(workdir)
      print(f"chaos: reference run {faults or 'without faults'}: {time.time() - begun:.1f}s", file=sys.stderr)
    return references[faults]

  reference()
  rows = []
  for trial in range(args.trials):
    rng = np.random.default_rng([args.seed, trial])
    fault = FAULTS[(args.seed + trial) % len(FAULTS)]
    workdir = os.path.join(root, f"trial{trial}")
    shutil.rmtree(workdir, ignore_errors=True)
    begun = time.time()
    check = Trial(job, workdir, rng, reference)
    try:
      getattr(check, fault)()
    except subprocess.TimeoutExpired as e:
      check.problems.append(f"a run hung: {e}")
    rows.append((trial, fault, check.detail, check.resumed, check.problems))
    status = "ok" if not check.problems else "LOST: " + "; ".join(check.problems)
    print(f"chaos: trial {trial + 1}/{args.trials} {fault} ({check.detail}) {time.time() - begun:.1f}s {status}",
          file=sys.stderr)

  print_table(rows)
  lost = sum(bool(problems) for *_, problems in rows)
  print(f"\n{len(rows)} faults injected, {len(rows) - lost} recovered exactly, {lost} lost data; "
        f"{time.time() - started:.0f}s")
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)
  return 1 if lost else 0


def print_table(rows) -> None:
  header = ("trial", "fault", "injected", "resumed from", "recovered", "data lost")
  lines = [(str(t), f, d, "-" if r is None else str(r), "yes" if not p else "no", "; ".join(p) or "none")
           for t, f, d, r, p in rows]
  widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
  for line in (header, tuple("-" * w for w in widths), *lines):
    print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


if __name__ == "__main__":
  sys.exit(main())
