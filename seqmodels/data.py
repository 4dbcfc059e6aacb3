"""Input pipeline for causal language modelling: files -> token stream -> packed windows -> batches.

Documents are tokenized once on the host into one int32 stream with EOS after each document. The
stream is cut into windows of seq_len + 1 tokens at stride seq_len, so consecutive windows share
one token and every token after the first is a target exactly once. A window's first seq_len
tokens are the inputs and its last seq_len tokens the targets.

Training batches come from a grain pipeline whose whole state is one integer per process, so it
checkpoints exactly; validation batches are a fixed list in stream order.
"""

import codecs
import collections
import concurrent.futures
import dataclasses
import glob
import json
import os
from typing import Iterable, Iterator, Sequence

import grain
import jax
import numpy as np

from seqmodels.errors import UserError
from seqmodels.tokenizers import Tokenizer

class DataReport:
  """What reading the data had to repair: invalid UTF-8 bytes and empty documents, per file."""

  def __init__(self):
    self.invalid_utf8_bytes = collections.Counter()
    self.empty_documents = collections.Counter()

  def lines(self) -> list[str]:
    """One log line per kind of repair, naming the files."""
    lines = []
    for counter, what in ((self.invalid_utf8_bytes, "invalid UTF-8 bytes replaced by U+FFFD"),
                          (self.empty_documents, "empty documents skipped")):
      if counter:
        where = ", ".join(f"{path} ({n})" for path, n in sorted(counter.items()))
        lines.append(f"data: {sum(counter.values())} {what}: {where}")
    return lines


# Bytes that are not UTF-8 become U+FFFD, as errors="replace" does, and are counted here, so a
# corpus in the wrong encoding shows up in the log instead of silently training on replacement marks.
_invalid_utf8 = [0]


def _count_and_replace(error: UnicodeDecodeError):
  _invalid_utf8[0] += error.end - error.start
  return "\ufffd", error.end


codecs.register_error("seqmodels.count_and_replace", _count_and_replace)


def _open_text(path: str, config_key: str):
  try:
    return open(path, encoding="utf-8", errors="seqmodels.count_and_replace")
  except FileNotFoundError:
    raise UserError(f"data file '{path}' disappeared while the data was being read ({config_key}); restore it "
                    f"or remove it from --config.{config_key}=..., then rerun") from None
  except OSError as e:
    raise UserError(f"data file '{path}' could not be read ({e.strerror}); fix it or remove it from "
                    f"--config.{config_key}=...") from None


# Documents handed to the tokenizer at once: large enough for its thread pool, small enough that
# a big JSONL corpus is never held as text all at once.
_ENCODE_BATCH = 1024


def _expand_paths(paths: Sequence[str] | str, config_key: str) -> list[str]:
  """Globs and checks `paths`, keeping the order given; globs expand in sorted order."""
  if isinstance(paths, str):  # A single path passed on the command line instead of a tuple.
    paths = [paths]
  files = []
  for pattern in paths:
    pattern = os.path.expanduser(pattern)
    if any(c in pattern for c in "*?["):
      matches = sorted(glob.glob(pattern))
      if not matches:
        raise UserError(
            f"data glob '{pattern}' matches no files ({config_key}); fix the pattern or pass "
            f"--config.{config_key}=...")
      files.extend(matches)
    elif os.path.isdir(pattern):
      raise UserError(
          f"data path '{pattern}' is a directory ({config_key}); pass files or a glob such as "
          f"'{os.path.join(pattern, '*.txt')}' via --config.{config_key}=...")
    elif not os.path.exists(pattern):
      raise UserError(
          f"data file '{pattern}' not found ({config_key}); fix the path or pass "
          f"--config.{config_key}=...")
    else:
      files.append(pattern)
  if not files:
    raise UserError(f"no data files given ({config_key}); pass --config.{config_key}=...")
  return files


def _jsonl_records(path: str, text_field: str, config_key: str = "data.train_files") -> Iterator[tuple[int, dict]]:
  """Yields (line number, record) for each JSON object with a string `text_field` in `path`."""
  with _open_text(path, config_key) as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(
            f"{path}:{line_number}: invalid JSON ({e.msg}); each line of a .jsonl file must be one "
            "JSON object, so fix or remove the line") from e
      if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise UserError(
            f"{path}:{line_number}: expected a JSON object with a string '{text_field}' field; fix "
            "the line or name the right field with --config.data.text_field=...")
      yield line_number, record


def read_documents(
    paths: Sequence[str] | str, *, text_field: str = "text", config_key: str = "data.train_files",
    report: DataReport | None = None,
) -> Iterator[str]:
  """Yields the documents in `paths` (files or globs, relative to the working directory).

  A `.jsonl` file holds one JSON object per line whose `text_field` is a document; any other file
  is one document. Bytes that are not UTF-8 become U+FFFD rather than failing the run, and are
  counted in `report` with the empty documents. All paths are checked before this returns, and a
  file that disappears before it is read is a UserError; `config_key` names the setting in errors.
  """
  files = _expand_paths(paths, config_key)
  report = report or DataReport()

  def file_documents(path):
    if path.endswith(".jsonl"):
      for _, record in _jsonl_records(path, text_field, config_key):
        yield record[text_field]
    else:
      with _open_text(path, config_key) as f:
        yield f.read()

  def documents():
    for path in files:
      invalid_before = _invalid_utf8[0]
      for doc in file_documents(path):
        if not doc:
          report.empty_documents[path] += 1
        yield doc
      if _invalid_utf8[0] > invalid_before:
        report.invalid_utf8_bytes[path] += _invalid_utf8[0] - invalid_before

  return documents()


def _with_eos(encoded: Iterable[list[int]], eos_id: int) -> Iterator[int]:
  for ids in encoded:
    yield from ids
    yield eos_id


def tokenize_documents(
    docs: Iterable[str], tokenizer: Tokenizer, *, config_key: str = "data.train_files"
) -> np.ndarray:
  """Returns the int32 token stream of `docs`, each document followed by EOS.

  Empty documents are skipped: a lone EOS teaches nothing. A corpus with no text at all is an
  error; `config_key` names the setting in its message.
  """
  def encode(batch):
    return np.fromiter(_with_eos(tokenizer.encode_batch(batch), tokenizer.eos_id), np.int32)

  chunks = []
  batch = []
  for doc in docs:
    if doc:
      batch.append(doc)
    if len(batch) == _ENCODE_BATCH:
      chunks.append(encode(batch))
      batch = []
  if batch:
    chunks.append(encode(batch))
  if not chunks:
    raise UserError(
        f"the data files are empty ({config_key}); point --config.{config_key}=... at files "
        "with text")
  return np.concatenate(chunks)


def _check_length(tokens: np.ndarray, seq_len: int, what: str, fix: str) -> None:
  if len(tokens) < seq_len + 1:
    raise UserError(
        f"the {what} has {len(tokens)} tokens, too few for one example of seq_len + 1 = "
        f"{seq_len + 1} tokens; {fix}")


def load_splits(
    data_config, tokenizer: Tokenizer, *, seq_len: int, report: DataReport | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Returns the (train, validation) token streams described by `data_config`.

  With `val_files` set, they are the validation corpus. Otherwise the last `val_fraction` of the
  training stream is held out, as nanoGPT does, so the two splits share no token. `report`
  collects what reading repaired (see read_documents).
  """
  train = tokenize_documents(
      read_documents(data_config.train_files, text_field=data_config.text_field, report=report),
      tokenizer, config_key="data.train_files")
  if data_config.val_files:
    val = tokenize_documents(
        read_documents(
            data_config.val_files, text_field=data_config.text_field, config_key="data.val_files",
            report=report),
        tokenizer, config_key="data.val_files")
    _check_length(
        val, seq_len, "validation corpus", "add text to data.val_files or use a smaller seq_len")
  else:
    if not 0 < data_config.val_fraction < 1:
      raise UserError(
          f"data.val_fraction is {data_config.val_fraction} but must be between 0 and 1 when "
          "data.val_files is empty; pass e.g. --config.data.val_fraction=0.1")
    num_val = int(len(train) * data_config.val_fraction)
    train, val = train[:len(train) - num_val], train[len(train) - num_val:]
    _check_length(
        val, seq_len, "validation split",
        "raise --config.data.val_fraction, add training text, or use a smaller seq_len")
  _check_length(train, seq_len, "training corpus", "add training text or use a smaller seq_len")
  return train, val


class PackedWindows:
  """The packed examples of a token stream, by index; a grain data source."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self._tokens = tokens
    self._seq_len = seq_len

  def __len__(self) -> int:
    # The ragged tail that cannot fill a whole window is dropped.
    return max(0, (len(self._tokens) - 1) // self._seq_len)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < len(self):
      raise IndexError(f"window {index} out of range for {len(self)} windows")
    start = index * self._seq_len
    window = self._tokens[start:start + self._seq_len + 1]
    return {"inputs": window[:-1], "targets": window[1:]}


@dataclasses.dataclass(frozen=True)
class MaskedLM:
  """BERT's masked-LM corruption of a window, as a grain random map (window, rng) -> example.

  Each input token is chosen with probability `rate`; a chosen token becomes `mask_id` with
  probability 0.8, a uniformly random token of the vocabulary with 0.1, and stays with 0.1. The
  example's targets are the original tokens and its weights 1 at the chosen positions, 0 elsewhere,
  so the loss is the mean over the chosen positions. Only the window's inputs are used.
  """
  mask_id: int
  vocab_size: int
  rate: float = 0.15

  def __call__(self, window: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    tokens = window["inputs"]
    chosen = rng.random(tokens.shape) < self.rate
    action = rng.random(tokens.shape)
    random_tokens = rng.integers(0, self.vocab_size, tokens.shape)
    inputs = np.where(chosen & (action < 0.8), self.mask_id, tokens)
    inputs = np.where(chosen & (action >= 0.9), random_tokens, inputs)
    return {"inputs": inputs.astype(np.int32), "targets": tokens, "weights": chosen.astype(np.float32)}


def make_train_iterator(
    tokens: np.ndarray,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    mlm: MaskedLM | None = None,
) -> grain.DatasetIterator:
  """Returns an endless iterator of this process's training batches.

  Each batch is {"inputs", "targets"}: int32[global_batch_size // process_count, seq_len]. Every
  epoch visits all windows in a fresh order fixed by `seed`. The processes split one global order
  between them, so the union of their batches at a step is what a single process would see with
  the same global batch. `get_state()`/`set_state()` (and grain's Orbax handler) resume exactly.

  With `mlm`, each window is masked as `MaskedLM` describes and the batch also holds float32
  "weights"; the masks depend only on `seed` and the window's position in the global order, so
  they too are the same after a resume.
  """
  _check_length(tokens, seq_len, "training corpus", "add training text or use a smaller seq_len")
  windows = PackedWindows(np.asarray(tokens, dtype=np.int32), seq_len)
  return _train_batches(windows, global_batch_size=global_batch_size, seed=seed, process_index=process_index,
                        process_count=process_count, transform=mlm)


def _train_batches(source, *, global_batch_size, seed, process_index, process_count, transform=None):
  """Shuffled, repeated, process-split batches of a grain source, optionally through a random map."""
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if global_batch_size % process_count:
    raise UserError(
        f"global batch size {global_batch_size} is not divisible by the {process_count} processes; "
        "pass a batch size that is a multiple of the process count")
  # grain shuffles epoch e with seed + e, so seeds 0 and 1 would give the same orders one epoch
  # apart; hashing the seed makes different seeds give unrelated orders.
  shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
  dataset = (
      grain.MapDataset.source(source)
      .shuffle(seed=shuffle_seed)
      .repeat())  # Forever; the shuffle above is reseeded per epoch.
  if transform is not None:
    # Before the split, so an element's randomness follows its place in the one global order.
    dataset = dataset.random_map(transform, seed=int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))
  dataset = (
      dataset
      # Process p takes positions p, p + process_count, ... of the one global order.
      .slice(slice(process_index, None, process_count))
      .batch(global_batch_size // process_count, drop_remainder=True))
  # The data are in memory and a batch is a few slices, so reader threads would only contend for
  # the GIL with the training loop.
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0)))


class Prefetcher:
  """Produces the next batch, through `transform` (e.g. onto the devices), in a background thread.

  The training loop needs its next batch the moment a step is dispatched, and on GPU a dispatch
  returns only when the device can take the step; reading and placing the batch in that moment
  left the device idle a few ms a step (train.py on 2 H200s, GPT-125m: next() 3.5 ms at 16 x 2048
  tokens). The wrapped iterator stays the one to checkpoint: `rewind()` first hands back the batch
  fetched ahead, so the iterator's state is that after the batches returned.
  """

  def __init__(self, iterator, transform=lambda batch: batch):
    self.iterator, self.transform = iterator, transform
    self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    self._ahead = None  # (the iterator's state before the fetch, the fetch's future)

  def __iter__(self):
    return self

  def _fetch(self):
    return self.transform(next(self.iterator))

  def __next__(self):
    batch = self._worker.submit(self._fetch).result() if self._ahead is None else self._ahead[1].result()
    self._ahead = (self.iterator.get_state(), self._worker.submit(self._fetch))
    return batch

  def rewind(self) -> None:
    """Drops the batch fetched ahead and restores the iterator's state from before it."""
    if self._ahead is not None:
      state, future = self._ahead
      self._ahead = None
      concurrent.futures.wait([future])  # Dropped, error and all: fetching it again repeats both.
      self.iterator.set_state(state)

  def close(self) -> None:
    self.rewind()
    self._worker.shutdown()


def make_eval_batches(
    tokens: np.ndarray, *, seq_len: int, batch_size: int, max_batches: int | None = None,
    mlm: MaskedLM | None = None, seed: int = 0,
) -> list[dict[str, np.ndarray]]:
  """Returns validation batches over the windows of `tokens` in stream order.

  Batches are full (batch_size rows) so every evaluation has the same shapes and compiles once; a
  trailing partial batch is dropped unless it is the only batch, which keeps a small validation
  set usable. At most `max_batches` batches are returned when it is set. With `mlm`, the windows
  are masked once, from `seed`, so every evaluation scores the same positions.
  """
  rng = np.random.default_rng(seed)
  _check_length(tokens, seq_len, "validation split", "add validation text or use a smaller seq_len")
  tokens = np.asarray(tokens, dtype=np.int32)
  num_windows = len(PackedWindows(tokens, seq_len))
  num_batches = max(1, num_windows // batch_size)
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  batches = []
  offsets = np.arange(seq_len + 1)
  for b in range(num_batches):
    starts = np.arange(b * batch_size, min((b + 1) * batch_size, num_windows)) * seq_len
    windows = tokens[starts[:, None] + offsets]
    batch = {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
    batches.append(batch if mlm is None else mlm(batch, rng))
  return batches


class Examples:
  """Fixed-length labelled examples held as equally long arrays, by index; a grain data source."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays

  def __len__(self) -> int:
    return len(self.arrays["targets"])

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    return {key: array[index] for key, array in self.arrays.items()}

  def split(self, at: int) -> tuple["Examples", "Examples"]:
    return Examples(self[:at]), Examples(self[at:])


def read_classification(
    paths: Sequence[str] | str, tokenizer: Tokenizer, *, seq_len: int, text_field: str, label_field: str,
    num_classes: int, config_key: str = "data.train_files",
) -> Examples:
  """The labelled examples of JSONL records {text_field: text, label_field: 0 .. num_classes - 1}.

  A text of more than seq_len tokens keeps its last seq_len (llm-foundry's BoolQ queries end with
  the question); a shorter one is padded at the end. Each example has int32 "inputs" (seq_len),
  float32 "mask" (1 for tokens, 0 for padding), int32 "targets" (the label) and float32 "weights"
  (1; padding rows of an evaluation batch get 0).
  """
  texts, labels = [], []
  for path in _expand_paths(paths, config_key):
    for line_number, record in _jsonl_records(path, text_field, config_key):
      label = record.get(label_field)
      if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
        raise UserError(
            f"{path}:{line_number}: expected an integer '{label_field}' field in 0..{num_classes - 1}; fix "
            "the line, name the field with --config.data.label_field=... or set --config.num_classes=...")
      if not record[text_field]:
        raise UserError(f"{path}:{line_number}: the '{text_field}' field is empty; fix or remove the line")
      texts.append(record[text_field])
      labels.append(label)
  if not texts:
    raise UserError(f"the data files hold no records ({config_key}); point --config.{config_key}=... at "
                    "JSONL files with labelled records")
  inputs = np.zeros((len(texts), seq_len), np.int32)
  mask = np.zeros((len(texts), seq_len), np.float32)
  for start in range(0, len(texts), _ENCODE_BATCH):
    for i, ids in enumerate(tokenizer.encode_batch(texts[start:start + _ENCODE_BATCH]), start=start):
      ids = ids[-seq_len:]
      inputs[i, :len(ids)] = ids
      mask[i, :len(ids)] = 1
  return Examples({"inputs": inputs, "mask": mask, "targets": np.asarray(labels, np.int32),
                   "weights": np.ones(len(texts), np.float32)})


def load_classification(
    data_config, tokenizer: Tokenizer, *, seq_len: int, num_classes: int
) -> tuple[Examples, Examples]:
  """Returns the (train, validation) examples described by `data_config`.

  With `val_files` set, they are the validation set. Otherwise the last `val_fraction` of the
  training records is held out (for BoolQ, whose validation split is the only one shipped, the
  last 327 of its 3270 records).
  """
  def read(paths, config_key):
    return read_classification(paths, tokenizer, seq_len=seq_len, text_field=data_config.text_field,
                               label_field=data_config.label_field, num_classes=num_classes,
                               config_key=config_key)

  train = read(data_config.train_files, "data.train_files")
  if data_config.val_files:
    return train, read(data_config.val_files, "data.val_files")
  num_val = int(len(train) * data_config.val_fraction)
  if not 0 < num_val < len(train):
    raise UserError(
        f"data.val_fraction={data_config.val_fraction} of {len(train)} records holds out {num_val}; pick a "
        "fraction that leaves records on both sides, or pass --config.data.val_files=...")
  return train.split(len(train) - num_val)


def make_example_iterator(
    examples: Examples, *, global_batch_size: int, seed: int, process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
  """An endless iterator of this process's training batches of `examples`, as make_train_iterator."""
  return _train_batches(examples, global_batch_size=global_batch_size, seed=seed, process_index=process_index,
                        process_count=process_count)


def make_example_batches(examples: Examples, *, batch_size: int) -> list[dict[str, np.ndarray]]:
  """Batches of every example once, in order; the last is filled up with weight-0 copies of the
  first example, so every batch has one shape and the weighted metrics count each example once."""
  batches = []
  for start in range(0, len(examples), batch_size):
    index = np.arange(start, start + batch_size)
    real = index < len(examples)
    batch = examples[np.where(real, index, 0)]
    batch["weights"] = batch["weights"] * real
    batches.append(batch)
  return batches


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
  """Entropy in nats/token of the tokens' empirical unigram distribution.

  This is the loss of the best model that ignores context, so a trained model must beat it.
  """
  counts = np.bincount(tokens, minlength=vocab_size)
  if len(counts) > vocab_size:
    raise ValueError(f"token id {len(counts) - 1} is outside the vocabulary of {vocab_size}")
  p = counts[counts > 0] / len(tokens)
  return float((p * np.log(1 / p)).sum())
