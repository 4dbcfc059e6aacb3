"""Training throughput of the real train step: tokens/s per device, step time, MFU, peak memory.

  python scripts/bench_train.py --config configs/gpt.py:125m --config configs/mamba.py:130m \
      --config.batch_size=8 --config.seq_len=2048 [--steps 10] [--warmup 3] [--profile DIR] [--json FILE]

Each --config (repeat it to time several in one invocation) runs in a subprocess of its own, so
that its peak memory is its own and an out-of-memory failure is one row of the table, not the end
of the run. Every --config.KEY=VALUE override applies to all of them; overrides for one config
follow its name inside the same argument, applied after the shared ones:

  --config "configs/gpt2.py:8x512 --config.batch_size=16 --config.seq_len=1024"

With --compile_jobs N (N > 1) the configs are first compiled N at a time into JAX's persistent
compilation cache (JAX_COMPILATION_CACHE_DIR, a temporary folder unless set), and then timed one at
a time, each loading its executable from the cache: the wall time of a many-config run is then
about that of its slowest compile plus the timed steps. `compile s` is then the load time. On a GPU,
steps without model.scan_layers have so far missed that cache and compiled again (kernels/NOTES.md,
"Session 11"); time those without --compile_jobs: each process preallocates device memory that the
others' autotuning then lacks.

A config's step is seqmodels.trainer.Trainer.train_step, the function train.py runs (forward,
backward, clipping, AdamW, the state donated), compiled ahead of time on abstract inputs (`compile
s`), given a state initialized on the host CPU, then run `--warmup` times and timed `--steps` times
on random token batches, each step synchronized; the step time is the median. Then the same
number of steps runs again back to back, synchronized only after the last, as train.py's loop runs
them (it reads the metrics at logging intervals): the host dispatches a step while the device
still runs the one before, so the host's per-step work (several ms for a step of thousands of
kernels without model.scan_layers, 10 to 30 ms more with XLA's command buffers on there: see
config.command_buffers) is hidden unless it exceeds the device's. Columns:

  tok/s/dev  batch_size x seq_len / median step time / devices on the mesh
  pipelined  batch_size x seq_len x steps / wall time of the back-to-back steps / devices
  MFU        tok/s/dev x flops_per_token / the device's peak bf16 FLOP/s, as defined in
             seqmodels/throughput.py: flops_per_token = 6 x matmul parameters + attention's
             6 x seq_len x d_model per layer + the scans' work (Mamba: 27 x d_inner x d_state
             per layer); peak 989 TFLOP/s on an H100 SXM or H200 (dense bf16)
  peak GB    device.memory_stats()['peak_bytes_in_use'] (GPU/TPU), the largest over the local
             devices; on CPU, XLA's compiled estimate (arguments + outputs + temporaries)

--profile DIR also traces 3 more steps with jax.profiler into DIR/<index>_<config>/ (open it in Perfetto
or TensorBoard) and prints the top device ops by time, grouped into matmul, attention, scan and
other (scan: ops under the models' "scan" named scopes in the compiled HLO).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULT_PREFIX = "BENCH_RESULT "


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--config", action="append", required=True,
                      help="config file and variant, e.g. configs/gpt.py:125m; repeat for several")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  parser.add_argument("--profile", default="", help="trace 3 more steps into this folder and print top ops")
  parser.add_argument("--json", default="", help="append one JSON line per config to this file")
  parser.add_argument("--compile_jobs", type=int, default=1, help="compile this many configs at once first")
  parser.add_argument("--compile_only", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_known_args(argv)


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  if args.worker:
    return run_worker(args, overrides)
  runs = [(entry.split()[0], overrides + entry.split()[1:]) for entry in args.config]
  if args.compile_jobs > 1:
    precompile(runs, args.compile_jobs)
  rows = []
  for index, (spec, run_overrides) in enumerate(runs):
    print(f"== {spec} {' '.join(run_overrides)}", file=sys.stderr, flush=True)
    command = [*worker_command(spec, run_overrides), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--profile", args.profile and os.path.join(args.profile, f"{index:02d}_{safe_name(spec)}")]
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    row = json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else {"config": spec, "error": f"exit {proc.returncode}"}
    row["config"] = " ".join([spec, *run_overrides[len(overrides):]])
    rows.append(row)
    if args.json:
      with open(args.json, "a") as f:
        f.write(json.dumps({**row, "overrides": overrides}) + "\n")
  print_table(rows)
  return 0 if all("error" not in r for r in rows) else 1


def worker_command(spec, overrides):
  return [sys.executable, os.path.abspath(__file__), "--worker", "--config", spec, *overrides]


def precompile(runs, jobs):
  """Compiles every run into the persistent compilation cache, `jobs` processes at a time."""
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="bench_train_cache_"))
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  start, pending, running = time.perf_counter(), list(runs), []
  while pending or running:
    while pending and len(running) < jobs:
      spec, run_overrides = pending.pop(0)
      running.append((spec, subprocess.Popen([*worker_command(spec, run_overrides), "--compile_only"],
                                             stdout=subprocess.DEVNULL)))
    time.sleep(0.5)
    for spec, proc in [r for r in running if r[1].poll() is not None]:
      running.remove((spec, proc))
      print(f"compiled {spec} (exit {proc.returncode}) at {time.perf_counter() - start:.0f} s", file=sys.stderr,
            flush=True)


def print_table(rows):
  devices = sorted({f"{r['devices']} x {r['device']}" for r in rows if "device" in r})
  print(f"device: {', '.join(devices)}")
  print(f"{'params':>8} {'batch':>9} {'tok/s/dev':>10} {'pipelined':>10} {'step ms':>8} {'MFU':>6} {'peak GB':>8} "
        f"{'compile s':>9}  config")
  for r in rows:
    if "error" in r:
      print(f"{'':>8} error: {r['error'][:100]}  {r['config']}")
      continue
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
    print(f"{r['params'] / 1e6:>7.1f}M {r['batch_size']:>4}x{r['seq_len']:<4} {r['tokens_per_sec_per_device']:>10,.0f} "
          f"{r['pipelined_tokens_per_sec_per_device']:>10,.0f} {r['step_ms']:>8.1f} {mfu:>6} {peak:>8} "
          f"{r['compile_s']:>9.1f}  {r['config']}")


def run_worker(args, overrides) -> int:
  import jax

  from seqmodels import lm, sharding, throughput, trainer as trainer_lib
  from seqmodels.errors import UserError

  spec = args.config[0]
  try:
    config = trainer_lib.resolved_config(spec, overrides)
    lm.check_config(config.model)
    trainer_lib.check_objective(config)
    if config.objective == "classification":
      raise UserError("bench_train times the language-model objectives (causal_lm, mlm), not classification")
    trainer = trainer_lib.Trainer(config, workdir=tempfile.mkdtemp())
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    print(RESULT_PREFIX + json.dumps({"config": spec, "error": str(e)}))
    return 1
  stats = trainer_lib.describe(config)
  batches = random_batches(config, np.random.default_rng(config.seed))
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(trainer.mesh))
                    for k, v in batches[0].items()}

  start = time.perf_counter()
  step_fn = trainer.train_step.lower(trainer.abstract_state, abstract_batch).compile()
  compile_s = time.perf_counter() - start
  print(f"compiled in {compile_s:.1f} s; {stats['params']:,} params", file=sys.stderr, flush=True)
  # Initialized on the host: XLA's GPU compile of the random init takes minutes (3 for gpt 350m).
  with jax.default_device(jax.devices("cpu")[0]):
    init = jax.jit(trainer._init_state).lower().compile()
    if args.compile_only:
      return 0
    state = init()
  state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, trainer.abstract_state))

  def dispatch(i):
    nonlocal state
    state, metrics = step_fn(state, sharding.put_batch(batches[i % len(batches)], trainer.mesh))
    return metrics

  def run(n, timed):
    times = []
    for i in range(n):
      start = time.perf_counter()
      metrics = dispatch(i)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - start)
      if timed:
        print(f"step {i + 1}/{n}: {times[-1] * 1e3:.1f} ms, loss {float(metrics['loss']):.3f}", file=sys.stderr,
              flush=True)
    return times, metrics

  def run_pipelined(n):
    start = time.perf_counter()
    for i in range(n):
      metrics = dispatch(i)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / n

  run(args.warmup, timed=False)
  times, metrics = run(args.steps, timed=True)
  step_s = statistics.median(times)
  pipelined_step_s = run_pipelined(args.steps)
  devices = trainer.mesh.size
  tokens_per_sec = config.batch_size * config.seq_len / step_s / devices
  pipelined_tokens_per_sec = config.batch_size * config.seq_len / pipelined_step_s / devices
  result = {
      "config": spec,
      "device": jax.devices()[0].device_kind,
      "devices": devices,
      "params": stats["params"],
      "flops_per_token": stats["flops_per_token"],
      "batch_size": config.batch_size,
      "seq_len": config.seq_len,
      "step_ms": step_s * 1e3,
      "step_ms_all": [t * 1e3 for t in times],
      "tokens_per_sec_per_device": tokens_per_sec,
      "pipelined_tokens_per_sec_per_device": pipelined_tokens_per_sec,
      "mfu": throughput.mfu(tokens_per_sec, stats["flops_per_token"]),
      "peak_gb": peak_memory_gb(step_fn),
      "compile_s": compile_s,
      "final_loss": float(metrics["loss"]),
  }
  if not np.isfinite(result["final_loss"]):
    result["error"] = f"loss is {result['final_loss']}"
  if args.profile:
    result["profile"] = profile(step_fn, state, batches, trainer, args.profile)
  print(RESULT_PREFIX + json.dumps(result))
  return 0


def random_batches(config, rng, count=4):
  """`count` batches of uniformly random tokens of the tokenizer's vocabulary (a masked LM's too)."""
  from seqmodels import data

  vocab = config.model.vocab_size
  shape = (config.batch_size, config.seq_len + 1)
  batches = []
  for _ in range(count):
    tokens = rng.integers(0, vocab - (config.objective == "mlm"), shape).astype(np.int32)
    if config.objective == "mlm":  # The mask token is the last id (seqmodels.tokenizers.mask_token_id).
      masked = data.MaskedLM(mask_id=vocab - 1, vocab_size=vocab - 1, rate=config.data.mask_rate)
      batches.append(masked({"inputs": tokens[:, :-1]}, rng))
    else:
      batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  return batches


def peak_memory_gb(compiled):
  import jax

  stats = [d.memory_stats() for d in jax.local_devices()]
  if all(s and "peak_bytes_in_use" in s for s in stats):
    return max(s["peak_bytes_in_use"] for s in stats) / 1e9
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
          + analysis.temp_size_in_bytes) / 1e9


def safe_name(spec):
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(spec))


def profile(step_fn, state, batches, trainer, directory, steps=3):
  """Traces `steps` steps and returns the device ops' time by category and the top ops."""
  import jax

  from seqmodels import profiling, sharding

  def run():
    nonlocal state
    for i in range(steps):
      state, metrics = step_fn(state, sharding.put_batch(batches[i % len(batches)], trainer.mesh))
    jax.block_until_ready((state, metrics))

  summary = profiling.trace(run, directory, hlo_text=step_fn.as_text(), steps=steps)
  print(profiling.format_summary(summary), file=sys.stderr, flush=True)
  return summary


if __name__ == "__main__":
  sys.exit(main())
