"""The lm-evaluation-harness (lm-eval) model "seqmodels": any lm-eval task on our checkpoints.

    seqmodels-lm-eval --model seqmodels --model_args workdir=DIR[,step=N] --tasks hellaswag,lambada_openai
    python -m seqmodels.lm_eval_adapter ...    (the same command without the console script)

    lm_eval --model seqmodels ...              (lm-eval's own command, once seqmodels is pip-installed)

lm-eval 0.4 finds models only in a table its own package fills, with no plugin entry point, so an
installed seqmodels adds "seqmodels" to that table when lm-eval fills it (seqmodels_lm_eval_hook.py,
run at start-up by seqmodels_lm_eval.pth). From a source tree without installing, use the first two
commands, or import this module, which registers the model too:

    import lm_eval, seqmodels.lm_eval_adapter
    lm_eval.simple_evaluate(model="seqmodels", model_args="workdir=DIR", tasks=[...])

model_args: workdir=DIR (with step=N, the latest checkpoint when absent) or checkpoint=PATH (a Hugging
Face or state-spaces Mamba directory); batch_size (the run's when absent or "auto"); tokenizer (the
run's data.tokenizer when absent). lm-eval's command line hands every model its own --batch_size
(default 1), so there set --batch_size N rather than model_args batch_size. Bidirectional encoders
(LION) are refused: every request type needs a causal model.

Requests:
    loglikelihood          zero_shot.encode_request + zero_shot.loglikelihoods: the tokenization and
                           scorer of eval.py's zero-shot tasks, so both give the same acc on one task.
    loglikelihood_rolling  EOS + the text, cut into evaluate's non-overlapping seq_len windows: the
                           summed NLL of eval.py --text. lm-eval's Hugging Face model instead gives the
                           last window a full context; the two agree on texts of up to seq_len tokens.
    generate_until         greedy decoding (prefill the prompt, then one `step` per token) until a stop
                           string, EOS or max_gen_toks (default 256); the text is cut before the first
                           stop string.
"""

import sys

import jax.numpy as jnp
import lm_eval.models  # noqa: F401  Fills lm-eval's model table first: it skips that once the table is non-empty.
import numpy as np
import seqmodels_lm_eval_hook
from flax import nnx
from lm_eval.api.model import LM
from tqdm import tqdm

from seqmodels import evaluate, zero_shot
from seqmodels.errors import UserError

DEFAULT_MAX_GEN_TOKS = 256


@nnx.jit(static_argnums=3)
def _greedy_prefill(model, tokens, cache, vocab_size: int):
  logits, cache = model.prefill(tokens, cache)
  return jnp.argmax(logits[:, -1, :vocab_size], axis=-1), cache


@nnx.jit(static_argnums=3)
def _greedy_step(model, token, cache, vocab_size: int):
  logits, cache = model.step(token, cache)
  return jnp.argmax(logits[:, :vocab_size], axis=-1), cache


class SeqmodelsLM(LM):

  def __init__(self, workdir: str | None = None, step: int | None = None, checkpoint: str | None = None,
               batch_size: int | str | None = None, tokenizer: str | None = None, max_batch_size=None,
               device=None):
    super().__init__()
    del max_batch_size, device  # lm-eval passes its own options; JAX places the model itself.
    if (workdir is None) == (checkpoint is None):
      raise UserError("pass exactly one of model_args workdir=DIR (our run) or checkpoint=PATH (Mamba weights)")
    if checkpoint is not None and step is not None:
      raise UserError("model_args step=N picks a checkpoint of workdir=DIR; drop it with checkpoint=PATH")
    self.loaded = (evaluate.load(workdir, None if step is None else int(step)) if workdir is not None
                   else evaluate.load_checkpoint(checkpoint))
    self.model_config = self.loaded.config.model
    zero_shot.check_causal(self.model_config)
    self.tokenizer = evaluate.model_tokenizer(self.loaded, tokenizer)
    self.batch_size = self.loaded.config.batch_size if batch_size in (None, "auto") else int(batch_size)
    self.max_length = zero_shot.max_length(self.model_config)

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    encoded = [zero_shot.encode_request(self.tokenizer, *req.args) for req in requests]
    return zero_shot.loglikelihoods(self.loaded.model, encoded, batch_size=self.batch_size,
                                    max_length=self.max_length, progress=not disable_tqdm, desc="loglikelihood")

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    # Each window becomes a request: its first input is the context, its scored targets the continuation.
    windows, owner = [], []
    for r, req in enumerate(requests):
      tokens = np.asarray([self.tokenizer.eos_id] + self.tokenizer.encode(req.args[0]), np.int32)
      inputs, targets, mask = evaluate.scoring_windows(tokens, self.loaded.config.seq_len)
      for w in range(len(inputs)):
        n = int(mask[w].sum())
        if n:
          windows.append((inputs[w, :1].tolist(), targets[w, :n].tolist()))
          owner.append(r)
    scores = zero_shot.loglikelihoods(self.loaded.model, windows, batch_size=self.batch_size,
                                      max_length=self.max_length, progress=not disable_tqdm,
                                      desc="loglikelihood_rolling") if windows else []
    totals = [0.0] * len(requests)
    for r, (ll, _) in zip(owner, scores):
      totals[r] += ll
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    return [self._generate(*req.args) for req in tqdm(requests, desc="generate_until", disable=disable_tqdm)]

  def _generate(self, context: str, gen_kwargs: dict) -> str:
    gen_kwargs = dict(gen_kwargs)
    until = gen_kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_gen_toks = int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
    if gen_kwargs.pop("do_sample", False) or float(gen_kwargs.pop("temperature", 0.0) or 0.0) > 0:
      raise UserError("the seqmodels lm-eval model decodes greedily only; set do_sample=false and temperature=0")
    prompt = self.tokenizer.encode(context) or [self.tokenizer.eos_id]
    if self.max_length:
      # lm-eval truncates prompts from the left to leave room for the generation.
      prompt = prompt[-max(1, self.max_length - max_gen_toks):]
    cache_length = zero_shot.bucket_length(len(prompt) + max_gen_toks)
    if self.max_length:
      cache_length = min(cache_length, self.max_length)
    cache = self.loaded.model.init_cache(1, cache_length)
    vocab = self.model_config.vocab_size
    token, cache = _greedy_prefill(self.loaded.model, jnp.asarray([prompt], jnp.int32), cache, vocab)
    generated = []
    for _ in range(max_gen_toks):
      t = int(token[0])
      if t == self.tokenizer.eos_id:
        break
      generated.append(t)
      if (any(s in self.tokenizer.decode(generated) for s in until) or len(generated) == max_gen_toks
          or len(prompt) + len(generated) > cache_length):
        break
      token, cache = _greedy_step(self.loaded.model, token, cache, vocab)
    text = self.tokenizer.decode(generated)
    for stop in until:
      text = text.split(stop)[0]
    return text


# By name, not class: run as __main__, this module's classes are not the ones lm-eval should import.
seqmodels_lm_eval_hook.register()


def main(argv=None) -> None:
  """lm-eval's command line, with the "seqmodels" model registered."""
  from lm_eval.__main__ import cli_evaluate
  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  try:
    cli_evaluate()
  except UserError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
