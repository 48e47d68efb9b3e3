"""The grain pipeline: documents -> shuffle per epoch -> process shard -> tokenise -> pack -> batch.

Order of documents. Epoch `e` visits the source in the order of grain's index shuffle with seed
`seed + e` (or in order when `shuffle=False`); the epochs follow one another in one global
document stream. Process `p` of `P` takes the documents `p, p + P, p + 2P, ...` of that stream,
so the processes' documents are disjoint and together are exactly the single-process stream.

Packing. Each document is tokenised and ended with EOS (labelled or not: `Source.label_eos`);
a process concatenates its documents and cuts the stream into rows of `seq_len + 1` tokens,
splitting documents across rows and epochs (no token is dropped or repeated). With
`packing=False` each row holds one document (longer ones are an error), padded with `pad_id`.
A finite stream (`num_epochs`) ends with its partial row padded, then fully padded rows up to a
whole batch. Padding has `loss_mask` 0 and `segment_ids` 0. Rows do not overlap, so the first
token of a row is only an input, never a target.

Batches (per process, `B = global_batch_size // process_count` rows), numpy:
- `tokens [B, T+1] int32`: inputs are `tokens[:, :-1]`, targets `tokens[:, 1:]`;
- `loss_mask [B, T] bool`: whether target `tokens[:, t+1]` has loss;
- `segment_ids [B, T+1] int32`: 1, 2, ... for the document pieces of a row, 0 for padding.

Resumption. `DataIterator.get_state()` is a small JSON-able dict; `set_state` on an iterator
built with the same arguments continues with exactly the batches that would have followed.

Processes. Everything runs in the calling process: a background thread prefetches `prefetch`
batches, and no worker process is started unless `worker_count > 0` (grain's `mp_prefetch`:
each worker packs its own slice of the documents, so the batches differ from `worker_count=0`,
but are deterministic and resumable). Worker processes import this module and never call
`jax.distributed.initialize()`; a training script must guard its own start-up code with
`if __name__ == "__main__":`.
"""

from __future__ import annotations

import copy
import json
import weakref
from typing import Any

import grain
import numpy as np
from absl import flags

from dlax_training.data.sources import Document, Source, make_source
from dlax_training.data.tokenizer import Tokenizer, make_tokenizer

Batch = dict[str, np.ndarray]


class TokeniseDocument:
  """`Document -> {"tokens" [n] int32, "labels" [n] bool}`, ending with EOS."""

  def __init__(self, tokenizer: Tokenizer, label_eos: bool):
    self.tokenizer, self.label_eos = tokenizer, label_eos

  def __call__(self, document: Document) -> dict[str, np.ndarray]:
    ids, labels = self.tokenizer.encode_segments(document)
    return {"tokens": np.append(ids, self.tokenizer.eos_id).astype(np.int32),
            "labels": np.append(labels, self.label_eos).astype(bool)}


class PackedRows(grain.IterDataset):
  """Rows `{"tokens" [L], "loss_mask" [L-1], "segment_ids" [L]}` cut from a stream of tokenised
  documents (see the module docstring); a finite stream is padded to a multiple of `num_rows`."""

  def __init__(self, parent: grain.IterDataset, *, row_len: int, pad_id: int, packing: bool,
               num_rows: int):
    super().__init__(parent)
    self.row_len, self.pad_id, self.packing, self.num_rows = row_len, pad_id, packing, num_rows

  def __iter__(self) -> grain.DatasetIterator:
    return _PackedRowsIterator(self._parent.__iter__(), self)


class _PackedRowsIterator(grain.DatasetIterator):
  """State: the parent's state before the current document, how many of its tokens were
  emitted, and the number of rows emitted modulo `num_rows`."""

  def __init__(self, parent: grain.DatasetIterator, config: PackedRows):
    super().__init__(parent)
    self._config = config
    self._document_state = copy.deepcopy(parent.get_state())
    self._document: dict[str, np.ndarray] | None = None
    self._offset = 0
    self._rows = 0

  def _remaining(self) -> int:
    return 0 if self._document is None else len(self._document["tokens"]) - self._offset

  def _next_document(self) -> bool:
    state = copy.deepcopy(self._parent.get_state())
    try:
      document = next(self._parent)
    except StopIteration:
      return False
    length = len(document["tokens"])
    if not self._config.packing and length > self._config.row_len:
      raise ValueError(f"packing=False: a document of {length} tokens (with EOS) does not fit a "
                       f"row of seq_len + 1 = {self._config.row_len}")
    self._document_state, self._document, self._offset = state, document, 0
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    row_len = self._config.row_len
    tokens = np.full(row_len, self._config.pad_id, np.int32)
    labels = np.zeros(row_len, bool)
    segment_ids = np.zeros(row_len, np.int32)
    filled = segment = 0
    while filled < row_len:
      if not self._remaining():
        row_done = filled and not self._config.packing  # one document per row
        if row_done or not self._next_document():
          break
      n = min(row_len - filled, self._remaining())
      piece = slice(self._offset, self._offset + n)
      tokens[filled:filled + n] = self._document["tokens"][piece]
      labels[filled:filled + n] = self._document["labels"][piece]
      segment += 1
      segment_ids[filled:filled + n] = segment
      filled += n
      self._offset += n
    if not filled and not self._rows:
      raise StopIteration
    self._rows = (self._rows + 1) % self._config.num_rows
    return {"tokens": tokens, "loss_mask": labels[1:], "segment_ids": segment_ids}

  def get_state(self) -> dict[str, Any]:
    return {"document": copy.deepcopy(self._document_state), "offset": self._offset,
            "rows": self._rows}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(copy.deepcopy(state["document"]))
    self._document_state, self._document, self._offset = state["document"], None, 0
    if state["offset"]:
      self._document = next(self._parent)
      self._offset = state["offset"]
    self._rows = state["rows"]


class DataIterator(grain.DatasetIterator):
  """The batches of `make_dataset` with a checkpointable state.

  `get_state()` -> `{"signature": ..., "pipeline": ...}` (JSON-able). `set_state` refuses a state
  whose signature (the arguments that shape the stream) differs from this iterator's. `close()`
  (or leaving a `with` block) stops the prefetch thread; so do garbage collection and exit.
  """

  def __init__(self, pipeline: grain.DatasetIterator, signature: dict[str, Any]):
    super().__init__()
    self.signature = signature
    self._pipeline = [pipeline]  # emptied on close, so that exit frees grain's iterators early
    self._close = weakref.finalize(self, _close_pipeline, self._pipeline)

  def __next__(self) -> Batch:
    self._assert_not_closed()
    return next(self._pipeline[0])

  def get_state(self) -> dict[str, Any]:
    return {"signature": dict(self.signature), "pipeline": self._pipeline[0].get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = state["signature"]
    differ = sorted(k for k in saved.keys() | self.signature.keys()
                    if saved.get(k) != self.signature.get(k))
    if differ:
      raise ValueError("data iterator state was saved by a different pipeline: "
                       + ", ".join(f"{k}: saved {saved.get(k)!r}, now {self.signature.get(k)!r}"
                                   for k in differ))
    self._pipeline[0].set_state(state["pipeline"])

  def close(self) -> None:
    super().close()
    self._close()

  def __enter__(self) -> DataIterator:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _close_pipeline(pipeline: list[grain.DatasetIterator]) -> None:
  pipeline.pop().close()


def _json_scalars(options: dict[str, Any]) -> dict[str, Any]:
  """The options that describe the stream in a JSON state (objects such as tokenizers left out)."""
  return {k: str(v) if k == "path" else v for k, v in sorted(options.items())
          if k == "path" and v is not None or isinstance(v, (bool, int, float, str))}


def make_dataset(source: str | Source = "embedded", *, path=None,
                 tokenizer: str | Tokenizer = "byte", seq_len: int, global_batch_size: int,
                 seed: int = 0, process_index: int = 0, process_count: int = 1,
                 num_epochs: int | None = None, shuffle: bool = True, packing: bool = True,
                 prefetch: int = 2, worker_count: int = 0, **source_options) -> DataIterator:
  """An iterator of batches (module docstring) of `global_batch_size // process_count` rows of
  `seq_len + 1` tokens for this process; endless unless `num_epochs` is given.

  `source` is a name of `sources.SOURCES` (with `path` for file sources and `source_options`
  for its constructor, e.g. `split="validation"` for the corpus, `length`/`depth` for passkey)
  or a `Source`. `tokenizer` is a `make_tokenizer` spec or a `Tokenizer`.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index ({process_index}) < process_count ({process_count})")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size ({global_batch_size}) must be a positive multiple of "
                     f"process_count ({process_count})")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
  tokenizer = make_tokenizer(tokenizer)
  documents = make_source(source, path=path, tokenizer=tokenizer, seed=seed, **source_options)
  if not len(documents):
    raise ValueError(f"data source {source!r} has no documents")
  batch_size = global_batch_size // process_count

  dataset = grain.MapDataset.source(documents)
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  dataset = dataset.repeat(num_epochs)[process_index::process_count]
  dataset = dataset.map(TokeniseDocument(tokenizer, documents.label_eos))
  rows = PackedRows(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0)),
                    row_len=seq_len + 1, pad_id=tokenizer.pad_id, packing=packing,
                    num_rows=batch_size)
  batches = rows.batch(batch_size, drop_remainder=True)
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read an absl flag; outside absl.app, defaults
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  elif prefetch > 0:
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)

  signature = {
      "source": source if isinstance(source, str) else type(source).__name__,
      "num_documents": len(documents), "tokenizer": type(tokenizer).__name__,
      "vocab_size": tokenizer.vocab_size, "seq_len": seq_len,
      "global_batch_size": global_batch_size, "seed": seed, "process_index": process_index,
      "process_count": process_count, "num_epochs": num_epochs, "shuffle": shuffle,
      "packing": packing, "worker_count": worker_count,
      "options": _json_scalars({"path": path, **source_options})}
  json.dumps(signature)  # fails early if a value is not JSON-able
  return DataIterator(batches.__iter__(), signature)
