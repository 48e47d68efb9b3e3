"""Document sources: random-access sequences of documents, each a tuple of `(text, labelled)`
segments (see `tokenizer.Segment`).

- `text`: plain-text files (`.txt`, optionally `.gz`/`.xz`); one document per file, or one per
  paragraph (`document_per="paragraph"`: split on blank lines).
- `jsonl`: one document per line, from the string field `text_field` ("text").
- `chatml`: one conversation per line, `{"messages": [{"role", "content"}, ...]}`, rendered as
  `<|im_start|>{role}\\n{content}<|im_end|>\\n`; only assistant contents and their `<|im_end|>`
  are labelled.
- `embedded`: the embedded Jane Austen corpus (`corpus/README.md`), one document per chapter.
- `passkey`, `mqar`: synthetic tasks (`synthetic.py`).

Each source also says whether the EOS that ends its documents is labelled (`label_eos`): yes for
prose (the model learns where documents end), no for chat and synthetic tasks.
"""

from __future__ import annotations

import functools
import glob
import gzip
import json
import lzma
import pathlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from dlax_training.data import synthetic
from dlax_training.data.tokenizer import IM_END, IM_START, Segment, Tokenizer

Document = tuple[Segment, ...]
CORPUS_PATH = pathlib.Path(__file__).with_name("corpus") / "austen.jsonl.xz"
CORPUS_VALIDATION_TITLES = ("Persuasion",)  # the held-out novel


class Source(Protocol):
  label_eos: bool

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Document: ...


class TextDocuments:
  """Plain documents, every character labelled."""

  label_eos = True

  def __init__(self, texts: Sequence[str]):
    self.texts = list(texts)

  def __len__(self) -> int:
    return len(self.texts)

  def __getitem__(self, index: int) -> Document:
    return ((self.texts[index], True),)


class ChatDocuments:
  """ChatML conversations with an assistant-only loss (see `render_chatml`)."""

  label_eos = False

  def __init__(self, conversations: Sequence[Sequence[dict]]):
    self.conversations = list(conversations)

  def __len__(self) -> int:
    return len(self.conversations)

  def __getitem__(self, index: int) -> Document:
    return render_chatml(self.conversations[index])


def render_chatml(messages: Sequence[dict]) -> Document:
  """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message; an assistant message's content and
  `<|im_end|>` are labelled, everything else (roles, markers, newlines, other turns) is not."""
  segments = []
  for message in messages:
    role, content = message["role"], message["content"]
    segments.append((f"{IM_START}{role}\n", False))
    segments.append((content + IM_END, role == "assistant"))
    segments.append(("\n", False))
  return tuple(segments)


def open_text(path: str | pathlib.Path):
  """Opens a text file for reading as UTF-8, decompressing `.gz` and `.xz` files."""
  path = str(path)
  opener = gzip.open if path.endswith(".gz") else lzma.open if path.endswith(".xz") else open
  return opener(path, "rt", encoding="utf-8")


def expand_paths(path: str | pathlib.Path | Sequence, suffixes: tuple[str, ...]) -> list[str]:
  """A file, a folder (its files with one of `suffixes`, recursively, sorted), a glob pattern, or
  a list of those."""
  if isinstance(path, (list, tuple)):
    return [p for item in path for p in expand_paths(item, suffixes)]
  path = pathlib.Path(path)
  if path.is_file():
    return [str(path)]
  if path.is_dir():
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
  else:
    found = sorted(glob.glob(str(path), recursive=True))
  if not found:
    raise FileNotFoundError(f"no {'/'.join(suffixes)} files at {str(path)!r}")
  return [str(p) for p in found]


def read_jsonl(path, suffixes=(".jsonl", ".jsonl.gz", ".jsonl.xz")) -> Iterator[dict]:
  for file in expand_paths(path, suffixes):
    with open_text(file) as f:
      for line_number, line in enumerate(f, 1):
        if line.strip():
          try:
            yield json.loads(line)
          except json.JSONDecodeError as error:
            raise ValueError(f"{file}:{line_number}: invalid JSON ({error.msg})") from None


def _field(record: dict, name: str, where: str):
  if name not in record:
    raise KeyError(f"{where}: no field {name!r} (fields: {sorted(record)})")
  return record[name]


def text_source(path, *, document_per: str = "file") -> TextDocuments:
  """`document_per="file"` or `"paragraph"` (split on blank lines; empty paragraphs dropped)."""
  if document_per not in ("file", "paragraph"):
    raise ValueError(f"document_per must be 'file' or 'paragraph', got {document_per!r}")
  texts = []
  for file in expand_paths(path, (".txt", ".txt.gz", ".txt.xz")):
    with open_text(file) as f:
      text = f.read()
    texts += [text] if document_per == "file" else [
        p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
  return TextDocuments(texts)


def jsonl_source(path, *, text_field: str = "text") -> TextDocuments:
  return TextDocuments([_field(r, text_field, str(path)) for r in read_jsonl(path)])


def chatml_source(path, *, messages_field: str = "messages") -> ChatDocuments:
  return ChatDocuments([_field(r, messages_field, str(path)) for r in read_jsonl(path)])


@functools.cache
def _corpus_records() -> tuple[dict, ...]:
  return tuple(read_jsonl(CORPUS_PATH))


def corpus_source(*, split: str = "train") -> TextDocuments:
  """The embedded corpus, one document per chapter: `split="train"` (five novels), `"validation"`
  (the held-out `CORPUS_VALIDATION_TITLES`) or `"all"`."""
  if split not in ("train", "validation", "all"):
    raise ValueError(f"corpus split must be 'train', 'validation' or 'all', got {split!r}")
  return TextDocuments([r["text"] for r in _corpus_records()
                        if split == "all" or (r["title"] in CORPUS_VALIDATION_TITLES) ==
                        (split == "validation")])


SOURCES: dict[str, Callable[..., Source]] = {
    "text": text_source, "jsonl": jsonl_source, "chatml": chatml_source, "embedded": corpus_source,
    "passkey": synthetic.PasskeyDocuments, "mqar": synthetic.MQARDocuments,
}
_FILE_SOURCES = ("text", "jsonl", "chatml")
_SYNTHETIC_SOURCES = ("passkey", "mqar")


def make_source(source: str | Source, *, path=None, tokenizer: Tokenizer | None = None,
                seed: int = 0, **options) -> Source:
  """A `Source` by name (`SOURCES`), or `source` itself if it is already one.

  File sources need `path`; synthetic ones get `seed`, and passkey the tokenizer (its `length`
  is in tokens), unless given in `options`.
  """
  if not isinstance(source, str):
    return source
  if source not in SOURCES:
    raise ValueError(f"unknown data source {source!r}; choose from {sorted(SOURCES)}")
  if source in _FILE_SOURCES:
    if path is None:
      raise ValueError(f"data source {source!r} needs a path")
    return SOURCES[source](path, **options)
  if path is not None:
    raise ValueError(f"data source {source!r} takes no path (got {path!r})")
  if source in _SYNTHETIC_SOURCES:
    options = {"seed": seed, **options}
  if source == "passkey":
    options.setdefault("tokenizer", tokenizer)
  return SOURCES[source](**options)
