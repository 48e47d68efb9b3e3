"""Runs in the torch environment (.venv-torch, Python 3.11), never in the main one.

`driver.py JOBS_JSON` runs a list of jobs in one process (importing torch is the slow part):

  {"op": "create", "config": {...}, "out": DIR, "seed": int, "max_shard_size": str | null}
      builds a random fp32 `transformers.Qwen3ForCausalLM` (norm weights randomised too) and
      saves it with `save_pretrained` (sharded with an index when max_shard_size is given).
  {"op": "logits", "model": DIR, "ids": NPY, "out": NPY, "mask": NPY | null}
      loads DIR with `from_pretrained` and writes fp32 logits [B, T, V] of int ids [B, T].
"""

import json
import sys

import numpy as np
import torch
import transformers


def create(config, out, seed, max_shard_size=None):
  torch.manual_seed(seed)
  model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config))
  model = model.to(torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(out, **kw)


def logits(model, ids, out, mask=None):
  net = transformers.Qwen3ForCausalLM.from_pretrained(
      model, dtype=torch.float32, attn_implementation="eager").eval()
  ids = torch.from_numpy(np.load(ids).astype(np.int64))
  mask = None if mask is None else torch.from_numpy(np.load(mask).astype(np.int64))
  with torch.no_grad():
    result = net(input_ids=ids, attention_mask=mask).logits
  np.save(out, result.to(torch.float32).numpy())


if __name__ == "__main__":
  with open(sys.argv[1]) as f:
    jobs = json.load(f)
  for job in jobs:
    op = job.pop("op")
    {"create": create, "logits": logits}[op](**job)
