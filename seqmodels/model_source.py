"""The model flags eval.py and scripts/generate.py share: --workdir DIR [--step N] | --checkpoint PATH.

It imports nothing heavy, so the scripts' --help stays fast; `load` brings in the model code.
"""


def add_arguments(parser) -> None:
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a train.py run directory: its latest checkpoint, or --step N")
  source.add_argument("--checkpoint", help="a Hugging Face or state-spaces Mamba checkpoint directory")
  parser.add_argument("--step", type=int, help="the checkpoint of --workdir to load (default: the latest)")


def check(parser, args) -> None:
  """Exits through parser.error for a flag combination that names no single set of weights."""
  if args.checkpoint and args.step is not None:
    parser.error("--step goes with --workdir; a --checkpoint directory holds one set of weights")


def load(args):
  """The evaluate.LoadedModel the flags name."""
  from seqmodels import evaluate
  return evaluate.load(args.workdir, args.step) if args.workdir else evaluate.load_checkpoint(args.checkpoint)
