"""Generate text from a checkpoint: any causal architecture, or a Hugging Face / state-spaces Mamba.

  python scripts/generate.py (--workdir DIR [--step N] | --checkpoint PATH) (--prompt "..." | --prompts_file FILE)
      [--max_new_tokens N] [--temperature T] [--top_k K] [--top_p P] [--seed S] [--batch_size B]
      [--stop STRING ...] [--output FILE] [--tokenizer SPEC] [--prefill_tokens N]

--workdir         a run directory written by train.py (its latest checkpoint, or --step N)
--checkpoint      a Hugging Face Mamba directory or a state-spaces/mamba_ssm one (as eval.py reads them)
--prompt          one prompt: its completion streams to stdout as it is generated
--prompts_file    JSONL, one {"prompt": "..."} object per line (other fields are ignored); the
                  completions go to --output as JSONL in the file's order, one
                  {"index", "prompt", "completion", "tokens", "finish_reason"} object per prompt
--max_new_tokens  new tokens per prompt (default 128)
--temperature     0 is greedy; else logits are divided by it before sampling (default 1.0)
--top_k           sample among the K most likely tokens only (default 0: all)
--top_p           then among the smallest set holding probability P (default 1.0: all)
--seed            the sampling seed; a prompt's sample depends on it and the prompt's index, not
                  on the batch it shares (default 0)
--batch_size      prompts decoded together (default 16); the file's prompts are grouped by length
--stop            a string that ends a completion (repeatable); the tokenizer's EOS always does
--output          the JSONL file for --prompts_file (default: stdout)
--tokenizer       a tokenizer.json, "byte" or "gpt-neox" replacing the run's data.tokenizer
--prefill_tokens  batch x chunk of one prefill call, which bounds its memory (default 16384)

"finish_reason" is "eos", "stop" (a --stop string, cut from the completion) or "length".
seqmodels/generate.py describes the decoding: a parallel prefill, then one compiled loop.
Bidirectional encoders (LION) cannot generate and are refused.

  python scripts/generate.py --workdir runs/mamba_tiny --prompt "ROMEO:" --max_new_tokens 200 --temperature 0.8
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from seqmodels import model_source  # noqa: E402

REPLACEMENT_CHAR = "\ufffd"  # What a partial UTF-8 sequence decodes to until its last byte arrives.


def read_prompts(path: str) -> list[str]:
  from seqmodels.errors import UserError
  if not os.path.isfile(path):
    raise UserError(f"--prompts_file {path} not found; pass a JSONL file with one {{\"prompt\": \"...\"}} per line")
  prompts = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); write one {{\"prompt\": \"...\"}} object per line") from None
      if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise UserError(f"{where}: needs an object with a \"prompt\" string, like {{\"prompt\": \"Once upon a time\"}}")
      if not record["prompt"]:
        raise UserError(f"{where}: the prompt is empty; give it some text or remove the line")
      prompts.append(record["prompt"])
  if not prompts:
    raise UserError(f"--prompts_file {path} holds no prompts; write one {{\"prompt\": \"...\"}} object per line")
  return prompts


def finish(tokenizer, tokens: list[int], stops: list[str], max_new_tokens: int):
  """(text, tokens, finish_reason) of a completion, cut at its first stop string.

  The generator already cut it at EOS, so a completion shorter than max_new_tokens met one.
  """
  text = tokenizer.decode(tokens)
  reason = "eos" if len(tokens) < max_new_tokens else "length"
  cuts = sorted((text.find(s), s) for s in stops if s in text)
  if cuts:
    cut, stop = cuts[0]
    # Keep the tokens up to the one that completes the stop string, and the text before it.
    n = next(n for n in range(1, len(tokens) + 1) if len(tokenizer.decode(tokens[:n])) >= cut + len(stop))
    text, tokens, reason = text[:cut], tokens[:n], "stop"
  return text, tokens, reason


def stream_one(generator, tokenizer, prompt_ids, args) -> None:
  """Prints the completion of one prompt as it grows, holding back what a stop string could still claim."""
  holdback = max((len(s) for s in args.stop), default=1) - 1
  printed = 0

  def show(completions):
    nonlocal printed
    text = tokenizer.decode(completions[0])
    cuts = [text.find(s) for s in args.stop if s in text]
    if cuts:
      text = text[:min(cuts)]
    else:
      text = text.rstrip(REPLACEMENT_CHAR)
      text = text[:max(printed, len(text) - holdback)]
    sys.stdout.write(text[printed:])
    sys.stdout.flush()
    printed = len(text)
    return bool(cuts)

  tokens = generator.generate([prompt_ids], args.max_new_tokens, seed=args.seed, on_progress=show)
  text = tokenizer.decode(tokens[0])
  cuts = [text.find(s) for s in args.stop if s in text]
  text = text[:min(cuts)] if cuts else text
  sys.stdout.write(text[printed:] + "\n")
  sys.stdout.flush()


def generate_file(generator, tokenizer, prompts: list[str], args) -> list[dict]:
  """Completes every prompt, in batches of prompts of similar length; returns the records in file order."""
  from tqdm import tqdm
  encoded = tokenizer.encode_batch(prompts)
  order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
  records = [None] * len(prompts)
  with tqdm(total=len(prompts), desc="generating", unit="prompt", file=sys.stderr,
            disable=len(prompts) <= args.batch_size) as bar:
    for start in range(0, len(order), args.batch_size):
      indices = order[start:start + args.batch_size]
      completions = generator.generate([encoded[i] for i in indices], args.max_new_tokens, seed=args.seed,
                                       indices=indices)
      for i, tokens in zip(indices, completions):
        text, tokens, reason = finish(tokenizer, tokens, args.stop, args.max_new_tokens)
        records[i] = {"index": i, "prompt": prompts[i], "completion": text, "tokens": tokens, "finish_reason": reason}
      bar.update(len(indices))
  return records


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  model_source.add_arguments(parser)
  prompt = parser.add_mutually_exclusive_group(required=True)
  prompt.add_argument("--prompt")
  prompt.add_argument("--prompts_file")
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--stop", action="append", default=[])
  parser.add_argument("--output")
  parser.add_argument("--tokenizer")
  parser.add_argument("--prefill_tokens", type=int, default=16384)
  args = parser.parse_args(argv)
  model_source.check(parser, args)
  for name in ("max_new_tokens", "batch_size", "prefill_tokens"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1")
  if args.output and not args.prompts_file:
    parser.error("--output goes with --prompts_file; a single --prompt streams to stdout")
  if any(not s for s in args.stop):
    parser.error("--stop needs a non-empty string")

  from seqmodels import evaluate, generate  # Heavy imports after --help.
  from seqmodels.errors import UserError
  try:
    if args.prompt is not None and not args.prompt:
      raise UserError("--prompt is empty; give it some text")
    prompts = read_prompts(args.prompts_file) if args.prompts_file else [args.prompt]
    loaded = model_source.load(args)
    generate.check_causal(loaded.config.model)
    tokenizer = evaluate.model_tokenizer(loaded, args.tokenizer)
    sampling = generate.Sampling(args.temperature, args.top_k, args.top_p)
    generator = generate.Generator(loaded.model, vocab_size=tokenizer.vocab_size, sampling=sampling,
                                   stop_ids=(tokenizer.eos_id,), prefill_tokens=args.prefill_tokens)
    if args.prompts_file:
      records = generate_file(generator, tokenizer, prompts, args)
    else:
      ids = tokenizer.encode(args.prompt)
      if not ids:
        raise UserError("--prompt tokenizes to nothing; give it some text")
      stream_one(generator, tokenizer, ids, args)
      return 0
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1

  out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
  try:
    for record in records:
      out.write(json.dumps(record, ensure_ascii=False) + "\n")
  finally:
    if args.output:
      out.close()
      print(f"wrote {len(records)} completions to {args.output}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
