"""Evaluations of long-context models, each writing `<name>.json` (results) and `<name>.png`.

```python
from dlax_training.evals import EVALS, make_adapter
adapter = make_adapter(model)                       # LanguageModel or CometForCausalLM
result = EVALS["passkey"](adapter, tokenizer, lengths=[1024, 4096], out_dir="eval_out")
```

Every evaluation is `run_<name>(adapter, tokenizer, *, options..., out_dir) -> dict` (the JSON
written, with `"files"`); each module's docstring gives its options and JSON schema. A model
passed instead of an adapter is wrapped by `make_adapter`; build the adapter once and pass it to
every evaluation, so that its compiled functions are reused.

| name | what | module |
|---|---|---|
| passkey | accuracy on a depth × length grid (heat map) | `passkey` |
| ruler | needles: single, multi-key, multi-query, multi-value (lines per task) | `ruler` |
| mqar | multi-query associative recall vs number of pairs | `mqar` |
| forgetting | copy accuracy vs distance to the first occurrence | `forgetting` |
| perplexity | held-out CE and the loss by position | `perplexity` |
| dla_boundaries | DLA segments and merges per layer/head over real text (DLA models) | `pictures` |
| comet_memory | CoMeT gates and FIFO per layer and chunk over real text (CoMeT) | `pictures` |

The model side is an adapter (`adapters.ModelAdapter`: `name`, `vocab_size`, `length_multiple`
and `score(tokens [B, T], answer_mask [B, T]) -> TokenScores(hit, nll)` per token, whose
`per_row(answer_mask)` gives each row's exact match, summed NLL and answer count): teacher forcing
with logits only at the positions that predict answers, streamed for long inputs (CoMeT chunk by
chunk with constant memory; `LMAdapter(segment_len=...)` through the decode cache).
`FunctionAdapter(predict, vocab_size)` turns a prefix -> next-token function into one (oracles).
"""

from dlax_training.evals.adapters import (CometAdapter, CometForCausalLMAdapter, FunctionAdapter,
                                          LMAdapter, ModelAdapter, TokenScores, answer_spans,
                                          make_adapter, score_rows, span_hits)
from dlax_training.evals.forgetting import run_forgetting
from dlax_training.evals.mqar import run_mqar
from dlax_training.evals.passkey import run_passkey
from dlax_training.evals.perplexity import run_perplexity
from dlax_training.evals.pictures import (dla_decisions, record_dla_decisions,
                                          run_comet_memory, run_dla_boundaries)
from dlax_training.evals.ruler import NeedleDocuments, run_ruler

EVALS = {
    "passkey": run_passkey,
    "ruler": run_ruler,
    "mqar": run_mqar,
    "forgetting": run_forgetting,
    "perplexity": run_perplexity,
    "dla_boundaries": run_dla_boundaries,
    "comet_memory": run_comet_memory,
}


def applicable(adapter) -> list[str]:
  """The names of `EVALS` that can run on this adapter: the scoring evaluations on any, the
  pictures on a DLA `LanguageModel` / a `CometForCausalLM` adapter."""
  from dlax.models import LanguageModel
  from dlax.models.comet import CometForCausalLM
  names = ["passkey", "ruler", "mqar", "forgetting", "perplexity"]
  model = getattr(adapter, "model", None)
  if isinstance(model, CometForCausalLM):
    names.append("comet_memory")
  elif isinstance(model, LanguageModel) and model.config.multistate == "dla":
    names.append("dla_boundaries")
  return names


__all__ = [
    "EVALS", "CometAdapter", "CometForCausalLMAdapter", "FunctionAdapter", "LMAdapter",
    "ModelAdapter", "NeedleDocuments", "TokenScores", "answer_spans", "applicable",
    "dla_decisions", "make_adapter", "record_dla_decisions", "run_comet_memory",
    "run_dla_boundaries", "run_forgetting", "run_mqar", "run_passkey", "run_perplexity",
    "run_ruler", "score_rows", "span_hits",
]
