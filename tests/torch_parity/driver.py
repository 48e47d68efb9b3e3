"""Runs in the torch environment (.venv-torch, Python 3.11), never in the main one.

`driver.py JOBS_JSON` runs a list of jobs in one process (importing torch is the slow part):

  {"op": "create", "config": {...}, "out": DIR, "seed": int, "max_shard_size": str | null}
      builds a random fp32 `transformers.Qwen3ForCausalLM` (norm weights randomised too) and
      saves it with `save_pretrained` (sharded with an index when max_shard_size is given).
  {"op": "logits", "model": DIR, "ids": NPY, "out": NPY, "mask": NPY | null}
      loads DIR with `from_pretrained` and writes fp32 logits [B, T, V] of int ids [B, T].
  {"op": "auto_lm", "model": DIR, "ids": NPY, "out": NPY, "loss": NPY | null,
   "generate": NPY | null, "dtype": "float32" | "bfloat16"}
      loads a `dlax.convert.lm_export` folder with `AutoModelForCausalLM.from_pretrained(...,
      trust_remote_code=True)` and writes its fp32 logits of ids [B, T]; optionally the loss with
      labels = ids, and 3 greedy `generate` steps after the first T // 2 ids next to 3 steps of
      argmax over `forward` (`[2, B, T // 2 + 3]`).
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


def auto_lm(model, ids, out, loss=None, generate=None, dtype="float32"):
  net = transformers.AutoModelForCausalLM.from_pretrained(
      model, trust_remote_code=True, dtype=getattr(torch, dtype)).eval()
  ids = torch.from_numpy(np.load(ids).astype(np.int64))
  with torch.no_grad():
    result = net(input_ids=ids, labels=ids)
    np.save(out, result.logits.to(torch.float32).numpy())
    if loss is not None:
      np.save(loss, result.loss.to(torch.float32).numpy())
    if generate is not None:
      prompt = ids[:, : ids.shape[1] // 2]
      generated = net.generate(prompt, max_new_tokens=3, do_sample=False)
      stepped = prompt
      for _ in range(3):
        next_id = net(input_ids=stepped).logits[:, -1].argmax(-1, keepdim=True)
        stepped = torch.cat([stepped, next_id], dim=1)
      np.save(generate, torch.stack([generated, stepped]).numpy())


if __name__ == "__main__":
  with open(sys.argv[1]) as f:
    jobs = json.load(f)
  for job in jobs:
    op = job.pop("op")
    {"create": create, "logits": logits, "auto_lm": auto_lm}[op](**job)
