"""Evaluate a checkpoint: perplexity and bits per byte on text files.

  python eval.py --workdir DIR [--step N] --text FILE [FILE ...] [--batch_size N]

--workdir     a run directory written by train.py (its config.json and checkpoints/)
--step        the checkpoint step (default: the latest)
--text        text files; each is scored as one document
--batch_size  windows per batch (default: the run's batch_size)

Prints a table and writes the numbers to <workdir>/eval/<step>.json.
"""

import argparse
import json
import os
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int)
  parser.add_argument("--text", nargs="+", required=True)
  parser.add_argument("--batch_size", type=int)
  args = parser.parse_args(argv)

  from seqmodels import evaluate  # Heavy imports after --help.
  from seqmodels.errors import UserError
  try:
    loaded = evaluate.load(args.workdir, args.step)
    results = evaluate.text_perplexity(loaded, args.text, batch_size=args.batch_size)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1

  print(f"checkpoint {loaded.checkpoint_dir}/{loaded.step}\n")
  print("| text | tokens | perplexity | bits/byte |")
  print("|---|---|---|---|")
  for name, r in results.items():
    print(f"| {name} | {r['tokens']} | {r['ppl']:.3f} | {r['bits_per_byte']:.4f} |")
  out_dir = os.path.join(args.workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  out_path = os.path.join(out_dir, f"{loaded.step}.json")
  with open(out_path, "w") as f:
    json.dump({"text": results, "checkpoint": loaded.checkpoint_dir, "step": loaded.step}, f, indent=2)
  print(f"\nwrote {out_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
