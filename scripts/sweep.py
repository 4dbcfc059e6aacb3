"""Run a sweep: many train.py runs (and their evaluations) from one sweep file, then tabulate them.

  python scripts/sweep.py --sweep configs/sweeps/<name>.py[:arg] [--dry_run] [--parallel N]
                          [--devices 0,1,...] [--only PATTERN] [--report] [--root runs]

--sweep     a sweep file whose get_sweep(arg) returns a seqmodels.sweep.Sweep (see seqmodels/sweep.py)
--dry_run   list the runs, their workdirs, overrides and status, and exit
--parallel  how many runs go at once (default 1). Each is a train.py subprocess; slot i sees
            CUDA_VISIBLE_DEVICES=devices[i % len(devices)], one GPU per slot by default
--devices   the device ids the slots cycle through (default 0 .. N-1); `--parallel 4 --devices 0`
            shares one GPU between four runs (set XLA_PYTHON_CLIENT_MEM_FRACTION to split its memory)
--only      run (or report) only the runs whose name matches this regular expression
--report    only (re)write the results from the workdirs: runs/<sweep>/results.csv, results.md and
            the plots (loss against tokens, wall-clock and parameters; they need matplotlib)

Every run trains in runs/<sweep>/<run>; `tensorboard --logdir runs/<sweep>` shows them all. A run
that finished is skipped, an interrupted one resumes from its checkpoint, and a failed one records
the last line of its stderr while the others go on. Ctrl-C (or SIGTERM) stops the running jobs after
their checkpoints; rerun the same command to continue. Exit codes: 0 all runs finished, 1 bad input,
2 some run failed, 75 interrupted.
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXIT_BAD_INPUT, EXIT_RUN_FAILED, EXIT_INTERRUPTED = 1, 2, 75


def parse_devices(text, parallel):
  if text is None:
    return [str(i) for i in range(parallel)] if parallel > 1 else None
  devices = [d.strip() for d in text.split(",") if d.strip()]
  if not devices:
    raise ValueError("--devices needs at least one device id, e.g. --devices 0,1")
  return devices


def _interrupt(signum, frame):
  raise KeyboardInterrupt  # SIGTERM stops a sweep the way Ctrl-C does.


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--sweep", required=True, help="sweep file, e.g. configs/sweeps/architectures.py:tiny")
  parser.add_argument("--dry_run", action="store_true", help="list the runs and exit")
  parser.add_argument("--parallel", type=int, default=1, help="runs at once")
  parser.add_argument("--devices", help="comma-separated device ids the parallel slots cycle through")
  parser.add_argument("--only", help="regular expression on run names")
  parser.add_argument("--report", action="store_true", help="only write results.csv/md and plots")
  parser.add_argument("--root", default="runs", help="the folder holding <sweep>/<run> workdirs")
  args = parser.parse_args(argv)
  if args.parallel < 1:
    parser.error("--parallel must be at least 1")
  try:
    devices = parse_devices(args.devices, args.parallel)
  except ValueError as e:
    parser.error(str(e))

  # This process only reads configs and counts parameters from shapes; the GPUs are the children's.
  # Set through jax.config, not the environment, which the children inherit.
  import jax
  jax.config.update("jax_platforms", "cpu")
  from seqmodels import sweep as sweep_lib, sweep_report
  from seqmodels.errors import UserError
  try:
    sweep, runs = sweep_lib.load_sweep(args.sweep, args.root)
    selected = sweep_lib.select(runs, args.only)
    sweep_dir = os.path.join(args.root, sweep.name)
    if args.dry_run:
      print(f"sweep {sweep.name}: {len(selected)} of {len(runs)} runs under {sweep_dir}")
      for run in selected:
        print(describe_run(sweep_lib, run))
      return 0
    if args.report:
      sweep_report.write_report(sweep_dir, selected)
      return 0
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"sweep {sweep.name}: {len(selected)} runs under {sweep_dir}, {args.parallel} at a time", flush=True)
    try:
      outcome = sweep_lib.execute(selected, sweep, parallel=args.parallel, devices=devices,
                                  log=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
      sweep_report.write_report(sweep_dir, selected)
      print("sweep interrupted; rerun the same command to resume", file=sys.stderr)
      return EXIT_INTERRUPTED
    sweep_report.write_report(sweep_dir, selected)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  failed = [name for name, status in outcome.items() if status.get("status") != "done"]
  if failed:
    print(f"{len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
    return EXIT_RUN_FAILED
  return 0


def describe_run(sweep_lib, run) -> str:
  """One run's line for --dry_run: name, status, workdir, config and resolved overrides."""
  status = run.status().get("status", "new")
  try:
    sweep_lib.resolve_config(run)
    problem = ""
  except sweep_lib.UserError as e:
    problem = f"\n    error: {e}"
  overrides = " ".join(run.override_args()) or "(none)"
  after = f"\n    after: {', '.join(run.after)}" if run.after else ""
  return f"  {run.name} [{status}]\n    {run.workdir}: {run.config_spec} {overrides}{after}{problem}"


if __name__ == "__main__":
  sys.exit(main())
