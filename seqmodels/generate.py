"""Sampling from a causal language model: a parallel prefill, then one compiled decoding loop.

    generator = Generator(model, vocab_size=tokenizer.vocab_size, sampling=Sampling(temperature=0.8, top_p=0.95),
                          stop_ids=(tokenizer.eos_id,))
    completions = generator.generate([prompt_ids, ...], max_new_tokens=128, seed=0)

A batch runs in two compiled parts:

- Prefill: the first `min(prompt lengths)` tokens of every row go through `model.prefill` in
  parallel (Mamba's scan with its returned state, RetNet's chunkwise retention, attention writing
  the KV cache), in chunks of a power-of-two length so that a long prompt's activations stay
  bounded and every prompt length reuses a few compiled shapes.
- Decoding: a `lax.while_loop` of `model.step` calls. Each iteration picks the token at one
  position for every row, from the previous logits, and feeds it back. A row whose prompt is
  longer than the batch's shortest is fed its own prompt tokens until they run out, so rows of
  different lengths share the batch without padding: no pad token ever reaches a recurrent state
  or an attention cache, and each row computes exactly what it would alone. The loop stops when
  every row has met a stop token or produced max_new_tokens. It checks that between blocks of
  `steps_per_check` steps, each block a loop of known length: on a GPU every check copies a flag to
  the host and waits for it, which cost mamba-370m 1.35 against 1.30 ms a token at batch 64
  (docs/generation.md).

The state the loop carries is the model's cache: O(1) per sequence for Mamba, DenseMamba, RetNet
and DenseRetNet, and for attention a KV cache preallocated for prompt plus new tokens. Beside it a
token buffer holds the positions past the prefill: the longer prompts' tails, then the new tokens.
Both lengths are rounded up to `length_multiple`, so that batches of nearby lengths share compiled
shapes, and a recurrent model's loop compiles once for any prompt length.

Sampling is greedy at temperature 0, else softmax(logits / temperature), restricted to the top_k
most likely tokens and then to the smallest set whose probability reaches top_p. Row i of a call
draws from the key fold_in(fold_in(key(seed), index_i), position), `index_i` its prompt's index,
so a prompt's sample does not depend on the batch it shares.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels import decode_matmul
from seqmodels import lm
from seqmodels.errors import UserError

@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0: greedy.
  top_k: int = 0  # 0: every token.
  top_p: float = 1.0  # 1: no nucleus cut.

  def check(self) -> None:
    if not (self.temperature >= 0 and math.isfinite(self.temperature)):
      raise UserError(f"--temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
    if self.top_k < 0:
      raise UserError(f"--top_k must be >= 0 (0: no limit), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise UserError(f"--top_p must be in (0, 1] (1: no limit), got {self.top_p}")


def check_causal(model_cfg) -> None:
  if getattr(lm.backbone_class(model_cfg.architecture), "bidirectional", False):
    raise UserError(f"model.architecture '{model_cfg.architecture}' is a bidirectional encoder and cannot generate "
                    "text; use a causal model (mamba, gpt, gpt2, retnet, dense_mamba, ...)")


def sample_tokens(logits, keys, position, sampling: Sampling, vocab_size: int):
  """The next token of each row: logits (batch, padded vocab) float32 -> (batch,) int32.

  Ids from vocab_size up (the padding of the embedding table) are never drawn.
  """
  logits = logits[:, :vocab_size]
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if 0 < sampling.top_k < vocab_size:
    kth_largest = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if sampling.top_p < 1:
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    # A token stays if the tokens more likely than it hold less than top_p: the most likely always does.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_kept = jnp.sum(mass_before < sampling.top_p, axis=-1, keepdims=True)
    smallest_kept = jnp.take_along_axis(descending, n_kept - 1, axis=-1)
    logits = jnp.where(logits < smallest_kept, -jnp.inf, logits)
  draw = lambda key, row: jax.random.categorical(jax.random.fold_in(key, position), row)
  return jax.vmap(draw)(keys, logits).astype(jnp.int32)


class DecodeState(NamedTuple):
  cache: Any  # The model's cache after tokens[:, :position].
  logits: jax.Array  # (batch, padded vocab) float32: the prediction for `position`.
  tokens: jax.Array  # (batch, width) int32: the tokens at positions offset, offset + 1, ...
  offset: jax.Array  # () int32: the first position not prefilled.
  prompt_lengths: jax.Array  # (batch,) int32
  ends: jax.Array  # (batch,) int32: prompt length + max_new_tokens.
  keys: jax.Array  # (batch,) PRNG keys.
  position: jax.Array  # () int32: the position the next iteration fills.
  done: jax.Array  # (batch,) bool


def prefill_chunk(graphdef, params, cache, tokens):
  """(the last position's logits (batch, padded vocab), cache) after running tokens (batch, length)."""
  model = nnx.merge(graphdef, params)
  logits, cache = model.prefill(tokens, cache, last_only=True)
  return logits[:, -1], cache


def decode_loop(graphdef, params, state: DecodeState, n_steps, *, sampling: Sampling, vocab_size: int,
                stop_ids: tuple, steps_per_check: int = 1):
  """Runs up to n_steps iterations of the decoding loop (fewer once every row is done).

  The loop decides whether to go on once every steps_per_check iterations, which n_steps must be a
  multiple of; a block of iterations is a loop of known length. On a GPU each decision copies a flag
  to the host and waits for the device, so a step-by-step loop leaves the device idle between steps;
  once every row is done a block runs up to steps_per_check - 1 iterations that change nothing the
  caller reads (Generator.completions stops at each row's end and first stop token).
  """
  model = nnx.merge(graphdef, params)
  last = state.position + n_steps
  stop_ids = jnp.asarray(stop_ids, jnp.int32)

  def running(s: DecodeState):
    return (s.position < last) & ~jnp.all(s.done)

  def iteration(s: DecodeState):
    sampled = sample_tokens(s.logits, s.keys, s.position, sampling, vocab_size)
    in_prompt = s.position < s.prompt_lengths
    column = s.position - s.offset
    chosen = jnp.where(in_prompt, jax.lax.dynamic_index_in_dim(s.tokens, column, 1, keepdims=False), sampled)
    tokens = jax.lax.dynamic_update_index_in_dim(s.tokens, chosen, column, 1)
    stopped = ~in_prompt & jnp.any(chosen[:, None] == stop_ids, axis=-1)
    done = s.done | stopped | (s.position + 1 >= s.ends)
    logits, cache = model.step(chosen, s.cache)
    return s._replace(cache=cache, logits=logits, tokens=tokens, position=s.position + 1, done=done)

  block = lambda s: jax.lax.fori_loop(0, steps_per_check, lambda _, s: iteration(s), s)  # noqa: E731
  return jax.lax.while_loop(running, block, state)


def inference_model(model: nnx.Module) -> nnx.Module:
  """A copy whose Linear, Embed and Conv weights are stored in their modules' compute dtype, and,
  for a backbone that asks for it (`decode_matmul`), whose Linear products of a decoding step's
  few rows run kernels/decode_matmul.py on a GPU.

  Those modules cast their float32 weights to the compute dtype at every call, so casting once
  gives the same numbers, and a bf16 decoding step reads half the weight bytes. decode_matmul's
  dot_general is lax.dot_general wherever its kernel does not apply (CPU, prefill's many rows).
  """
  model = nnx.clone(model)
  backbone = getattr(model, "backbone", None)
  if backbone is not None and (getattr(backbone, "decode_matmul", False) or decode_matmul.EVERY_MODEL):
    for _, module in nnx.iter_modules(backbone):
      if isinstance(module, nnx.Linear):
        module.dot_general = decode_matmul.dot_general
  for _, module in nnx.iter_modules(model):
    dtype = getattr(module, "dtype", None)
    if not isinstance(module, (nnx.Linear, nnx.Embed, nnx.Conv)) or dtype is None or dtype == jnp.float32:
      continue
    for name in ("kernel", "bias", "embedding"):
      param = getattr(module, name, None)
      if isinstance(param, nnx.Param):
        param.set_value(param[...].astype(dtype))  # param[...] = would keep the float32 buffer
  return model


def prefill_chunks(length: int, max_chunk: int) -> list[int]:
  """Chunk lengths summing to `length`: max_chunk-sized ones, then the binary digits of the rest.

  Every chunk is a power of two up to max_chunk, so any prompt length compiles at most
  log2(max_chunk) + 1 prefill shapes.
  """
  chunks = [max_chunk] * (length // max_chunk)
  rest = length % max_chunk
  chunks += [1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1]
  return chunks


class Generator:
  """Generates continuations of token-id prompts from a causal LanguageModel.

  vocab_size: ids at or past it are never sampled (the tokenizer's vocabulary, at most the model's).
  prefill_tokens: batch x chunk length of one prefill call; bounds the prefill's activations.
  length_multiple: prompt + new tokens is rounded up to it for the shapes (KV cache, token buffer).
  steps_per_check: decoding goes on in blocks of this many steps, checking between blocks whether
    every row is done (decode_loop); the last n_steps % steps_per_check steps check every step.
  """

  def __init__(self, model, *, vocab_size: int, sampling: Sampling = Sampling(), stop_ids=(),
               prefill_tokens: int = 16384, length_multiple: int = 64, steps_per_check: int = 16):
    sampling.check()
    model = inference_model(model)
    graphdef, self.params = nnx.split(model)
    self.stop_ids = tuple(int(i) for i in stop_ids)
    # Bound here rather than passed as static arguments: a graphdef need not be hashable.
    self.prefill_jit = jax.jit(functools.partial(prefill_chunk, graphdef), donate_argnums=1)
    if steps_per_check < 1:
      raise UserError(f"steps_per_check must be at least 1, got {steps_per_check}")
    loop = functools.partial(decode_loop, graphdef, sampling=sampling, vocab_size=vocab_size, stop_ids=self.stop_ids)
    self.step_loop_jit = jax.jit(loop, donate_argnums=1)
    self.block_loop_jit = jax.jit(functools.partial(loop, steps_per_check=steps_per_check), donate_argnums=1)
    self.steps_per_check = steps_per_check
    self.init_cache = model.init_cache
    self.max_positions = None if model.positions is None else model.positions.num_embeddings
    self.prefill_tokens = prefill_tokens
    self.length_multiple = length_multiple

  def start(self, prompts: list[list[int]], max_new_tokens: int, *, seed: int = 0, indices=None) -> DecodeState:
    """Prefills a batch of prompts (token-id lists, any lengths >= 1) and returns the loop's state."""
    if max_new_tokens < 1:
      raise UserError(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    if lengths.min() < 1:
      raise UserError("a prompt is empty after tokenization; give every prompt some text")
    if self.max_positions is not None and lengths.max() + max_new_tokens > self.max_positions:
      raise UserError(f"a prompt plus --max_new_tokens needs {lengths.max() + max_new_tokens} positions but the "
                      f"model's learned position table has {self.max_positions}; shorten the prompt or lower "
                      "--max_new_tokens")
    batch, prefilled = len(prompts), int(lengths.min())
    total = self.round_up(lengths.max() + max_new_tokens)
    tokens = np.zeros((batch, self.round_up(lengths.max() - prefilled + max_new_tokens)), np.int32)
    for row, prompt in enumerate(prompts):
      tokens[row, :len(prompt) - prefilled] = prompt[prefilled:]
    indices = np.arange(batch) if indices is None else np.asarray(indices)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.asarray(indices, jnp.uint32))

    cache = self.init_cache(batch, total)
    max_chunk = 1 << max(0, (self.prefill_tokens // batch).bit_length() - 1)
    start, logits = 0, None
    for chunk in prefill_chunks(prefilled, max_chunk):
      chunk_tokens = np.asarray([prompt[start:start + chunk] for prompt in prompts], np.int32)
      logits, cache = self.prefill_jit(self.params, cache, jnp.asarray(chunk_tokens))
      start += chunk
    return DecodeState(cache=cache, logits=logits, tokens=jnp.asarray(tokens), offset=jnp.asarray(prefilled, jnp.int32),
                       prompt_lengths=jnp.asarray(lengths), ends=jnp.asarray(lengths + max_new_tokens), keys=keys,
                       position=jnp.asarray(prefilled, jnp.int32), done=jnp.zeros(batch, bool))

  def round_up(self, length: int) -> int:
    return self.length_multiple * math.ceil(length / self.length_multiple)

  def decode(self, state: DecodeState, n_steps: int) -> DecodeState:
    """Runs the compiled loop for up to n_steps more positions; `state` is consumed."""
    for loop, steps in self.loops(n_steps):
      state = loop(self.params, state, jnp.asarray(steps, jnp.int32))
    return state

  def loops(self, n_steps: int):
    """(compiled loop, its n_steps) pairs that decode runs for n_steps: whole blocks, then the rest."""
    blocks = n_steps - n_steps % self.steps_per_check
    return [(loop, steps) for loop, steps in ((self.block_loop_jit, blocks), (self.step_loop_jit, n_steps - blocks))
            if steps]

  def generate(self, prompts: list[list[int]], max_new_tokens: int, *, seed: int = 0, indices=None,
               on_progress: Callable[[list[list[int]]], bool] | None = None, progress_every: int | None = None):
    """The new tokens of each prompt, up to and without its first stop token.

    With on_progress, decoding pauses every progress_every positions (default steps_per_check) to
    call it with the tokens so far, and ends early when it returns True; without it decoding is one
    call of each compiled loop (`loops`).
    """
    state = self.start(prompts, max_new_tokens, seed=seed, indices=indices)
    remaining = int(np.max(state.ends)) - int(state.position)
    chunk = (progress_every or self.steps_per_check) if on_progress else remaining
    while remaining > 0 and not bool(jnp.all(state.done)):
      state = self.decode(state, min(chunk, remaining))
      remaining = int(np.max(state.ends)) - int(state.position)
      if on_progress and on_progress(self.completions(state)):
        break
    return self.completions(state)

  def completions(self, state: DecodeState) -> list[list[int]]:
    tokens, offset, position, lengths, ends = jax.device_get(
        (state.tokens, state.offset, state.position, state.prompt_lengths, state.ends))
    out = []
    for row, (length, end) in enumerate(zip(lengths, ends)):
      new = tokens[row, length - offset:min(end, position) - offset].tolist()
      stops = [i for i, token in enumerate(new) if token in self.stop_ids]
      out.append(new[:stops[0]] if stops else new)
    return out
