"""ParallelGPT's one-tower inference ("pgpt-1", Suresh & P 2024): quality and speed against both towers.

  python scripts/eval_one_tower.py --workdir runs/architectures/parallel_gpt-s0 --text FILE [--batch_size 16]

Scores the text (sliding windows as in eval.py --text, context seq_len / 2) through the trained
model twice: both towers mixed by sigmoid(w) (the training form), and only the tower of weight
sigmoid(w) >= 1/2 (the decoding path with model.one_tower_inference). Then times one full batch of
windows through each, side by side, median of 5 after a warm-up. Prints a table and writes
<workdir>/eval/one_tower_<step>.json.
"""

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--workdir", required=True, help="a parallel_gpt run directory")
  parser.add_argument("--text", nargs="+", required=True, help="text files to score")
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from seqmodels import checkpoint, data, evaluate
  from seqmodels.errors import UserError

  @functools.partial(nnx.jit, static_argnames="one_tower")
  def summed_nll(model, inputs, targets, mask, one_tower):
    if one_tower:  # The decoding path: a prefill from an empty cache runs the stronger tower only.
      logits, _ = model.prefill(inputs, model.init_cache(inputs.shape[0], inputs.shape[1]))
    else:
      logits = model(inputs)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * mask), jnp.sum(mask)

  try:
    architecture = checkpoint.read_config(args.workdir).model.architecture
    if architecture != "parallel_gpt":
      raise UserError(f"--workdir {args.workdir} holds a {architecture} model; pass a parallel_gpt run")
    loaded = evaluate.load(args.workdir)
    model, cfg = loaded.model, loaded.config
    tokenizer = evaluate.model_tokenizer(loaded, None)
    text = "".join(data.read_documents(args.text, config_key="--text"))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  model.backbone.one_tower_inference = True
  tokens = np.asarray([tokenizer.eos_id] + tokenizer.encode(text), np.int32)
  inputs, targets, mask = evaluate.scoring_windows(tokens, cfg.seq_len, cfg.seq_len // 2)
  pad = (-len(inputs)) % args.batch_size  # Whole batches only, so each path compiles once.
  inputs, targets, mask = (np.pad(a, ((0, pad), (0, 0))) for a in (inputs, targets, mask))

  result = {"step": loaded.step, "mix_weight": float(jax.nn.sigmoid(model.backbone.mix[...]))}
  result["kept_tower"] = 0 if result["mix_weight"] >= 0.5 else 1
  for name, one_tower in (("both_towers", False), ("one_tower", True)):
    nll, count = 0.0, 0.0
    for start in range(0, len(inputs), args.batch_size):
      batch = slice(start, start + args.batch_size)
      s, c = summed_nll(model, inputs[batch], targets[batch], mask[batch], one_tower=one_tower)
      nll, count = nll + float(s), count + float(c)
    times = []
    for _ in range(6):
      begin = time.perf_counter()
      jax.block_until_ready(summed_nll(model, inputs[:args.batch_size], targets[:args.batch_size],
                                       mask[:args.batch_size], one_tower=one_tower))
      times.append(time.perf_counter() - begin)
    result[name] = {"ppl": math.exp(nll / count), "bits_per_byte": nll / math.log(2) / tokenizer.count_bytes(text),
                    "tokens_per_sec": args.batch_size * cfg.seq_len / statistics.median(times[1:])}
  print(f"sigmoid(w) = {result['mix_weight']:.4f}: one-tower inference keeps tower {result['kept_tower']}")
  print("| path | perplexity | bits/byte | forward tokens/s |")
  print("|---|---|---|---|")
  for name in ("both_towers", "one_tower"):
    r = result[name]
    print(f"| {name} | {r['ppl']:.3f} | {r['bits_per_byte']:.4f} | {r['tokens_per_sec']:,.0f} |")
  os.makedirs(os.path.join(args.workdir, "eval"), exist_ok=True)
  out_path = os.path.join(args.workdir, "eval", f"one_tower_{loaded.step}.json")
  with open(out_path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {out_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
