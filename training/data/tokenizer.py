"""Tokenizers with one small interface: the byte-level default and any HF `tokenizer.json`.

Both map `str -> int32 ids` and back, expose `vocab_size`, `eos_id`, `pad_id`, `bos_id`, and the
start character of every token (`encode_with_starts`), from which `encode_segments` derives
per-token loss labels for texts made of labelled and unlabelled segments.
"""

from __future__ import annotations

import abc
import json
import pathlib
import re
from collections.abc import Sequence

import numpy as np

Segment = tuple[str, bool]  # (text, labelled): a piece of a document and whether it has loss

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class Tokenizer(abc.ABC):
  """`encode(text) -> [n] int32`, `decode(ids) -> str`; special-token names in the text are parsed
  as those tokens (as HF tokenizers do)."""

  vocab_size: int
  eos_id: int
  pad_id: int
  bos_id: int | None

  @abc.abstractmethod
  def encode_with_starts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [n] int32, starts [n] int64)`: the index in `text` of each token's first character."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of `ids`, special tokens included by name."""

  def encode(self, text: str) -> np.ndarray:
    return self.encode_with_starts(text)[0]

  def encode_segments(self, segments: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises the concatenated segments: `(ids [n] int32, labelled [n] bool)`.

    The text is encoded whole (so tokens merge across segment boundaries exactly as they would in
    the plain text); a token is labelled when its first character lies in a labelled segment.
    """
    text = "".join(s for s, _ in segments)
    if len({labelled for _, labelled in segments}) <= 1:
      ids = self.encode(text)
      return ids, np.full(len(ids), bool(segments and segments[0][1]))
    ids, starts = self.encode_with_starts(text)
    char_labels = np.concatenate([np.full(len(s), labelled) for s, labelled in segments])
    return ids, char_labels[starts]


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255, then `SPECIALS` from 256: vocab_size 261.

  Invalid UTF-8 round-trips through the `surrogateescape` error handler: any byte string `b`
  satisfies `encode(b.decode("utf-8", "surrogateescape")) == list(b)`.
  """

  SPECIALS = ("<|pad|>", "<|bos|>", "<|endoftext|>", IM_START, IM_END)  # ids 256..260
  pad_id, bos_id, eos_id = 256, 257, 258
  vocab_size = 256 + len(SPECIALS)
  _SPLIT = re.compile("(" + "|".join(map(re.escape, SPECIALS)) + ")")
  _SPECIAL_IDS = {name: 256 + i for i, name in enumerate(SPECIALS)}

  def encode_with_starts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    ids, starts, offset = [], [], 0
    for piece in self._SPLIT.split(text):
      if piece in self._SPECIAL_IDS:
        ids.append(np.array([self._SPECIAL_IDS[piece]], np.int32))
        starts.append(np.array([offset]))
      elif piece:
        data = piece.encode("utf-8", "surrogateescape")
        ids.append(np.frombuffer(data, np.uint8).astype(np.int32))
        starts.append(offset + np.repeat(np.arange(len(piece)), _utf8_widths(piece)))
      offset += len(piece)
    if not ids:
      return np.zeros(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate(ids), np.concatenate(starts).astype(np.int64)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, np.int64)
    specials = np.flatnonzero(ids >= 256)
    pieces, start = [], 0
    for i in [*specials, len(ids)]:
      pieces.append(ids[start:i].astype(np.uint8).tobytes().decode("utf-8", "surrogateescape"))
      if i < len(ids):
        pieces.append(self.SPECIALS[ids[i] - 256])
      start = i + 1
    return "".join(pieces)


def _utf8_widths(text: str) -> np.ndarray | int:
  """Bytes per character of `text.encode("utf-8", "surrogateescape")`: `[len(text)]` (or 1)."""
  if text.isascii():
    return 1
  points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
  escaped = (points >= 0xDC80) & (points <= 0xDCFF)  # one raw byte each
  return np.where(escaped, 1, 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000))


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` through the `tokenizers` package.

  `eos_token` and `pad_token` default to those of a `tokenizer_config.json` beside the file, else
  to the first of `EOS_CANDIDATES` in the vocabulary; the pad token falls back to the EOS token.
  No special tokens are added around the text (`add_special_tokens=False`).
  """

  EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")

  def __init__(self, path: str | pathlib.Path, *, eos_token: str | None = None,
               pad_token: str | None = None, bos_token: str | None = None):
    from tokenizers import Tokenizer as RustTokenizer
    self.path = pathlib.Path(path)
    self._tok = RustTokenizer.from_file(str(self.path))
    config = _tokenizer_config(self.path.with_name("tokenizer_config.json"))
    eos_token = eos_token or config.get("eos_token") or next(
        (t for t in self.EOS_CANDIDATES if self._tok.token_to_id(t) is not None), None)
    if eos_token is None:
      raise ValueError(f"{self.path}: no EOS token found; pass eos_token=...")
    self.eos_id = self._id(eos_token)
    self.pad_id = self._id(pad_token or config.get("pad_token") or eos_token)
    bos_token = bos_token or config.get("bos_token")
    self.bos_id = None if bos_token is None else self._id(bos_token)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def _id(self, token: str) -> int:
    token_id = self._tok.token_to_id(token)
    if token_id is None:
      raise ValueError(f"{self.path}: token {token!r} is not in the vocabulary")
    return token_id

  def encode_with_starts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    encoding = self._tok.encode(text, add_special_tokens=False)
    starts = np.array([start for start, _ in encoding.offsets], np.int64).reshape(-1)
    return np.asarray(encoding.ids, np.int32), starts

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _tokenizer_config(path: pathlib.Path) -> dict[str, str]:
  """The string-valued special tokens of a `tokenizer_config.json` (absent file: `{}`)."""
  if not path.is_file():
    return {}
  config = json.loads(path.read_text())
  tokens = {key: config.get(key) for key in ("eos_token", "pad_token", "bos_token")}
  return {key: value["content"] if isinstance(value, dict) else value
          for key, value in tokens.items() if value}


def make_tokenizer(spec: str | pathlib.Path | Tokenizer = "byte", **options) -> Tokenizer:
  """`"byte"` -> `ByteTokenizer`; a `tokenizer.json` file, or a folder holding one ->
  `HFTokenizer(path, **options)`; a `Tokenizer` is returned as is."""
  if isinstance(spec, Tokenizer):
    return spec
  if spec == "byte":
    return ByteTokenizer()
  path = pathlib.Path(spec)
  if path.is_dir():
    path = path / "tokenizer.json"
  if not path.is_file():
    raise ValueError(f"tokenizer {str(spec)!r}: expected 'byte', a tokenizer.json file or a folder "
                     "holding one")
  return HFTokenizer(path, **options)
