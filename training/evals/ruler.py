"""RULER-style needle-in-a-haystack tasks (Hsieh et al., 2024), synthetic and deterministic per
`(seed, task, length, index)`.

Needles `" One of the special magic numbers for {key} is: {value}."` (keys: adjective-noun words,
values: `digits`-digit numbers) sit at uniform random depths in repeated filler sentences:

- `single`: one needle, asked for.
- `multi_key`: `num_keys` needles of distinct keys (the others are distractors), one asked for.
- `multi_query`: `num_keys` needles; `num_queries` of the keys asked for, each answered in turn.
- `multi_value`: `num_values` needles sharing one key; all values asked for, in text order.

Every value of an answer is its own labelled span; a span counts when each of its tokens is the
argmax (teacher forcing: earlier values of the answer are in the context, as when a greedy
decoder got them right). The accuracy is the fraction of spans answered (RULER's recall).

JSON (`ruler.json`): `{"eval": "ruler", "model", "options", "tasks": [K], "lengths": [L],
"tokens": {task: [L] mean tokens}, "accuracy": {task: [L]}, "row_exact": {task: [L]} (every span of
the row right), "mean_accuracy": {task: mean over lengths}, "seconds", "files"}`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from dlax_training.data import Tokenizer
from dlax_training.data.tokenizer import Segment
from dlax_training.evals.adapters import ModelAdapter, make_adapter, score_rows, span_hits
from dlax_training.evals.figures import format_length, new_figure, save_result

NAME = "ruler"
TASKS = ("single", "multi_key", "multi_query", "multi_value")
DEFAULT_LENGTHS = (512, 1024, 2048, 4096)

INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
         "it. I will quiz you about the numbers afterwards.")
FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back"
          " again.")
NEEDLE = " One of the special magic numbers for {key} is: {value}."
ADJECTIVES = ("ancient", "bitter", "brave", "bright", "calm", "clever", "cold", "curious",
              "damp", "eager", "fancy", "fierce", "gentle", "golden", "grumpy", "happy", "hollow",
              "humble", "icy", "jolly", "lazy", "loud", "lucky", "mighty", "narrow", "noisy",
              "odd", "proud", "quiet", "rapid", "silent", "tiny")
NOUNS = ("anchor", "badger", "beacon", "candle", "canyon", "cherry", "comet", "dragon",
         "falcon", "forest", "garden", "glacier", "harbor", "island", "jacket", "kettle",
         "ladder", "lantern", "meadow", "mirror", "orchid", "otter", "pebble", "pepper",
         "planet", "rabbit", "saddle", "tiger", "tunnel", "violin", "walrus", "willow")


def _rng(seed: int, task: str, length: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, TASKS.index(task), length, index])


def _question(task: str, keys: Sequence[str], values: Sequence[str]) -> list[Segment]:
  """The question and its labelled answer spans (one per value)."""
  key = keys[0]
  if task in ("single", "multi_key"):
    return [(f" What is the special magic number for {key} mentioned in the provided text? The "
             f"special magic number for {key} mentioned in the provided text is", False),
            (f" {values[0]}", True), (".", False)]
  if task == "multi_value":
    segments = [(f" What are all the special magic numbers for {key} mentioned in the provided "
                 f"text? The special magic numbers for {key} mentioned in the provided text are",
                 False)]
    for j, value in enumerate(values):
      segments += [(",", False)] * bool(j) + [(f" {value}", True)]
    return segments + [(".", False)]
  listed = ", ".join(keys[:-1]) + f" and {keys[-1]}" if len(keys) > 1 else key
  segments = [(f" What are the special magic numbers for {listed} mentioned in the provided "
               f"text?", False)]
  for key, value in zip(keys, values):
    segments += [(f" The special magic number for {key} is", False), (f" {value}", True),
                 (".", False)]
  return segments


class NeedleDocuments:
  """`num_examples` documents of one RULER task of about `length` tokens each (at most `length`
  with the byte tokenizer, unless even no filler exceeds it: see `shortest`)."""

  def __init__(self, task: str, *, length: int, tokenizer: Tokenizer, num_examples: int = 8,
               num_keys: int = 4, num_queries: int = 2, num_values: int = 4, digits: int = 7,
               seed: int = 0):
    if task not in TASKS:
      raise ValueError(f"RULER task must be one of {TASKS}, got {task!r}")
    if not 1 <= num_keys <= len(ADJECTIVES) * len(NOUNS) or num_values < 1:
      raise ValueError(f"need 1 <= num_keys ({num_keys}) <= {len(ADJECTIVES) * len(NOUNS)} and "
                       f"num_values ({num_values}) >= 1")
    if task == "multi_query" and not 1 <= num_queries <= num_keys:
      raise ValueError(f"multi_query needs 1 <= num_queries ({num_queries}) <= num_keys "
                       f"({num_keys})")
    self.task, self.length, self.tokenizer = task, length, tokenizer
    self.num_examples = num_examples
    self.num_keys, self.num_queries, self.num_values = num_keys, num_queries, num_values
    self.digits, self.seed = digits, seed
    self._filler_tokens = len(tokenizer.encode(FILLER))

  def __len__(self) -> int:
    return self.num_examples

  def sample(self, index: int) -> tuple[list[tuple[str, str]], list[int], list[str], list[str]]:
    """`(needles [(key, value)] in text order, the number of filler sentences before each,
    asked keys, answers in order)`."""
    rng = _rng(self.seed, self.task, self.length, index)
    n_keys = self.num_keys if self.task in ("multi_key", "multi_query") else 1
    codes = rng.choice(len(ADJECTIVES) * len(NOUNS), n_keys, replace=False)
    keys = [f"{ADJECTIVES[c // len(NOUNS)]}-{NOUNS[c % len(NOUNS)]}" for c in codes]
    n_values = self.num_values if self.task == "multi_value" else n_keys
    low = 10 ** (self.digits - 1)
    values = [str(v) for v in rng.integers(low, 10 * low, n_values)]
    needles = list(zip(keys * n_values, values))
    asked = (sorted(rng.choice(n_keys, self.num_queries, replace=False).tolist())
             if self.task == "multi_query" else [0])
    needles = [needles[i] for i in rng.permutation(len(needles))]   # text order
    if self.task == "multi_value":
      answers = [value for _, value in needles]
    else:
      answers = [values[i] for i in asked]
    asked_keys = [keys[i] for i in asked]
    positions = np.sort(rng.integers(0, self.num_filler(needles, asked_keys, answers) + 1,
                                     len(needles)))
    return needles, positions.tolist(), asked_keys, answers

  def _fixed_text(self, needles, asked_keys, answers) -> str:
    return (INTRO + "".join(NEEDLE.format(key=k, value=v) for k, v in needles)
            + "".join(text for text, _ in _question(self.task, asked_keys, answers)))

  def num_filler(self, needles, asked_keys, answers) -> int:
    fixed = len(self.tokenizer.encode(self._fixed_text(needles, asked_keys, answers)))
    return max(0, (self.length - fixed) // self._filler_tokens)

  def shortest(self, index: int = 0) -> int:
    """Tokens of example `index` without filler."""
    needles, _, asked_keys, answers = self.sample(index)
    return len(self.tokenizer.encode(self._fixed_text(needles, asked_keys, answers)))

  def __getitem__(self, index: int) -> tuple[Segment, ...]:
    needles, positions, asked_keys, answers = self.sample(index)
    n_filler = self.num_filler(needles, asked_keys, answers)
    text, placed = INTRO, 0
    for i in range(n_filler + 1):
      while placed < len(needles) and positions[placed] == i:
        key, value = needles[placed]
        text += NEEDLE.format(key=key, value=value)
        placed += 1
      if i < n_filler:
        text += FILLER
    return ((text, False), *_question(self.task, asked_keys, answers))


def run_ruler(adapter: ModelAdapter, tokenizer: Tokenizer, *, tasks: Sequence[str] = TASKS,
              lengths: Sequence[int] = DEFAULT_LENGTHS, num_examples: int = 8, num_keys: int = 4,
              num_queries: int = 2, num_values: int = 4, digits: int = 7, seed: int = 0,
              batch_size: int = 8, out_dir) -> dict:
  """Span accuracy per task and length -> `ruler.json` and `ruler.png` (bars per task, grouped
  by length)."""
  start = time.perf_counter()
  adapter = make_adapter(adapter)
  tasks, lengths = list(tasks), [int(n) for n in lengths]
  if not tasks or not lengths or num_examples < 1:
    raise ValueError("ruler needs at least one task, one length and one example")
  rows, where = [], []
  for task in tasks:
    for n, length in enumerate(lengths):
      documents = NeedleDocuments(task, length=length, tokenizer=tokenizer,
                                  num_examples=num_examples, num_keys=num_keys,
                                  num_queries=num_queries, num_values=num_values, digits=digits,
                                  seed=seed)
      if documents.shortest() > length:
        raise ValueError(f"ruler length {length} cannot hold a {task} example "
                         f"({documents.shortest()} tokens without filler)")
      for i in range(num_examples):
        rows.append(tokenizer.encode_segments(documents[i]))
        where.append((task, n))
  scores = score_rows(adapter, rows, batch_size=batch_size)
  hits = {(task, n): [] for task in tasks for n in range(len(lengths))}
  exact = {key: [] for key in hits}
  tokens = {key: [] for key in hits}
  for key, s, (ids, mask) in zip(where, scores, rows):
    spans = span_hits(s, mask)
    hits[key] += spans.tolist()
    exact[key].append(bool(spans.all()))
    tokens[key].append(len(ids))
  table = lambda values: {t: [float(np.mean(values[t, n])) for n in range(len(lengths))]
                          for t in tasks}
  accuracy = table(hits)

  figure = new_figure(max(6.5, 1.2 + 0.45 * len(tasks) * len(lengths)), 4)
  ax = figure.add_subplot()
  width = 0.8 / len(tasks)
  for k, task in enumerate(tasks):
    where = np.arange(len(lengths)) + (k - (len(tasks) - 1) / 2) * width
    bars = ax.bar(where, accuracy[task], width, label=task)
    ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
  ax.set_xticks(range(len(lengths)), labels=[format_length(n) for n in lengths])
  ax.set_ylim(0, 1.12)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("accuracy (answers exact)")
  ax.set_title(f"RULER needles: {adapter.name}", fontsize=10)
  ax.grid(alpha=0.3, axis="y")
  ax.legend(ncols=len(tasks), fontsize=8, loc="upper center")
  result = {
      "eval": NAME, "model": adapter.name,
      "options": dict(tasks=tasks, lengths=lengths, num_examples=num_examples, num_keys=num_keys,
                      num_queries=num_queries, num_values=num_values, digits=digits, seed=seed,
                      batch_size=batch_size),
      "tasks": tasks, "lengths": lengths, "tokens": table(tokens), "accuracy": accuracy,
      "row_exact": table(exact),
      "mean_accuracy": {t: float(np.mean(accuracy[t])) for t in tasks},
      "seconds": time.perf_counter() - start,
  }
  return save_result(out_dir, NAME, result, figure)
