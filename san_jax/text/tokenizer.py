"""CLIP's byte-level BPE tokenizer, giving the same ids as `open_clip.tokenize` (without torch).

The text tower was trained on these exact ids, so every step below reproduces open_clip's behaviour
(checked id for id in tests/test_tokenizer.py):
  1. cleaning: ftfy.fix_text, html.unescape twice, strip, collapse whitespace runs to one space, lowercase;
  2. pre-tokenization by a regex: the two special-token strings, English contractions, letter runs,
     single digits, runs of other non-space symbols;
  3. each piece as UTF-8 bytes, each byte mapped to a printable unicode stand-in, the last one marked
     with '</w>' (end of word), then merged greedily by BPE rank;
  4. ids framed as [<start_of_text>, ..., <end_of_text>], zero padded to the context length; when too
     long, cut to the context length with <end_of_text> forced into the last position.

The vocabulary (`bpe_simple_vocab_16e6.txt.gz`, OpenAI's merges list) ships inside the open_clip_torch
wheel, which scripts/setup.sh installs with --no-deps. We only read that data file: importing open_clip
would pull in torch and torchvision.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import ftfy
import numpy as np
import regex

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_PATH_ENV = "SAN_JAX_BPE_PATH"
DEFAULT_CONTEXT_LENGTH = 77

START_TOKEN = "<start_of_text>"
END_TOKEN = "<end_of_text>"
END_OF_WORD = "</w>"
# CLIP's vocabulary: 256 byte symbols, the same 256 with '</w>', the first 48,894 merges of the file, and
# the two special tokens, in that order (so <start_of_text> = 49406, <end_of_text> = 49407).
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 256 * 2 + NUM_MERGES + 2

# Special-token strings typed in the text are recognised as such (as open_clip does); matching is
# case-insensitive, although the text is lowercased before it gets here anyway.
_PIECE_PATTERN = regex.compile(
    regex.escape(START_TOKEN) + "|" + regex.escape(END_TOKEN)
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


class BpeVocabNotFound(FileNotFoundError):
  pass


def _installed_bpe_path() -> Optional[Path]:
  """The vocabulary inside the installed open_clip package, found without importing the package."""
  try:
    spec = importlib.util.find_spec("open_clip")  # a top-level lookup does not run open_clip/__init__
  except (ImportError, ValueError):
    return None
  for folder in (spec.submodule_search_locations or []) if spec else []:
    candidate = Path(folder) / BPE_FILENAME
    if candidate.is_file():
      return candidate
  return None


def find_bpe_path(bpe_path: Optional[Union[str, os.PathLike]] = None) -> Path:
  """Where the vocabulary is: `bpe_path` if given, else $SAN_JAX_BPE_PATH, else open_clip's copy."""
  if bpe_path is None and os.environ.get(BPE_PATH_ENV):
    bpe_path = os.environ[BPE_PATH_ENV]
  if bpe_path is not None:
    path = Path(bpe_path).expanduser()
    if not path.is_file():
      raise BpeVocabNotFound(f"CLIP BPE vocabulary not found at {str(path)!r} (from bpe_path or ${BPE_PATH_ENV})")
    return path
  path = _installed_bpe_path()
  if path is None:
    raise BpeVocabNotFound(
        f"CLIP BPE vocabulary {BPE_FILENAME} not found. It ships inside the open_clip_torch wheel: install "
        f"it with `pip install --no-deps open_clip_torch==3.3.0` (scripts/setup.sh does this), or point "
        f"${BPE_PATH_ENV} (or the bpe_path argument) at a copy of {BPE_FILENAME}.")
  return path


@functools.lru_cache(maxsize=None)
def byte_symbols() -> Tuple[str, ...]:
  """The printable stand-in for each byte value 0..255, so BPE never sees whitespace or control chars.

  Bytes that are already printable Latin-1 characters stand for themselves; the other 68 are given the
  code points 256, 257, ... in byte order.
  """
  printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) \
      | set(range(ord("®"), ord("ÿ") + 1))
  symbols, extra = [], 0
  for b in range(256):
    if b in printable:
      symbols.append(chr(b))
    else:
      symbols.append(chr(256 + extra))
      extra += 1
  return tuple(symbols)


def _base_symbol_order() -> List[str]:
  # The vocabulary lists the printable bytes first (in byte order) and then the remapped ones: i.e. by
  # stand-in code point, which is how the original table was built.
  return sorted(byte_symbols(), key=lambda s: (ord(s) >= 256, ord(s)))


def _read_merges(path: Path) -> List[Tuple[str, str]]:
  with gzip.open(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a version header
  if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(f"{path} is not CLIP's BPE merges file (expected {NUM_MERGES} pairs after a header)")
  return merges


def _clean(text: str) -> str:
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text))  # twice: captions often hold doubly escaped entities
  return " ".join(text.strip().split()).lower()


class Tokenizer:
  """CLIP BPE tokenizer. `tok(texts)` -> int32 [N, context_length]; `tok.encode(text)` -> ids."""

  def __init__(self, bpe_path: Optional[Union[str, os.PathLike]] = None, cache_size: int = 1 << 16):
    self.bpe_path = find_bpe_path(bpe_path)
    merges = _read_merges(self.bpe_path)
    base = _base_symbol_order()
    vocab = base + [s + END_OF_WORD for s in base] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    self.encoder: Dict[str, int] = {s: i for i, s in enumerate(vocab)}
    self.decoder: Dict[int, str] = {i: s for s, i in self.encoder.items()}
    self.ranks: Dict[Tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
    self.start_id = self.encoder[START_TOKEN]
    self.end_id = self.encoder[END_TOKEN]
    self._byte_symbols = byte_symbols()
    # Vocabularies x templates repeat the same words thousands of times: memoise per piece.
    self._piece_ids = functools.lru_cache(maxsize=cache_size)(self._piece_ids_uncached)

  def bpe(self, word: str) -> List[str]:
    """Greedy BPE of one byte-symbol word: merge the lowest-ranked adjacent pair until none applies."""
    symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(symbols) > 1:
      pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
      best = min(pairs, key=lambda p: self.ranks.get(p, NUM_MERGES))
      if best not in self.ranks:
        break
      symbols = self._merge(symbols, best)
    return symbols

  @staticmethod
  def _merge(symbols: List[str], pair: Tuple[str, str]) -> List[str]:
    # Left to right, non-overlapping: "a a a" with (a, a) becomes "aa a".
    merged, i = [], 0
    while i < len(symbols):
      if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
        merged.append(symbols[i] + symbols[i + 1])
        i += 2
      else:
        merged.append(symbols[i])
        i += 1
    return merged

  def _piece_ids_uncached(self, piece: str) -> Tuple[int, ...]:
    if piece in (START_TOKEN, END_TOKEN):
      return (self.encoder[piece],)
    word = "".join(self._byte_symbols[b] for b in piece.encode("utf-8"))
    return tuple(self.encoder[s] for s in self.bpe(word))

  def encode(self, text: str) -> List[int]:
    """Token ids of `text`, without the start/end tokens and without truncation."""
    ids: List[int] = []
    for piece in _PIECE_PATTERN.findall(_clean(text)):
      ids.extend(self._piece_ids(piece))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Approximate inverse of `encode` (cleaning is lossy): for debugging and display."""
    byte_of = {s: b for b, s in enumerate(self._byte_symbols)}
    symbols = "".join(self.decoder[int(i)] for i in ids if int(i) not in (0, self.start_id, self.end_id))
    symbols = symbols.replace(END_OF_WORD, " ")
    return bytes(byte_of[c] if c in byte_of else ord(" ") for c in symbols).decode("utf-8", "replace").strip()

  def __call__(self, texts: Union[str, Sequence[str]],
               context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
    """int32 [N, context_length]: start, ids, end, zero padding; over-long rows end in the end token."""
    if isinstance(texts, str):
      texts = [texts]
    if context_length < 1:
      raise ValueError(f"context_length must be >= 1, got {context_length}")
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
      ids = [self.start_id] + self.encode(text) + [self.end_id]
      if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = self.end_id
      out[row, :len(ids)] = ids
    return out


@functools.lru_cache(maxsize=None)
def default_tokenizer() -> Tokenizer:
  """One shared instance (the vocabulary takes ~0.3 s to load), located as `find_bpe_path()` does."""
  return Tokenizer()


def tokenize(texts: Union[str, Sequence[str]], context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
  """`open_clip.tokenize` as int32 numpy: [N, context_length]."""
  return default_tokenizer()(texts, context_length)
