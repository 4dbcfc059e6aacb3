"""Train a model from a config file.

  python train.py --config configs/mamba.py:tiny [--config.key=value ...] [--workdir DIR] [--dry_run]

--config        a config file and variant, `path.py[:variant]` (see configs/*.py for the variants)
--config.KEY    override any config key, e.g. --config.total_steps=2000 --config.model.d_model=256
--workdir       run directory (default runs/<config>_<variant>): config.json, metrics.jsonl,
                tensorboard/ and checkpoints/. Running the same command again resumes from it.
--dry_run       print the resolved config, `params: N` and `flops_per_token: F`, and exit.
--override_config  resume a --workdir whose saved config.json differs from this config (in more than
                the keys a resume may change, such as log_every or checkpoint_every); the model
                itself must match its checkpoints.

Exit codes: 0 done; 1 an error with a one-line message saying what to fix (bad input, a failed
checkpoint write, a non-finite loss under nonfinite_policy); 75 stopped by SIGTERM or SIGINT after
saving a checkpoint (rerun to resume). A run killed outright resumes from its last complete
checkpoint when rerun.
"""

import argparse
import os
import sys

EXIT_BAD_INPUT = 1
EXIT_INTERRUPTED = 75


def default_workdir(config_spec: str) -> str:
  path, _, variant = config_spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{name}_{variant}" if variant else name)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--config", required=True, help="config file and variant, e.g. configs/mamba.py:tiny")
  parser.add_argument("--workdir", help="run directory; rerunning with the same one resumes")
  parser.add_argument("--dry_run", action="store_true", help="print the config, params and flops, then exit")
  parser.add_argument("--override_config", action="store_true",
                      help="resume a --workdir whose saved config differs from this one")
  args, rest = parser.parse_known_args(argv)

  from seqmodels import config as config_lib, trainer  # Heavy imports after --help.
  from seqmodels.errors import UserError
  try:
    config = trainer.resolved_config(args.config, rest)
    if args.dry_run:
      print(config_lib.to_json(config))
      stats = trainer.describe(config)
      print(f"params: {stats['params']}")
      print(f"flops_per_token: {stats['flops_per_token']}")
      return 0
    result = trainer.train(config, args.workdir or default_workdir(args.config), override_config=args.override_config)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  return EXIT_INTERRUPTED if result.interrupted else 0


if __name__ == "__main__":
  sys.exit(main())
