"""Training data (`dlax_training.data`): tokenizers, sources, synthetic tasks, the corpus."""

from __future__ import annotations

import collections
import gzip
import itertools
import json
import math
import re

import jax
import numpy as np
import pytest

from dlax_training.data import (ByteTokenizer, HFTokenizer, MQARDocuments, PasskeyDocuments,
                                TextDocuments, corpus_source, make_dataset, make_source,
                                make_tokenizer, render_chatml)
from dlax_training.data.synthetic import PASSKEY_FILLER, PASSKEY_NEEDLE

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


def random_words(rng, n: int, alphabet: str = "abcdefghij klmnopqrstuvwxyz.,;'\n") -> str:
  """`n` random characters; never a special token, never leading/trailing whitespace."""
  return "x" + "".join(rng.choice(list(alphabet), n)) + "y"


@pytest.fixture(scope="module")
def hf_tokenizer_file(tmp_path_factory):
  """A byte-level BPE `tokenizer.json` trained here on a few chapters of the corpus."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus_source(split="validation").texts[:3], trainer)
  path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
  tok.save(str(path))
  return path


@pytest.fixture(params=["byte", "hf"])
def tokenizer(request, hf_tokenizer_file):
  return make_tokenizer("byte" if request.param == "byte" else hf_tokenizer_file)


# Tokenizers.

def test_byte_tokenizer_round_trips_any_bytes(rng):
  tok = ByteTokenizer()
  data = rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8).tobytes()
  text = data.decode("utf-8", "surrogateescape")
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.tolist() == list(data)
  assert tok.decode(ids) == text


def test_byte_tokenizer_round_trips_unicode_and_specials(rng):
  tok = ByteTokenizer()
  points = np.concatenate([rng.integers(32, 127, 300), rng.integers(0xA0, 0x800, 50),
                           rng.integers(0x4E00, 0x9FFF, 50), rng.integers(0x1F600, 0x1F64F, 20)])
  pieces = [chr(p) for p in rng.permutation(points)]
  for special in SPECIALS:  # each special name once, at a random place
    pieces.insert(int(rng.integers(0, len(pieces))), special)
  text = "".join(pieces)
  ids, starts = tok.encode_with_starts(text)
  assert tok.decode(ids) == text
  assert sorted(ids[ids >= 256].tolist()) == sorted(ByteTokenizer.SPECIALS.index(s) + 256
                                                   for s in SPECIALS)
  assert ids.max() < tok.vocab_size == 261
  # Each token starts at a character: the tokens starting at j decode to the text up to the next
  # start (one character, or a special token's name).
  bounds = np.r_[np.unique(starts), len(text)]
  assert bounds[0] == 0 and np.all(np.diff(starts) >= 0)
  assert all(tok.decode(ids[starts == j]) == text[j:k] for j, k in zip(bounds, bounds[1:]))
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)


def test_hf_tokenizer_json(hf_tokenizer_file, rng):
  tok = make_tokenizer(hf_tokenizer_file.parent)  # a folder holding tokenizer.json
  assert isinstance(tok, HFTokenizer) and tok.vocab_size == 400
  assert tok.eos_id == tok.pad_id == SPECIALS.index("<|endoftext|>")  # pad falls back to EOS
  text = random_words(rng, 500) + "<|im_end|>" + random_words(rng, 50)
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and SPECIALS.index("<|im_end|>") in ids.tolist()
  assert tok.decode(ids) == text
  (hf_tokenizer_file.parent / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": {"content": "<|im_end|>"}, "pad_token": "<|pad|>"}))
  try:
    tok = make_tokenizer(hf_tokenizer_file)
    assert (tok.eos_id, tok.pad_id) == (SPECIALS.index("<|im_end|>"), SPECIALS.index("<|pad|>"))
  finally:
    (hf_tokenizer_file.parent / "tokenizer_config.json").unlink()
  with pytest.raises(ValueError, match="not in the vocabulary"):
    HFTokenizer(hf_tokenizer_file, eos_token="<missing>")


# Sources.

def test_text_and_jsonl_sources(tmp_path, rng):
  paragraphs = [[random_words(rng, int(rng.integers(1, 80)), "abc de") for _ in range(3)]
                for _ in range(4)]
  files = ["\n\n".join(p) for p in paragraphs]
  for i, text in enumerate(files):
    path = tmp_path / "texts" / f"{i}.txt.gz" if i % 2 else tmp_path / "texts" / f"{i}.txt"
    path.parent.mkdir(exist_ok=True)
    (gzip.open if i % 2 else open)(path, "wt").write(text)
  source = make_source("text", path=tmp_path / "texts")
  assert source.texts == files and source[2] == ((files[2], True),) and source.label_eos
  by_paragraph = make_source("text", path=tmp_path / "texts", document_per="paragraph")
  assert by_paragraph.texts == [p for ps in paragraphs for p in ps]

  (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n\n"
                                               for i, t in enumerate(files)))
  assert make_source("jsonl", path=tmp_path / "docs.jsonl", text_field="body").texts == files
  with pytest.raises(KeyError, match="no field 'text'"):
    make_source("jsonl", path=tmp_path / "docs.jsonl")
  with pytest.raises(ValueError, match="needs a path"):
    make_source("jsonl")
  with pytest.raises(ValueError, match="unknown data source 'parquet'"):
    make_source("parquet", path=tmp_path)


def random_conversation(rng) -> list[dict]:
  roles = ["system"] * int(rng.integers(0, 2)) + list(rng.choice(["user", "assistant"],
                                                                 int(rng.integers(1, 6))))
  return [{"role": str(r), "content": random_words(rng, int(rng.integers(0, 60)))} for r in roles]


def test_chatml_rendering_and_assistant_only_labels():
  document = render_chatml([{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Yo"}])
  text = "".join(s for s, _ in document)
  assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
  tok = ByteTokenizer()
  ids, labelled = tok.encode_segments(document)
  # Bytes of "Yo" and the id of <|im_end|> that follows them; nothing else.
  assert ids[labelled].tolist() == [ord("Y"), ord("o"), 260]
  assert np.flatnonzero(labelled).tolist() == [len(ids) - 4, len(ids) - 3, len(ids) - 2]


def test_chatml_labels_exactly_assistant_contents(tokenizer, tmp_path, rng):
  conversations = [random_conversation(rng) for _ in range(5)]
  (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n"
                                               for c in conversations))
  source = make_source("chatml", path=tmp_path / "chat.jsonl")
  assert len(source) == 5 and not source.label_eos
  for i, conversation in enumerate(conversations):
    ids, labelled = tokenizer.encode_segments(source[i])
    expected = "".join(m["content"] + "<|im_end|>" for m in conversation
                       if m["role"] == "assistant")
    assert tokenizer.decode(ids[labelled]) == expected
    # The unlabelled tokens are everything else, in order.
    rendered = "".join(f"<|im_start|>{m['role']}\n" + ("" if m["role"] == "assistant" else
                                                       m["content"] + "<|im_end|>") + "\n"
                       for m in conversation)
    assert tokenizer.decode(ids[~labelled]) == rendered


# Synthetic tasks.

def test_passkey_depth_and_answer_only_label(tokenizer, rng):
  length, depth = int(rng.integers(300, 3000)), float(rng.uniform())
  source = make_source("passkey", tokenizer=tokenizer, seed=int(rng.integers(1000)),
                       length=length, depth=depth, num_examples=50)
  assert source.num_filler > 0 and len(source) == 50
  for index in rng.integers(0, 50, 3):
    passkey, before = source.sample(int(index))
    ids, labelled = tokenizer.encode_segments(source[int(index)])
    assert tokenizer.decode(ids[labelled]) == f" {passkey}"
    assert np.flatnonzero(labelled).tolist() == list(range(labelled.argmax(), len(ids)))
    text = tokenizer.decode(ids)
    needle_at = text.index(PASSKEY_NEEDLE.format(key=passkey))
    assert text[:needle_at].count(PASSKEY_FILLER) == before == round(depth * source.num_filler)
    assert text.count(PASSKEY_FILLER) == source.num_filler
    assert 10_000 <= passkey < 100_000
    if isinstance(tokenizer, ByteTokenizer):
      assert length - len(PASSKEY_FILLER) < len(ids) <= length
  assert source[3] == source[3] and source[3] != source[4]
  with pytest.raises(ValueError, match="depth must be in"):
    PasskeyDocuments(depth=1.5)


def test_mqar_answers_and_labels(rng):
  num_pairs = int(rng.integers(2, 40))
  num_queries = int(rng.integers(1, num_pairs + 1))
  source = MQARDocuments(num_pairs=num_pairs, num_queries=num_queries,
                         seed=int(rng.integers(1000)))
  tok = ByteTokenizer()
  for index in rng.integers(0, len(source), 3):
    keys, values, queries = source.sample(int(index))
    assert len(set(keys)) == num_pairs and len(queries) == num_queries
    ids, labelled = tok.encode_segments(source[int(index)])
    text = tok.decode(ids)
    pairs_text, queries_text = text.split("\n")
    pairs = dict(p.split(":") for p in pairs_text.split(" "))
    assert list(pairs) == keys and all(re.fullmatch(r"[a-z]{3}", k) for k in keys)
    # Every labelled run is exactly the value of the key right before its ':'.
    positions = np.flatnonzero(labelled)
    runs = np.split(positions, np.flatnonzero(np.diff(positions) > 1) + 1)
    assert len(runs) == num_queries
    for run, query in zip(runs, queries):
      assert tok.decode(ids[run]) == values[query] == pairs[keys[query]]
      assert tok.decode(ids[run[0] - len(keys[query]) - 1:run[0]]) == keys[query] + ":"
    assert queries_text == " ".join(f"{keys[q]}:{values[q]}" for q in queries)
  with pytest.raises(ValueError, match="num_queries"):
    MQARDocuments(num_pairs=3, num_queries=4)


# The embedded corpus.

def test_embedded_corpus_is_austen_prose():
  train, validation = corpus_source(), make_source("embedded", split="validation")
  full = corpus_source(split="all")
  assert (len(train), len(validation), len(full)) == (245, 24, 269)
  text = "\n".join(full.texts)
  assert sum(map(len, full.texts)) == 4_023_215  # the size documented in corpus/README.md
  assert text.startswith("SENSE AND SENSIBILITY")
  assert "It is a truth universally acknowledged" in text
  assert validation.texts[0].startswith("Persuasion") and validation.texts[-1].endswith("Finis")
  words = re.findall(r"[a-z]+", text.lower())
  top = {w for w, _ in collections.Counter(words).most_common(6)}
  assert top >= {"the", "to", "and", "of"}  # English function words lead
  assert len(text.encode()) - len(text) < 10  # almost all ASCII
  assert 700_000 < len(words) < 800_000


# The pipeline: packing, epochs, process shards, resumption.

def numbered_documents(rng, n: int, max_len: int = 200) -> TextDocuments:
  """`n` distinct random documents (each starts with its index)."""
  return TextDocuments([f"{i}:" + random_words(rng, int(rng.integers(0, max_len)))
                        for i in range(n)])


def rows_of(batches: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def documents_in(batches: list[dict], eos: int = ByteTokenizer.eos_id) -> list[str]:
  """The documents of a finite stream, in order: its non-padding tokens split after each EOS."""
  rows = rows_of(batches)
  tokens = rows["tokens"][rows["segment_ids"] > 0]
  assert tokens[-1] == eos
  documents = np.split(tokens, np.flatnonzero(tokens == eos) + 1)[:-1]
  return [ByteTokenizer().decode(d) for d in documents]


def test_packing_keeps_every_token_once(rng):
  docs = numbered_documents(rng, int(rng.integers(5, 30)))
  seq_len, batch = int(rng.integers(4, 64)), int(rng.integers(1, 5))
  batches = list(make_dataset(docs, seq_len=seq_len, global_batch_size=batch, num_epochs=1,
                              seed=int(rng.integers(1000))))
  for b in batches:
    assert b["tokens"].shape == b["segment_ids"].shape == (batch, seq_len + 1)
    assert b["loss_mask"].shape == (batch, seq_len)
    assert (b["tokens"].dtype, b["loss_mask"].dtype, b["segment_ids"].dtype) == (
        np.int32, np.bool_, np.int32)
  rows = rows_of(batches)
  real = rows["segment_ids"] > 0
  total = sum(len(t.encode()) + 1 for t in docs.texts)  # + EOS
  assert real.sum() == total and real.reshape(-1)[:total].all()  # padding only at the very end
  assert len(real) == math.ceil(math.ceil(total / (seq_len + 1)) / batch) * batch
  assert np.all(rows["tokens"][~real] == ByteTokenizer.pad_id)
  assert np.array_equal(rows["loss_mask"], real[:, 1:])  # prose: every real target has loss
  assert sorted(documents_in(batches)) == sorted(t + "<|endoftext|>" for t in docs.texts)
  # Segment ids count the document pieces of each row: +1 right after each EOS.
  for tokens, segment_ids, mask in zip(rows["tokens"], rows["segment_ids"], real):
    starts = np.r_[1, (tokens[:-1] == ByteTokenizer.eos_id) & mask[1:]]
    assert np.array_equal(segment_ids[mask], np.cumsum(starts)[mask])
  unshuffled = make_dataset(docs, seq_len=seq_len, global_batch_size=batch, num_epochs=1,
                            shuffle=False)
  assert documents_in(list(unshuffled)) == [t + "<|endoftext|>" for t in docs.texts]


def test_each_epoch_is_a_new_permutation(rng):
  docs = numbered_documents(rng, int(rng.integers(6, 20)), max_len=20)
  stream = documents_in(list(make_dataset(docs, seq_len=32, global_batch_size=2, num_epochs=3,
                                          seed=int(rng.integers(1000)))))
  n = len(docs)
  epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
  assert len(stream) == 3 * n
  assert all(sorted(e) == sorted(t + "<|endoftext|>" for t in docs.texts) for e in epochs)
  assert len({tuple(e) for e in epochs}) == 3


def test_process_shards_partition_the_single_process_stream(rng):
  count, local = int(rng.integers(2, 5)), int(rng.integers(1, 3))
  docs = numbered_documents(rng, count * int(rng.integers(2, 6)) + int(rng.integers(1, count)))
  options = dict(seq_len=int(rng.integers(8, 48)), global_batch_size=count * local, num_epochs=2,
                 seed=int(rng.integers(1000)))
  single = documents_in(list(make_dataset(docs, **options)))
  for index in range(count):
    batches = list(make_dataset(docs, process_index=index, process_count=count, **options))
    assert all(len(b["tokens"]) == local for b in batches)
    assert documents_in(batches) == single[index::count]  # disjoint, and together all of them
  with pytest.raises(ValueError, match="multiple of process_count"):
    make_dataset(docs, seq_len=8, global_batch_size=3, process_count=2)


def resume_options(source: str, tmp_path, rng) -> dict:
  """Small sources whose epochs last a batch or two, so that a run crosses many of them."""
  if source == "chatml":
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": random_conversation(rng)}) + "\n"
                            for _ in range(6)))
    return dict(source="chatml", path=path, seq_len=64, global_batch_size=3)
  if source == "passkey":
    return dict(source="passkey", length=300, num_examples=5, packing=False, seq_len=320,
                global_batch_size=2)
  return dict(source=numbered_documents(rng, 4, max_len=100), seq_len=32, global_batch_size=2,
              num_epochs=3)  # finite: resumes into the padded end of the stream too


@pytest.mark.parametrize("source", ["text", "chatml", "passkey"])
def test_resumed_iterator_continues_exactly(source, tmp_path, rng):
  options = dict(resume_options(source, tmp_path, rng), seed=int(rng.integers(1000)))
  uninterrupted = make_dataset(**options)
  for _ in range(int(rng.integers(0, 5))):
    next(uninterrupted)
  state = json.loads(json.dumps(uninterrupted.get_state()))
  expected = list(itertools.islice(uninterrupted, 16))
  resumed = make_dataset(**options)
  resumed.set_state(state)
  got = list(itertools.islice(resumed, 16))
  assert len(got) == len(expected) > 2
  for want, have in zip(expected, got):
    assert all(np.array_equal(want[k], have[k]) for k in ("tokens", "loss_mask", "segment_ids"))
  other = make_dataset(**dict(options, seed=options["seed"] + 1))
  with pytest.raises(ValueError, match="seed: saved"):
    other.set_state(state)


def test_unpacked_passkey_rows_label_the_answer(rng):
  length, depth = int(rng.integers(100, 400)), float(rng.uniform())
  batch = next(make_dataset("passkey", seq_len=length, global_batch_size=3, packing=False,
                            shuffle=False, length=length, depth=depth, seed=7))
  source = PasskeyDocuments(length=length, depth=depth, seed=7)
  tok = ByteTokenizer()
  for i, (tokens, mask) in enumerate(zip(batch["tokens"], batch["loss_mask"])):
    assert tok.decode(tokens[1:][mask]) == f" {source.sample(i)[0]}"
  with pytest.raises(ValueError, match="does not fit"):
    next(make_dataset("passkey", seq_len=length // 2, global_batch_size=1, packing=False,
                      length=length))


def test_session_rejects_a_tokenizer_larger_than_the_vocabulary(hf_tokenizer_file, tmp_path):
  """The byte case is caught by the config; an HF tokenizer only once it is loaded, still
  before anything is compiled."""
  from dlax_training.config import ConfigError, load_config
  from dlax_training.loop import Session
  config = load_config("tiny_demo", [f"data.tokenizer={hf_tokenizer_file}", "model.vocab_size=300",
                                     "eval.passkey_lengths=[]", "logging.progress=false"])
  with pytest.raises(ConfigError, match=r"model.vocab_size is 300 but the tokenizer \(HFTokenizer\) "
                                        r"has 400 ids .*set model.vocab_size >= 400"):
    Session(config, jax.devices()[:1])
