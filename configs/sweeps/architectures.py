"""Every architecture on one corpus, tokenizer, token budget and schedule: the comparison of docs/results.md.

  python scripts/sweep.py --sweep configs/sweeps/architectures.py --parallel 4 --devices 0   # one GPU
  python scripts/sweep.py --sweep configs/sweeps/architectures.py:tiny                      # CPU check

Corpus: the 15 NLTK Gutenberg books (shared/data/gutenberg_nltk, 10 MB, public domain) followed by
the TinyStories train prefix (shared/data/tinystories, 4.2 MB, lower-cased by its carrier), 3.6M
GPT-2 tokens; the last 10% of the stream (TinyStories text) is the validation split. GPT-2's BPE
(shared/data/gpt2_tokenizer, 50257 tokens, table padded to 50304). The data folder is
$SEQMODELS_DATA, else ../shared/data beside the repo. `tiny` reads TinyStories alone.

Causal LMs at 25-31M non-embedding parameters, width 512: mamba and dense_mamba 16 layers (two Mamba
blocks per Transformer block, as in the Mamba paper), retnet 8 layers with 2 heads (head dim 256, as
in the paper), dense_retnet 14 layers (no FFN: 7 d^2 per block), gpt (Transformer++), gpt2,
parallel_gpt 8 layers with 8 heads, and linear_gpt and conv_gpt at GPT-2's shape, which is their
point: 8.5M non-embedding parameters. Every run: 256 steps of 16 x 512 tokens (2.1M tokens, 0.65
epoch), AdamW at 1e-3 (warmup 25 steps, cosine to 1e-4), bf16 compute; seeds 0 and 1 on the key pairs. After
training, eval.py scores the lower-cased TinyStories validation split (held-out text perplexity and
bits per byte) and LAMBADA.

Bidirectional encoders at 8 x 512 (25.7M non-embedding): LION-LIT, LION-D, LION-S and BERT (softmax
attention, configs/bert.py), each MLM-pretrained on the same tokens at 5e-4, then fine-tuned on BoolQ
for one epoch (92 steps of 32 x 512) from that checkpoint.

`quick` is the same at a quarter of the tokens (64 steps, 0.52M tokens), LAMBADA's first 500 items and no
BoolQ: what one GPU call of this project's budget holds (docs/results.md). `tiny` is the same sweep
with 2-layer models of width 32 and a few steps, for checking on a CPU.
"""

import os
import tempfile

from seqmodels.errors import UserError
from seqmodels.sweep import Sweep

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.normpath(os.environ.get("SEQMODELS_DATA") or os.path.join(REPO_ROOT, "..", "shared", "data"))

# name: (config file, layers, heads)
CAUSAL = {
    "mamba": ("mamba", 16, None),
    "dense_mamba": ("dense_mamba", 16, None),
    "retnet": ("retnet", 8, 2),
    "dense_retnet": ("dense_retnet", 14, 2),
    "gpt": ("gpt", 8, 8),
    "gpt2": ("gpt2", 8, 8),
    "parallel_gpt": ("parallel_gpt", 8, 8),
    "linear_gpt": ("linear_gpt", 8, 8),
    "conv_gpt": ("conv_gpt", 8, 8),
}
# The claims under test come in pairs; each of these trains with seeds 0 and 1, the rest with 0.
TWO_SEEDS = ("mamba", "dense_mamba", "retnet", "dense_retnet", "gpt")
ENCODERS = ("lion_lit", "lion_d", "lion_s", "bert")


def heldout_text(max_chars: int | None = None) -> str:
  """The TinyStories validation prefix (its first max_chars), lower-cased like the training text,
  written once to /tmp."""
  source = os.path.join(DATA, "tinystories", "tinystories_valid_prefix.txt")
  suffix = f"_{max_chars}" if max_chars else ""
  target = os.path.join(tempfile.gettempdir(), f"seqmodels_tinystories_valid_lowercased{suffix}.txt")
  if not os.path.isfile(target) and os.path.isfile(source):
    with open(source, encoding="utf-8") as f:
      text = f.read()[:max_chars].lower()
    with open(target + ".tmp", "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(target + ".tmp", target)
  return target


VARIANTS = ("full", "quick", "tiny")


def get_sweep(arg=None):
  variant = arg or "full"
  if variant not in VARIANTS:
    raise UserError(f"unknown variant '{arg}' of configs/sweeps/architectures.py; known: {', '.join(VARIANTS)}")
  tiny = variant == "tiny"
  width, batch, seq_len = (32, 4, 64) if tiny else (512, 16, 512)
  steps = {"full": 256, "quick": 64, "tiny": 6}[variant]
  tinystories = os.path.join(DATA, "tinystories", "tinystories_train_prefix_lowercased.txt")
  gutenberg = os.path.join(DATA, "gutenberg_nltk")
  if not tiny and not os.path.isdir(gutenberg):
    raise UserError(f"{gutenberg} is missing: set SEQMODELS_DATA to a folder holding gutenberg_nltk/ and tinystories/")
  books = () if tiny else tuple(sorted(os.path.join(gutenberg, f) for f in os.listdir(gutenberg) if f.endswith(".txt")))
  common = {
      "seq_len": seq_len, "batch_size": batch, "total_steps": steps, "learning_rate": 1e-3,
      "warmup_steps": max(1, steps // 10), "min_lr_ratio": 0.1, "weight_decay": 0.1, "beta2": 0.95,
      "log_every": 2 if tiny else 8, "val_every": steps // 2, "val_batches": 2 if tiny else 16,
      "checkpoint_every": steps // 2, "keep_checkpoints": 1, "mesh.data": 1,
      "data.train_files": (*books, tinystories),
      "data.val_files": (), "data.val_fraction": 0.1,
      "data.tokenizer": os.path.join(DATA, "gpt2_tokenizer"),
      "model.vocab_size": 50304, "model.d_model": width, "model.dtype": "float32" if tiny else "bfloat16",
  }
  causal = []
  for name, (config, n_layer, n_head) in CAUSAL.items():
    for seed in (0, 1) if name in TWO_SEEDS else (0,):
      run = {"name": f"{name}-s{seed}", "config": f"configs/{config}.py:tiny", **common, "seed": seed,
             "model.n_layer": 2 if tiny else n_layer}
      if n_head:
        run["model.n_head"] = 2 if tiny else n_head
      if name == "mamba":
        run["model.scan_layers"] = True  # One compiled layer instead of 16: the same model, compiled ~4x faster.
      if name == "dense_mamba" and not tiny:
        # Its 16 layers cannot be scanned, and the Pallas kernels compile once per call site: 32 of them
        # took ~4 minutes per input shape on the H100 (training, then each evaluation bucket). The
        # associative scan is the same recurrence (training losses agree to 1e-4, kernels/NOTES.md).
        run["model.scan_impl"] = "associative"
      if seed == 1:
        run["after"] = f"{name}-s0"  # One run of a model at a time keeps the GPU's memory apart.
      causal.append(run)
  mlm, boolq = [], []
  for name in ENCODERS:
    mlm.append({"name": f"{name}-mlm", "config": f"configs/{name}.py:tiny", **common, "seed": 0,
                "learning_rate": 5e-4, "beta2": 0.999, "weight_decay": 0.01,
                "model.n_layer": 2 if tiny else 8, "model.n_head": 2 if tiny else 8, "model.max_positions": seq_len})
    boolq.append({
        "name": f"{name}-boolq", "config": f"configs/{name}.py:tiny_boolq", "after": f"{name}-mlm", "seed": 0,
        "init_from": f"{{sweep_dir}}/{name}-mlm", "data.tokenizer": common["data.tokenizer"],
        "data.train_files": (os.path.join(DATA, "boolq", "boolq_llmfoundry.jsonl"),),
        "model.vocab_size": 50304, "model.d_model": width, "model.dtype": common["model.dtype"],
        "model.n_layer": mlm[-1]["model.n_layer"], "model.n_head": mlm[-1]["model.n_head"],
        "model.max_positions": seq_len, "seq_len": seq_len, "learning_rate": 1e-4,
        "total_steps": 4 if tiny else 92, "warmup_steps": 1 if tiny else 9, "val_every": 2 if tiny else 46,
        "checkpoint_every": 4 if tiny else 92, "keep_checkpoints": 1, "mesh.data": 1})
  # First every model once, the slowest (the Mamba family) leading so the cheap ones fill the GPU around
  # them; then the second seeds; BoolQ last.
  first = sorted((r for r in causal if r["seed"] == 0), key=lambda r: "mamba" not in r["name"])
  runs = first + mlm + [r for r in causal if r["seed"] == 1] + ([] if variant == "quick" else boolq)
  limit = {"full": (), "quick": ("--limit", "500"), "tiny": ("--limit", "8")}[variant]
  eval_args = ("--text", heldout_text(4000 if tiny else None), "--tasks", "lambada_openai", "--data_dir", DATA,
               "--batch_size", "8" if tiny else "64", *limit)
  return Sweep("architectures" if variant == "full" else f"architectures-{variant}", base="configs/gpt.py:tiny",
               runs=runs, eval_args=eval_args)
