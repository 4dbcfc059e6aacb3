"""Evaluate a checkpoint: zero-shot tasks as lm-evaluation-harness scores them, and perplexity on text.

  python eval.py (--workdir DIR [--step N] | --checkpoint PATH) [--tasks lambada_openai,hellaswag,...]
                 [--text FILE ...] [--context N] [--limit N] [--batch_size N] [--data_dir DIR] [--tokenizer FILE]

--workdir     a run directory written by train.py (its config.json and checkpoints/)
--step        the checkpoint step (default: the latest)
--checkpoint  a Hugging Face Mamba directory (config.json + model.safetensors or pytorch_model.bin, as
              MambaForCausalLM.save_pretrained writes it) or a state-spaces/mamba_ssm one
--tasks       comma-separated zero-shot tasks: lambada_openai, hellaswag, piqa, arc_easy, arc_challenge,
              openbookqa, winogrande, copa, boolq (see seqmodels/zero_shot.py for prompts and metrics)
--text        text files; each is scored as one document (perplexity and bits per byte)
--context     with --text: documents longer than the run's seq_len are scored in sliding windows, each
              token past the first window with at least this many tokens of context (default seq_len / 2)
--limit       score only the first N items of each task
--batch_size  sequences per batch (default: the run's batch_size)
--data_dir    one subfolder per task, as in shared/data (default: $SEQMODELS_DATA)
--tokenizer   a tokenizer.json (or "byte", "gpt-neox") replacing the run's data.tokenizer

Prints a table and writes the numbers to <workdir>/eval/<step>.json, or for --checkpoint PATH to
PATH.eval.json beside it. Published Mamba checkpoints use the GPT-NeoX tokenizer (`--tokenizer gpt-neox`,
the default for vocabularies of 50277 and more).
"""

import argparse
import json
import os
import sys

from seqmodels import model_source


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  model_source.add_arguments(parser)
  parser.add_argument("--tasks")
  parser.add_argument("--text", nargs="+")
  parser.add_argument("--context", type=int)
  parser.add_argument("--limit", type=int)
  parser.add_argument("--batch_size", type=int)
  parser.add_argument("--data_dir")
  parser.add_argument("--tokenizer")
  args = parser.parse_args(argv)
  if not args.tasks and not args.text:
    parser.error("nothing to evaluate; pass --tasks and/or --text")
  model_source.check(parser, args)
  if args.limit is not None and args.limit < 1:
    parser.error("--limit must be at least 1")

  from seqmodels import evaluate, zero_shot  # Heavy imports after --help.
  from seqmodels.errors import UserError
  try:
    tasks = zero_shot.load_tasks(args.tasks, args.data_dir, args.limit) if args.tasks else {}
    loaded = model_source.load(args)
    task_results = evaluate.zero_shot_tasks(loaded, tasks, batch_size=args.batch_size, tokenizer=args.tokenizer)
    context = loaded.config.seq_len // 2 if args.context is None else args.context
    text_results = evaluate.text_perplexity(loaded, args.text, batch_size=args.batch_size, tokenizer=args.tokenizer,
                                            context=context) if args.text else None
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1

  print(f"checkpoint {loaded.checkpoint_dir}" + (f"/{loaded.step}\n" if args.workdir else "\n"))
  output = {}
  if task_results:
    print("| task | n | acc | acc_norm | ppl |")
    print("|---|---|---|---|---|")
    for name, r in task_results.items():
      cells = [f"{r[k]:.4f}" if k in r else "" for k in ("acc", "acc_norm")] + [f"{r['ppl']:.3f}" if "ppl" in r else ""]
      print(f"| {name} | {r['n']} | " + " | ".join(cells) + " |")
    output["tasks"] = task_results
  if text_results:
    if task_results:
      print()
    print("| text | tokens | perplexity | bits/byte |")
    print("|---|---|---|---|")
    for name, r in text_results.items():
      print(f"| {name} | {r['tokens']} | {r['ppl']:.3f} | {r['bits_per_byte']:.4f} |")
    output["text"] = text_results
  if args.workdir:
    os.makedirs(os.path.join(args.workdir, "eval"), exist_ok=True)
    out_path = os.path.join(args.workdir, "eval", f"{loaded.step}.json")
  else:
    out_path = os.path.normpath(args.checkpoint) + ".eval.json"
  with open(out_path, "w") as f:
    json.dump({**output, "checkpoint": loaded.checkpoint_dir, "step": loaded.step}, f, indent=2)
  print(f"\nwrote {out_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
