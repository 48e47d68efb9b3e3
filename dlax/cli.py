"""The `dlax` command line.

    dlax generate --model DIR --prompt-file FILE [--max-new-tokens 64] [--temperature 0]
                  [--top-p 1] [--seed 0] [--dtype bfloat16] [--per-line] [--ids]

`generate` loads a CoMeT folder (official layout, or a plain HF Qwen3 folder whose memory is then
freshly initialised) and continues each prompt. Text goes through the folder's `tokenizer.json`;
with `--ids` the file holds whitespace-separated token ids instead. The whole file is one prompt,
or each non-empty line is one with `--per-line` (a batch of different lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

TOKENIZER_NAME = "tokenizer.json"


def _read_prompts(path: str, per_line: bool) -> list[str]:
  if not os.path.isfile(path):
    raise SystemExit(f"dlax generate: prompt file {path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  prompts = [line for line in text.splitlines() if line.strip()] if per_line else [text]
  if not prompts or not any(p.strip() for p in prompts):
    raise SystemExit(f"dlax generate: prompt file {path!r} is empty")
  return prompts


def _parse_ids(prompt: str, line: int) -> np.ndarray:
  try:
    return np.asarray([int(t) for t in prompt.split()], np.int32)
  except ValueError as e:
    raise SystemExit(f"dlax generate: prompt {line} is not whitespace-separated ids ({e})")


def _load_tokenizer(model_dir: str):
  path = os.path.join(model_dir, TOKENIZER_NAME)
  if not os.path.isfile(path):
    raise SystemExit(f"dlax generate: {model_dir!r} has no {TOKENIZER_NAME}; pass --ids and give "
                     f"token ids in the prompt file")
  from tokenizers import Tokenizer
  return Tokenizer.from_file(path)


def generate_command(args) -> list[dict]:
  import jax.numpy as jnp

  from dlax.models.comet import CometForCausalLM
  prompts = _read_prompts(args.prompt_file, args.per_line)
  tokenizer = None if args.ids else _load_tokenizer(args.model)
  ids = ([_parse_ids(p, i) for i, p in enumerate(prompts)] if tokenizer is None else
         [np.asarray(tokenizer.encode(p, add_special_tokens=False).ids, np.int32)
          for p in prompts])
  model = CometForCausalLM.from_pretrained(args.model, dtype=jnp.dtype(args.dtype),
                                           param_dtype=jnp.float32)
  eos = model.backbone.hf_config.eos_token_id
  pad = model.backbone.hf_config.pad_token_id
  tokens = model.generate(ids, args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, eos_token_id=eos,
                          pad_token_id=pad, return_details=True)
  results = []
  for row, prompt in enumerate(prompts):
    new = tokens.tokens[row, :tokens.num_tokens[row]].tolist()
    result = {"prompt": prompt, "token_ids": new}
    if tokenizer is not None:
      result["text"] = tokenizer.decode(new, skip_special_tokens=True)
    results.append(result)
  return results


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="dlax", description="dlax command line")
  commands = parser.add_subparsers(dest="command", required=True)
  gen = commands.add_parser("generate", help="continue prompts with a saved CoMeT model")
  gen.add_argument("--model", required=True, help="CoMeT or HF Qwen3 folder")
  gen.add_argument("--prompt-file", required=True)
  gen.add_argument("--max-new-tokens", type=int, default=64)
  gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  gen.add_argument("--top-p", type=float, default=1.0)
  gen.add_argument("--seed", type=int, default=0)
  gen.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="compute dtype (parameters stay float32)")
  gen.add_argument("--per-line", action="store_true", help="one prompt per non-empty line")
  gen.add_argument("--ids", action="store_true", help="prompts are token ids, not text")
  gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
  args = parser.parse_args(argv)
  try:
    results = generate_command(args)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise SystemExit(f"dlax {args.command}: {e}") from e
  for result in results:
    if args.json:
      print(json.dumps(result))
    else:
      print(result.get("text", " ".join(map(str, result["token_ids"]))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
