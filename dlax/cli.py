"""The `dlax` command line.

    dlax train --config PRESET_OR_YAML [--fresh] [--distributed] [section.key=value ...]
    dlax eval --config PRESET_OR_YAML [--checkpoint DIR] [--distributed] [section.key=value ...]
    dlax generate --model DIR --prompt-file FILE [--max-new-tokens 64] [--temperature 0]
                  [--top-p 1] [--seed 0] [--dtype bfloat16] [--per-line] [--ids]

`train` runs `dlax_training.loop.train` on a preset of `configs/` (or a YAML file) with `a.b=c`
overrides, resuming from the newest intact checkpoint of `checkpoint.dir` unless `--fresh`, and
prints a result table. `eval` evaluates the newest checkpoint of `--checkpoint` (default
`checkpoint.dir`): perplexity on held-out data and passkey accuracy. Config and override errors
are reported before anything is compiled; a NaN or inf loss stops training with a diagnostic.
`--distributed` starts multi-host JAX (see `dlax_training.loop`).

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


def _load_config(args):
  from dlax_training.config import load_config
  return load_config(args.config, args.overrides)


def train_command(args) -> str:
  from dlax_training.eval import format_table
  from dlax_training.loop import summary_rows, train
  config = _load_config(args)
  result = train(config, resume=not args.fresh, distributed=args.distributed or None)
  return format_table(summary_rows(config, result))


def eval_command(args) -> str:
  from dlax_training.eval import format_table
  from dlax_training.loop import evaluate_checkpoint, summary_rows
  config = _load_config(args)
  step, results = evaluate_checkpoint(config, args.checkpoint,
                                      distributed=args.distributed or None)
  return format_table([("checkpoint step", str(step)), *summary_rows(config, results=results)])


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True,
                      help="a preset name in configs/ (e.g. tiny_demo) or a YAML file")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (multi-host runs)")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                      help="config overrides, e.g. optimizer.lr=1e-3 model.dla.capacity=16")


def _run_training_command(command, args) -> str:
  """Runs `train`/`eval`, turning the errors a user can fix into one-line exits."""
  from dlax_training.checkpoint import CheckpointError, NonFiniteLossError
  from dlax_training.config import ConfigError
  try:
    return command(args)
  except ConfigError as e:
    raise SystemExit(f"dlax {args.command}: config error: {e}") from e
  except (NonFiniteLossError, CheckpointError, FileNotFoundError, NotImplementedError) as e:
    raise SystemExit(f"dlax {args.command}: {e}") from e


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="dlax", description="dlax command line")
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser("train", help="pre-train (task lm) or fine-tune (task comet)")
  _add_config_arguments(train)
  train.add_argument("--fresh", action="store_true",
                     help="start at step 0 (an error if checkpoint.dir already holds steps)")
  evaluate = commands.add_parser("eval", help="perplexity and passkey accuracy of a checkpoint")
  _add_config_arguments(evaluate)
  evaluate.add_argument("--checkpoint", help="checkpoint folder (default: checkpoint.dir)")
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
  args, extra = parser.parse_known_args(argv)
  if args.command in ("train", "eval") and not any(a.startswith("-") for a in extra):
    args.overrides += extra        # overrides given after an option
  elif extra:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  if args.command in ("train", "eval"):
    print(_run_training_command({"train": train_command, "eval": eval_command}[args.command],
                                args))
    return 0
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
