"""Tests for seqmodels.tokenizers and seqmodels.data."""

import json
import math
import os
import threading

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from seqmodels import data
from seqmodels.errors import UserError
from seqmodels.tokenizers import ByteTokenizer, load_tokenizer

SHAKESPEARE = os.path.join(os.path.dirname(data.__file__), "assets", "tinyshakespeare.txt")


def _write(path, content):
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content, encoding="utf-8")
  return str(path)


def _data_config(train_files, val_files=(), val_fraction=0.1):
  return ml_collections.ConfigDict({
      "train_files": tuple(train_files),
      "val_files": tuple(val_files),
      "val_fraction": val_fraction,
      "text_field": "text",
      "tokenizer": "byte",
  })


def _train_iterator(tokens, seed=0, global_batch_size=8, process_index=0, process_count=1):
  return data.make_train_iterator(
      tokens, seq_len=4, global_batch_size=global_batch_size, seed=seed,
      process_index=process_index, process_count=process_count)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _window_ids(batch, seq_len=4):
  """Window indices of a batch of np.arange tokens, whose window i starts with token i * seq_len."""
  return [int(row[0]) // seq_len for row in batch["inputs"]]


# 24 windows of 4 tokens whose first input tokens identify them.
ARANGE_TOKENS = np.arange(24 * 4 + 1, dtype=np.int32)


# Tokenizers.


def test_byte_tokenizer_round_trips_non_ascii():
  tokenizer = load_tokenizer("byte")
  text = "héllo wörld, 日本語 🙂"
  ids = tokenizer.encode(text)
  assert ids == list(text.encode("utf-8"))
  assert tokenizer.decode(ids + [tokenizer.eos_id]) == text
  assert tokenizer.vocab_size == 257 and tokenizer.eos_id == 256
  assert tokenizer.count_bytes(text) == len(text.encode("utf-8"))
  assert tokenizer.encode_batch(["a", "é"]) == [[97], [195, 169]]


def test_gpt_neox_tokenizer():
  tokenizer = load_tokenizer("gpt-neox")
  assert tokenizer.encode("Hello world") == [12092, 1533]
  assert tokenizer.encode_batch(["Hello world", "Hello"]) == [[12092, 1533], [12092]]
  assert tokenizer.vocab_size == 50277
  assert tokenizer.eos_id == 0
  assert tokenizer.decode([12092, 1533, 0]) == "Hello world"


def test_missing_tokenizer_file_names_path(tmp_path):
  path = str(tmp_path / "nope" / "tokenizer.json")
  with pytest.raises(UserError, match="nope/tokenizer.json"):
    load_tokenizer(path)


# Reading documents.


def test_reads_txt_and_jsonl(tmp_path):
  txt = _write(tmp_path / "a.txt", "whole\nfile\n")
  jsonl = _write(tmp_path / "b.jsonl", '{"text": "one"}\n\n{"text": "two", "id": 3}\n')
  assert list(data.read_documents([txt, jsonl])) == ["whole\nfile\n", "one", "two"]


def test_jsonl_text_field_is_configurable(tmp_path):
  jsonl = _write(tmp_path / "b.jsonl", '{"body": "one"}\n')
  assert list(data.read_documents([jsonl], text_field="body")) == ["one"]


def test_glob_expands_in_sorted_order(tmp_path):
  for name in ["b.txt", "a.txt", "c.md"]:
    _write(tmp_path / name, name)
  assert list(data.read_documents([str(tmp_path / "*.txt")])) == ["a.txt", "b.txt"]


def test_relative_paths_resolve_against_working_directory(tmp_path, monkeypatch):
  _write(tmp_path / "a.txt", "relative")
  monkeypatch.chdir(tmp_path)
  assert list(data.read_documents(["a.txt"])) == ["relative"]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
  jsonl = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": \n')
  with pytest.raises(UserError, match=f"{jsonl}:2: invalid JSON"):
    list(data.read_documents([jsonl]))


def test_jsonl_line_without_text_field_names_file_and_line(tmp_path):
  jsonl = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"content": "x"}\n')
  with pytest.raises(UserError, match=f"{jsonl}:3: expected a JSON object with a string 'text'"):
    list(data.read_documents([jsonl]))


def test_missing_file_and_empty_glob(tmp_path):
  with pytest.raises(UserError, match="missing.txt' not found"):
    data.read_documents([str(tmp_path / "missing.txt")])
  with pytest.raises(UserError, match="matches no files"):
    data.read_documents([str(tmp_path / "*.jsonl")])


def test_empty_corpus(tmp_path):
  empty = _write(tmp_path / "empty.txt", "")
  with pytest.raises(UserError, match="empty"):
    data.tokenize_documents(data.read_documents([empty]), ByteTokenizer())


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
  path = _write(tmp_path / "latin1.txt", b"caf\xe9! na\xefve \xff\xfe")
  jsonl = _write(tmp_path / "docs.jsonl", b'{"text": "ok"}\n{"text": "bad \x80"}\n')
  clean = _write(tmp_path / "clean.txt", "caf\u00e9 \ufffd")  # A real U+FFFD is text, not an error.
  report = data.DataReport()
  docs = list(data.read_documents([path, jsonl, clean], report=report))
  assert docs == ["caf\ufffd! na\ufffdve \ufffd\ufffd", "ok", "bad \ufffd", "caf\u00e9 \ufffd"]
  assert report.invalid_utf8_bytes == {path: 4, jsonl: 1}
  assert report.lines() == [f"data: 5 invalid UTF-8 bytes replaced by U+FFFD: {jsonl} (1), {path} (4)"]


def test_empty_files_are_skipped_and_reported(tmp_path):
  empty = _write(tmp_path / "a_empty.txt", "")
  text = _write(tmp_path / "b.txt", "hi")
  empty_jsonl = _write(tmp_path / "c.jsonl", "")
  report = data.DataReport()
  tokens = data.tokenize_documents(data.read_documents([empty, text, empty_jsonl], report=report), ByteTokenizer())
  np.testing.assert_array_equal(tokens, [104, 105, 256])
  assert report.lines() == [f"data: 1 empty documents skipped: {empty} (1)"]


def test_a_file_that_disappears_while_reading_is_a_clear_error(tmp_path):
  first = _write(tmp_path / "a.txt", "first")
  second = _write(tmp_path / "b.txt", "second")
  docs = data.read_documents([first, second])  # Both exist when the paths are checked.
  assert next(docs) == "first"
  os.remove(second)
  with pytest.raises(UserError, match=f"data file '{second}' disappeared while the data was being read"):
    next(docs)


def test_a_document_longer_than_the_context_spans_windows():
  tokens = data.tokenize_documents(["x" * 50], ByteTokenizer())  # 51 tokens with EOS, seq_len 8.
  windows = data.PackedWindows(tokens, seq_len=8)
  assert len(windows) == 6
  inputs = np.concatenate([windows[i]["inputs"] for i in range(len(windows))])
  np.testing.assert_array_equal(inputs, tokens[:48])  # Every token is used; only the ragged tail is cut.


# Tokenizing and packing.


def test_documents_are_separated_by_eos():
  tokens = data.tokenize_documents(["ab", "", "c"], ByteTokenizer())
  assert tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens, [97, 98, 256, 99, 256])


def test_packing_shifts_targets_and_counts_windows():
  tokens = np.arange(23, dtype=np.int32)  # (23 - 1) // 5 = 4 windows; the ragged tail is dropped.
  windows = data.PackedWindows(tokens, seq_len=5)
  assert len(windows) == 4
  np.testing.assert_array_equal(windows[1]["inputs"], [5, 6, 7, 8, 9])
  np.testing.assert_array_equal(windows[1]["targets"], [6, 7, 8, 9, 10])
  # Consecutive windows overlap by one token, so every token but the first is a target once.
  targets = np.concatenate([windows[i]["targets"] for i in range(len(windows))])
  np.testing.assert_array_equal(targets, np.arange(1, 21))


def test_eval_batches_are_in_order_and_drop_partial_batch():
  batches = data.make_eval_batches(ARANGE_TOKENS, seq_len=4, batch_size=5)
  assert len(batches) == 4  # 24 windows: four full batches, the last 4 windows dropped.
  assert [_window_ids(b) for b in batches][:2] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
  np.testing.assert_array_equal(batches[0]["targets"], batches[0]["inputs"] + 1)
  assert len(data.make_eval_batches(ARANGE_TOKENS, seq_len=4, batch_size=5, max_batches=2)) == 2


def test_eval_batches_keep_a_lone_partial_batch():
  batches = data.make_eval_batches(ARANGE_TOKENS, seq_len=4, batch_size=100)
  assert len(batches) == 1
  assert batches[0]["inputs"].shape == (24, 4)


# Train/validation splits.


def test_val_fraction_holds_out_the_tail():
  config = _data_config([SHAKESPEARE], val_fraction=0.1)
  train, val = data.load_splits(config, ByteTokenizer(), seq_len=64)
  with open(SHAKESPEARE, "rb") as f:
    stream = np.frombuffer(f.read(), np.uint8).astype(np.int32)
  stream = np.append(stream, 256)
  assert len(val) == int(len(stream) * 0.1)
  np.testing.assert_array_equal(np.concatenate([train, val]), stream)


def test_explicit_val_files(tmp_path):
  train_file = _write(tmp_path / "train.txt", "a" * 100)
  val_file = _write(tmp_path / "val.jsonl", json.dumps({"text": "b" * 20}) + "\n")
  config = _data_config([train_file], val_files=[val_file])
  train, val = data.load_splits(config, ByteTokenizer(), seq_len=8)
  assert len(train) == 101 and len(val) == 21
  assert set(val[:-1].tolist()) == {ord("b")}


def test_corpus_too_small_for_seq_len(tmp_path):
  config = _data_config([_write(tmp_path / "small.txt", "x" * 100)], val_fraction=0.1)
  with pytest.raises(UserError, match="seq_len"):
    data.load_splits(config, ByteTokenizer(), seq_len=32)


# Training iterator.


def test_train_batches_have_shapes_and_dtypes():
  batch = next(_train_iterator(ARANGE_TOKENS, global_batch_size=8))
  assert set(batch) == {"inputs", "targets"}
  for array in batch.values():
    assert array.shape == (8, 4) and array.dtype == np.int32
  np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
  # Without explicit sharding arguments the iterator asks JAX, which runs one process here.
  batch = next(data.make_train_iterator(ARANGE_TOKENS, seq_len=4, global_batch_size=8, seed=0))
  assert batch["inputs"].shape == (8, 4)


def test_train_order_is_set_by_seed():
  first = [_window_ids(b) for b in _take(_train_iterator(ARANGE_TOKENS, seed=1), 6)]
  again = [_window_ids(b) for b in _take(_train_iterator(ARANGE_TOKENS, seed=1), 6)]
  other = [_window_ids(b) for b in _take(_train_iterator(ARANGE_TOKENS, seed=2), 6)]
  assert first == again
  assert first != other


def test_each_epoch_is_a_new_permutation():
  iterator = _train_iterator(ARANGE_TOKENS, global_batch_size=24)  # One batch is one epoch.
  epochs = [_window_ids(b) for b in _take(iterator, 3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(24))
  assert epochs[0] != epochs[1] != epochs[2]


def test_processes_split_each_epoch():
  steps = []  # steps[p][k]: the windows process p sees at step k.
  for process_index in range(2):
    iterator = _train_iterator(ARANGE_TOKENS, global_batch_size=8, process_index=process_index,
                               process_count=2)
    batches = _take(iterator, 3)  # 3 steps of 8 windows globally is one epoch.
    assert batches[0]["inputs"].shape == (4, 4)
    steps.append([set(_window_ids(b)) for b in batches])
  seen = [set().union(*process_steps) for process_steps in steps]
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(24))
  # Together the processes see at each step what one process with the whole batch would.
  single_process = _train_iterator(ARANGE_TOKENS, global_batch_size=8)
  single = [set(_window_ids(b)) for b in _take(single_process, 3)]
  assert [a | b for a, b in zip(*steps)] == single


def test_batch_size_must_divide_over_processes():
  with pytest.raises(UserError, match="not divisible"):
    _train_iterator(ARANGE_TOKENS, global_batch_size=9, process_count=2)


def test_get_and_set_state_resume_exactly():
  iterator = _train_iterator(ARANGE_TOKENS, seed=3)
  _take(iterator, 5)
  state = iterator.get_state()
  expected = [_window_ids(b) for b in _take(iterator, 7)]
  resumed = _train_iterator(ARANGE_TOKENS, seed=3)
  resumed.set_state(state)
  assert [_window_ids(b) for b in _take(resumed, 7)] == expected


def test_orbax_checkpoint_resumes_exactly(tmp_path):
  iterator = _train_iterator(ARANGE_TOKENS, seed=4)
  _take(iterator, 5)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = [_window_ids(b) for b in _take(iterator, 7)]

  resumed = _train_iterator(ARANGE_TOKENS, seed=4)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    assert manager.latest_step() == 5
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert [_window_ids(b) for b in _take(resumed, 7)] == expected


def test_prefetcher_yields_the_batches_in_order_through_its_transform():
  plain = [_window_ids(b) for b in _take(_train_iterator(ARANGE_TOKENS, seed=5), 9)]
  prefetcher = data.Prefetcher(_train_iterator(ARANGE_TOKENS, seed=5), lambda b: _window_ids(b))
  try:
    assert _take(prefetcher, 9) == plain
  finally:
    prefetcher.close()


def test_prefetcher_fetches_the_next_batch_while_the_caller_works():
  second = threading.Event()
  batches_seen = []

  def transform(batch):
    batches_seen.append(batch)
    if len(batches_seen) == 2:
      second.set()
    return batch

  prefetcher = data.Prefetcher(_train_iterator(ARANGE_TOKENS, seed=5), transform)
  try:
    next(prefetcher)
    assert second.wait(timeout=10)  # The second batch, before anyone asked for it.
  finally:
    prefetcher.close()


def test_prefetcher_rewind_leaves_the_iterator_after_the_returned_batches():
  iterator = _train_iterator(ARANGE_TOKENS, seed=6)
  prefetcher = data.Prefetcher(iterator)
  _take(prefetcher, 5)  # A sixth is fetched ahead.
  prefetcher.rewind()
  expected = [_window_ids(b) for b in _take(_train_iterator(ARANGE_TOKENS, seed=6), 12)[5:]]
  resumed = _train_iterator(ARANGE_TOKENS, seed=6)
  resumed.set_state(iterator.get_state())
  assert [_window_ids(b) for b in _take(resumed, 7)] == expected
  assert [_window_ids(b) for b in _take(prefetcher, 7)] == expected  # Goes on after a rewind.
  prefetcher.close()


def test_prefetcher_raises_the_sources_error_at_next():
  def source():
    yield {"inputs": np.zeros(2)}
    raise UserError("data.train_files: bad line")

  class Source:  # The iterator protocol plus the state calls the prefetcher makes.
    def __init__(self):
      self.items = source()
    def __next__(self):
      return next(self.items)
    def get_state(self):
      return {}
    def set_state(self, state):
      del state

  prefetcher = data.Prefetcher(Source())
  next(prefetcher)
  with pytest.raises(UserError, match="bad line"):
    next(prefetcher)
  prefetcher.close()


# Unigram entropy.


def test_unigram_entropy_of_uniform_tokens_is_log_vocab():
  tokens = np.tile(np.arange(50, dtype=np.int32), 7)
  assert data.unigram_entropy(tokens, vocab_size=50) == pytest.approx(math.log(50))
  assert data.unigram_entropy(np.zeros(10, np.int32), vocab_size=50) == 0.0
