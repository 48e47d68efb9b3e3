"""Synthetic long-context tasks, deterministic per `(seed, index)`; only the answers are labelled.

- **Passkey retrieval** (Mohtashami & Jaggi, 2023): a random number hidden in repeated filler text
  at a given depth, then the question; the answer is the number.
- **MQAR** (multi-query associative recall; Arora et al., 2023, "Zoology"): `key:value` pairs,
  then a newline and queries `key:` whose answers are the values.
"""

from __future__ import annotations

import numpy as np

from dlax_training.data.tokenizer import ByteTokenizer, Segment, Tokenizer

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the important information there.")
PASSKEY_FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go. There and"
                  " back again.")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


def _rng(seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, index])


class PasskeyDocuments:
  """`num_examples` passkey documents of about `length` tokens each (at most `length` with the byte
  tokenizer, whose lengths are exact).

  Layout: intro, `n` filler sentences of which `round(depth * n)` precede the needle, the
  question, then the labelled answer `" {passkey}"`. `depth` in [0, 1] is fixed, or drawn
  uniformly per example when `None`; the passkey has `digits` digits.
  """

  label_eos = False

  def __init__(self, *, length: int = 1024, depth: float | None = None, digits: int = 5,
               num_examples: int = 10_000, seed: int = 0, tokenizer: Tokenizer | None = None):
    if depth is not None and not 0 <= depth <= 1:
      raise ValueError(f"passkey depth must be in [0, 1], got {depth}")
    tokenizer = tokenizer or ByteTokenizer()
    count = lambda text: len(tokenizer.encode(text))
    fixed = count(PASSKEY_INTRO + PASSKEY_NEEDLE.format(key="0" * digits) + PASSKEY_QUESTION
                  + " " + "0" * digits)
    self.num_filler = max(0, (length - fixed) // count(PASSKEY_FILLER))
    self.depth, self.digits, self.num_examples, self.seed = depth, digits, num_examples, seed

  def __len__(self) -> int:
    return self.num_examples

  def sample(self, index: int) -> tuple[int, int]:
    """`(passkey, number of filler sentences before the needle)` of example `index`."""
    rng = _rng(self.seed, index)
    passkey = int(rng.integers(10 ** (self.digits - 1), 10 ** self.digits))
    depth = rng.uniform() if self.depth is None else self.depth
    return passkey, round(depth * self.num_filler)

  def __getitem__(self, index: int) -> tuple[Segment, ...]:
    passkey, before = self.sample(index)
    prompt = (PASSKEY_INTRO + PASSKEY_FILLER * before + PASSKEY_NEEDLE.format(key=passkey)
              + PASSKEY_FILLER * (self.num_filler - before) + PASSKEY_QUESTION)
    return (prompt, False), (f" {passkey}", True)


def passkey_min_length(digits: int = 5) -> int:
  """Byte tokens of a passkey document without filler, as a training or evaluation row."""
  documents = PasskeyDocuments(length=0, digits=digits, num_examples=1)
  return len(ByteTokenizer().encode_segments(documents[0])[0])


class MQARDocuments:
  """`num_examples` MQAR documents: `num_pairs` pairs of distinct random keys (`key_len` lowercase
  letters) and random values (`value_len` digits), then `num_queries` (default all) of the keys
  in random order, each followed by its labelled value. Example: `"abc:07 xyz:42\\nxyz:42 abc:07"`.
  """

  label_eos = False

  def __init__(self, *, num_pairs: int = 16, num_queries: int | None = None, key_len: int = 3,
               value_len: int = 2, num_examples: int = 10_000, seed: int = 0):
    num_queries = num_pairs if num_queries is None else num_queries
    if not 0 < num_queries <= num_pairs <= 26 ** key_len:
      raise ValueError(f"MQAR needs 0 < num_queries ({num_queries}) <= num_pairs ({num_pairs}) "
                       f"<= 26**key_len ({26 ** key_len})")
    self.num_pairs, self.num_queries, self.key_len, self.value_len = (
        num_pairs, num_queries, key_len, value_len)
    self.num_examples, self.seed = num_examples, seed

  def __len__(self) -> int:
    return self.num_examples

  def sample(self, index: int) -> tuple[list[str], list[str], list[int]]:
    """`(keys, values, queries)`: the pairs in order, and the queried pair indices."""
    rng = _rng(self.seed, index)
    codes = rng.choice(26 ** self.key_len, self.num_pairs, replace=False)
    letters = (codes[:, None] // 26 ** np.arange(self.key_len)[::-1]) % 26
    keys = ["".join(chr(ord("a") + c) for c in row) for row in letters]
    values = rng.integers(0, 10 ** self.value_len, self.num_pairs)
    values = [f"{v:0{self.value_len}d}" for v in values]
    return keys, values, [int(q) for q in rng.permutation(self.num_pairs)[:self.num_queries]]

  def __getitem__(self, index: int) -> tuple[Segment, ...]:
    keys, values, queries = self.sample(index)
    segments = [(" ".join(f"{k}:{v}" for k, v in zip(keys, values)) + "\n", False)]
    for j, q in enumerate(queries):
      segments += [((" " if j else "") + keys[q] + ":", False), (values[q], True)]
    return tuple(segments)
