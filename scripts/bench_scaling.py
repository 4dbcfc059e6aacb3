"""Data-parallel scaling of train.py: tokens/s on one device and on N, for each config.

  python scripts/bench_scaling.py --devices 2 configs/gpt.py:125m configs/mamba.py:130m \
      [--per_device_batch 8] [--seq_len 2048] [--steps 20] [--log_every 5] [--out results.jsonl] \
      [--config.KEY=VALUE ...]

Each config trains through train.py (fresh workdir, its own data pipeline, real tokens) at
--per_device_batch sequences of --seq_len tokens per device: once on a mesh of 1 device and once on
`mesh.data = --devices`. tokens/s is train.py's own `tokens_per_sec` from metrics.jsonl, the
median over the logged intervals after the first (which holds compilation). A run is killed once
--steps steps are logged, so no validation or checkpoint time enters; extra --config.* flags go to
every run. The one-device runs of different configs go at the same time, each alone on its own
device (CUDA_VISIBLE_DEVICES), when there are enough devices; the N-device runs go one at a time.
Prints one line per run as it ends, then a table: config, 1-device tokens/s, N-device tokens/s,
their ratio.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(spec, devices, visible, workdir, args, extra):
  cmd = [sys.executable, "train.py", "--config", spec, "--workdir", workdir,
         f"--config.mesh.data={devices}", "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
         f"--config.batch_size={args.per_device_batch * devices}", f"--config.seq_len={args.seq_len}",
         f"--config.log_every={args.log_every}", "--config.total_steps=1000000", "--config.val_every=1000000",
         "--config.checkpoint_every=1000000", *extra]
  env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, visible)))
  log = open(os.path.join(workdir + ".log"), "w")
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(proc, workdir, args, timeout):
  """Waits for --steps logged steps, kills the run, returns the steady tokens/s (None on failure)."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  records = []
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics):
      records = [json.loads(line) for line in open(metrics) if line.endswith("\n")]
      if records and records[-1]["step"] >= args.steps:
        break
    time.sleep(0.5)
  proc.kill()
  proc.wait()
  steady = [r["tokens_per_sec"] for r in records[1:]]
  return (statistics.median(steady) if steady else None), records


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("configs", nargs="+", help="config specs, e.g. configs/gpt.py:125m")
  parser.add_argument("--devices", type=int, default=2, help="devices of the data-parallel run")
  parser.add_argument("--per_device_batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--steps", type=int, default=20, help="logged steps per run before it is killed")
  parser.add_argument("--log_every", type=int, default=5)
  parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
  parser.add_argument("--out", help="also write one JSON line per run here")
  args, extra = parser.parse_known_args()
  if args.steps < 2 * args.log_every:
    parser.error("--steps must cover at least two --log_every intervals (the first holds compilation)")

  scratch = tempfile.mkdtemp(prefix="bench_scaling_")
  results = {}

  def run_batch(jobs):
    """Starts (spec, devices, visible) jobs together, then collects each."""
    started = []
    for spec, devices, visible in jobs:
      workdir = os.path.join(scratch, f"{len(results)}_{len(started)}_{os.path.basename(spec)}_{devices}")
      started.append((spec, devices, workdir, start(spec, devices, visible, workdir, args, extra)))
    for spec, devices, workdir, proc in started:
      tokens_per_sec, records = finish(proc, workdir, args, args.timeout)
      results[spec, devices] = tokens_per_sec
      if tokens_per_sec is None:
        print(f"{spec} on {devices}: FAILED, log {workdir}.log:\n" + open(workdir + ".log").read()[-3000:],
              flush=True)
      else:
        print(f"{spec} on {devices} device(s): {tokens_per_sec:,.0f} tokens/s "
              f"(intervals: {', '.join(f'{r['tokens_per_sec']:,.0f}' for r in records)})", flush=True)
      if args.out:
        with open(args.out, "a") as f:
          f.write(json.dumps({"config": spec, "devices": devices, "tokens_per_sec": tokens_per_sec,
                              "records": records, "extra": extra}) + "\n")

  singles = [(spec, 1, [i]) for i, spec in enumerate(args.configs)]
  if len(args.configs) <= args.devices:
    run_batch(singles)
  else:
    for job in singles:
      run_batch([(job[0], 1, [0])])
  for spec in args.configs:
    run_batch([(spec, args.devices, list(range(args.devices)))])

  print(f"\n| config | 1 device tokens/s | {args.devices} devices tokens/s | ratio |")
  print("|---|---|---|---|")
  for spec in args.configs:
    one, many = results[spec, 1], results[spec, args.devices]
    ratio = f"{many / one:.3f}" if one and many else "-"
    print(f"| {spec} | {one or 0:,.0f} | {many or 0:,.0f} | {ratio} |")


if __name__ == "__main__":
  main()
