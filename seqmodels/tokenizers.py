"""Tokenizers: a byte-level one that needs no files, and any Hugging Face `tokenizer.json`.

`load_tokenizer(spec)` is the single entry point. `spec` is "byte", "gpt-neox" (the GPT-NeoX-20B
tokenizer shipped in seqmodels/assets), a path to a `tokenizer.json`, or a folder holding a byte-level
BPE as `vocab.json` and `merges.txt` (GPT-2's layout, e.g. shared/data/gpt2_tokenizer).
"""

import os
from typing import Iterable, Protocol

import tokenizers as hf_tokenizers

from seqmodels.errors import UserError

GPT_NEOX_PATH = os.path.join(os.path.dirname(__file__), "assets", "gpt_neox_20b_tokenizer.json")

# End-of-text tokens in the order we look for them; different model families name it differently.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")


class Tokenizer(Protocol):
  """What the data pipeline and the samplers need from a tokenizer."""

  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without EOS or any other added special token."""

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    """`encode` applied to each text."""

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special tokens such as EOS are dropped."""

  def count_bytes(self, text: str) -> int:
    """UTF-8 length of `text`: the denominator of bits-per-byte."""


class ByteTokenizer:
  """Ids 0..255 are the UTF-8 bytes of the text and 256 is EOS."""

  vocab_size = 257
  eos_id = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    return [self.encode(text) for text in texts]

  def decode(self, ids: Iterable[int]) -> str:
    # A model can emit a byte sequence that is not valid UTF-8, so decoding must not fail.
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

  def count_bytes(self, text: str) -> int:
    return len(text.encode("utf-8"))


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer loaded from a `tokenizer.json` file."""

  def __init__(self, path: str):
    try:
      self._tokenizer = _byte_level_bpe(path) if os.path.isdir(path) else hf_tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # The Rust side raises a bare Exception for any parse error.
      raise UserError(
          f"could not load tokenizer '{path}' ({e}) (data.tokenizer); pass a valid tokenizer.json, "
          "'gpt-neox' or 'byte' via --config.data.tokenizer=...") from e
    # Added tokens (EOS among them) can have ids past the base vocabulary, so count them too.
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    for token in _EOS_CANDIDATES:
      eos_id = self._tokenizer.token_to_id(token)
      if eos_id is not None:
        self.eos_id = eos_id
        break
    else:
      raise UserError(
          f"tokenizer '{path}' has none of the end-of-text tokens {', '.join(_EOS_CANDIDATES)} "
          "(data.tokenizer); use a tokenizer.json that defines one, or pass "
          "--config.data.tokenizer=byte")

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    # No special tokens: some post-processors add BOS/EOS, and the data pipeline places EOS itself.
    # The "fast" variant skips computing character offsets, which we never use.
    encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    return [encoding.ids for encoding in encodings]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tokenizer.decode(list(ids), skip_special_tokens=True)

  def count_bytes(self, text: str) -> int:
    return len(text.encode("utf-8"))


def _byte_level_bpe(folder: str) -> hf_tokenizers.Tokenizer:
  """GPT-2's tokenizer from its vocab.json and merges.txt: byte-level BPE, no prefix space."""
  files = [os.path.join(folder, name) for name in ("vocab.json", "merges.txt")]
  tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE.from_file(*files))
  tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = hf_tokenizers.decoders.ByteLevel()
  eos = [token for token in _EOS_CANDIDATES if tokenizer.token_to_id(token) is not None]
  tokenizer.add_special_tokens(eos)  # Already in the vocabulary; marked special so decoding drops them.
  return tokenizer


def load_tokenizer(spec: str) -> Tokenizer:
  """Returns the tokenizer named by `spec`: "byte", "gpt-neox", a tokenizer.json, or a vocab.json +
  merges.txt folder."""
  if spec == "byte":
    return ByteTokenizer()
  path = GPT_NEOX_PATH if spec == "gpt-neox" else os.path.expanduser(spec)
  is_bpe_folder = all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt"))
  if not (os.path.isfile(path) or is_bpe_folder):
    raise UserError(
        f"tokenizer '{path}' not found (data.tokenizer); pass an existing tokenizer.json, a folder with "
        "vocab.json and merges.txt, 'gpt-neox' or 'byte' via --config.data.tokenizer=...")
  return HFTokenizer(path)


def mask_token_id(tokenizer: Tokenizer) -> int:
  """The [MASK] id of masked-LM training: the first id past the tokenizer's vocabulary.

  No shipped tokenizer has a mask token of its own, so a masked LM needs model.vocab_size of at
  least tokenizer.vocab_size + 1.
  """
  return tokenizer.vocab_size
