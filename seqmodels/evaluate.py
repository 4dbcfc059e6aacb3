"""Evaluating checkpoints: zero-shot tasks, and token perplexity and bits per byte on text files.

Bits per byte divides the summed negative log-likelihood by the text's UTF-8 bytes (and ln 2), so
it compares models with different tokenizers; token perplexity does not. The zero-shot tasks and
their scoring live in seqmodels/zero_shot.py.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from seqmodels import checkpoint, data, zero_shot
from seqmodels.errors import UserError
from seqmodels.tokenizers import load_tokenizer


@dataclasses.dataclass
class LoadedModel:
  model: nnx.Module
  config: object
  step: int
  checkpoint_dir: str


def load(workdir: str, step: int | None = None) -> LoadedModel:
  """The model of `workdir` at checkpoint `step` (the latest when None)."""
  from seqmodels.trainer import Trainer  # The trainer knows the train state's structure.
  config = checkpoint.read_config(workdir)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    steps = ckpt.complete_steps()
    if not steps:
      raise UserError(f"no checkpoint in {ckpt.directory}; train first with train.py --workdir {workdir}")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise UserError(f"no checkpoint for step {step} in {ckpt.directory}; available: {sorted(steps)}")
    trainer = Trainer(config, workdir)
    state = ckpt.restore(step, trainer.abstract_state)
  finally:
    ckpt.close()
  return LoadedModel(nnx.merge(trainer.graphdef, state["params"]), config, step, ckpt.directory)


def load_checkpoint(path: str) -> LoadedModel:
  """A Hugging Face or state-spaces Mamba checkpoint directory (config.json plus weights)."""
  from seqmodels import hf_mamba
  model, config = hf_mamba.load_hf_mamba(path)
  return LoadedModel(model, config, 0, os.path.abspath(path))


def scoring_windows(tokens: np.ndarray, seq_len: int, context: int = 0):
  """Sliding windows that score every token but the first exactly once: (inputs, targets, mask).

  Windows advance by seq_len - context tokens. The first window scores all its targets; each later
  one only those past the previous window, which therefore see at least `context` earlier tokens.
  """
  if not 0 <= context < seq_len:
    raise UserError(f"--context {context} must be at least 0 and below the model's seq_len {seq_len}")
  stride = seq_len - context
  n_targets = len(tokens) - 1
  n_windows = 1 + max(0, math.ceil((n_targets - seq_len) / stride))
  starts = np.arange(n_windows) * stride
  padded = np.zeros(starts[-1] + seq_len + 1, np.int32)
  padded[:len(tokens)] = tokens
  positions = starts[:, None] + np.arange(seq_len)
  target_positions = positions + 1
  first_scored = np.concatenate([[1], starts[1:] + context + 1])
  mask = (target_positions >= first_scored[:, None]) & (target_positions <= n_targets)
  return padded[positions], padded[target_positions], mask.astype(np.float32)


@nnx.jit
def _summed_nll(model, inputs, targets, mask):
  nll = optax.softmax_cross_entropy_with_integer_labels(model(inputs), targets)
  return jnp.sum(nll * mask), jnp.sum(mask)


def zero_shot_tasks(loaded: LoadedModel, tasks: dict, *, batch_size: int | None = None, tokenizer: str | None = None,
                    progress: bool = True) -> dict:
  """{task: metrics} for `tasks` ({task: items}, from zero_shot.load_tasks); `tokenizer` overrides the run's."""
  cfg = loaded.config
  return zero_shot.evaluate(loaded.model, cfg.model, model_tokenizer(loaded, tokenizer), tasks,
                            batch_size=batch_size or cfg.batch_size, progress=progress)


def model_tokenizer(loaded: LoadedModel, override: str | None):
  """The run's tokenizer, or `override`, which must fit the model's vocabulary."""
  tokenizer = load_tokenizer(override or loaded.config.data.tokenizer)
  if tokenizer.vocab_size > loaded.config.model.vocab_size:
    raise UserError(f"tokenizer {override or loaded.config.data.tokenizer} has {tokenizer.vocab_size} tokens but the "
                    f"model only {loaded.config.model.vocab_size}; pass the --tokenizer the model was trained with")
  return tokenizer


def text_perplexity(loaded: LoadedModel, paths, *, batch_size: int | None = None, tokenizer: str | None = None,
                    context: int = 0, progress: bool = True) -> dict:
  """Perplexity and bits per byte of each file and of all of them together.

  Each file is one document, preceded by EOS so that its first token is scored too. Documents
  longer than seq_len are scored in sliding windows, every token past the first window with at
  least `context` tokens before it. `tokenizer` overrides the run's data.tokenizer.
  """
  cfg = loaded.config
  tokenizer = model_tokenizer(loaded, tokenizer)
  batch_size = batch_size or cfg.batch_size
  results, total_nll, total_tokens, total_bytes = {}, 0.0, 0, 0
  for path in paths:
    text = "".join(data.read_documents([path], config_key="--text"))
    if not text:
      raise UserError(f"text file '{path}' is empty; pass a file with text")
    tokens = np.asarray([tokenizer.eos_id] + tokenizer.encode(text), np.int32)
    inputs, targets, mask = scoring_windows(tokens, cfg.seq_len, context)
    nll, count = 0.0, 0.0
    for start in tqdm(range(0, len(inputs), batch_size), desc=path, disable=not progress, unit="batch"):
      batch = slice(start, start + batch_size)
      rows = len(inputs[batch])
      # Pad the last batch to full size so every batch has one shape and compiles once.
      pad = ((0, batch_size - rows), (0, 0))
      s, c = _summed_nll(loaded.model, *(np.pad(a[batch], pad) for a in (inputs, targets, mask)))
      nll, count = nll + float(s), count + float(c)
    n_bytes = tokenizer.count_bytes(text)
    results[path] = _scores(nll, int(count), n_bytes)
    total_nll, total_tokens, total_bytes = total_nll + nll, total_tokens + int(count), total_bytes + n_bytes
  results["all"] = _scores(total_nll, total_tokens, total_bytes)
  return results


def _scores(nll: float, tokens: int, n_bytes: int) -> dict:
  return {"ppl": math.exp(nll / tokens), "bits_per_byte": nll / math.log(2) / n_bytes,
          "loss": nll / tokens, "tokens": tokens, "bytes": n_bytes}
