"""The `dlax` command line.

    dlax train --config PRESET_OR_YAML [--fresh] [--distributed] [section.key=value ...]
    dlax eval --config PRESET_OR_YAML [--checkpoint DIR] [--tasks passkey,ruler,...] [--out DIR]
              [--lengths 512 1024] [--examples N] [--distributed] [section.key=value ...]
    dlax generate (--model DIR | --config PRESET_OR_YAML [--checkpoint DIR] [section.key=value ...])
                  --prompt-file FILE [--max-new-tokens 64] [--temperature 0] [--top-p 1]
                  [--seed 0] [--dtype bfloat16] [--per-line] [--ids] [--json]
    dlax export --to torch|official --config PRESET_OR_YAML [--checkpoint DIR] --out DIR
                [--dtype float32|bfloat16] [section.key=value ...]

`train` runs `dlax_training.loop.train` on a preset of `configs/` (or a YAML file) with `a.b=c`
overrides, resuming from the newest intact checkpoint of `checkpoint.dir` unless `--fresh`, and
prints a result table. `eval` evaluates the newest checkpoint of `--checkpoint` (default
`checkpoint.dir`): perplexity on held-out data and passkey accuracy; with `--tasks` it runs those
evaluations of `dlax_training.evals` instead (passkey, ruler, mqar, forgetting, perplexity,
dla_boundaries, comet_memory), each writing `<task>.json` and `<task>.png` into `--out`. Config and override errors
are reported before anything is compiled; a NaN or inf loss stops training with a diagnostic.
`--distributed` starts multi-host JAX (see `dlax_training.loop`).

`generate` continues each prompt with a saved model: `--model` names a CoMeT folder (official
layout, or a plain HF Qwen3 folder whose memory is then freshly initialised; text goes through
its `tokenizer.json`), `--config` a training run (any task: DLA, base and Transformer LMs, or
CoMeT) whose newest checkpoint in `--checkpoint` (default `checkpoint.dir`) is restored; text then
goes through the run's tokenizer (`data.tokenizer`) and generation stops at its eos. With `--ids`
the file holds whitespace-separated token ids instead. The whole file is one prompt, or each
non-empty line is one with `--per-line` (a batch of different lengths).

`export` writes the newest checkpoint of a run as a folder PyTorch loads. `--to torch`: for the
language models (DLA, Log-Linear, base, Transformer) an HF-style folder (`config.json`,
`model.safetensors`, dlax's pure-PyTorch `modeling_dlax.py`) that
`transformers.AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads; for CoMeT
the backbone as a plain HF Qwen3 folder. `--to official`: CoMeT's official layout (§12).
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


def _encode_prompts(prompts: list[str], encode) -> list[np.ndarray]:
  if encode is None:
    return [_parse_ids(p, i) for i, p in enumerate(prompts)]
  return [np.asarray(encode(p), np.int32) for p in prompts]


def _results(prompts: list[str], tokens: np.ndarray, num_tokens: np.ndarray, decode) -> list[dict]:
  results = []
  for row, prompt in enumerate(prompts):
    new = tokens[row, :num_tokens[row]].tolist()
    result = {"prompt": prompt, "token_ids": new}
    if decode is not None:
      result["text"] = decode(new)
    results.append(result)
  return results


def _generate_from_folder(args, prompts: list[str]) -> list[dict]:
  """A CoMeT / HF Qwen3 folder with its `tokenizer.json`."""
  import jax.numpy as jnp

  from dlax.models.comet import CometForCausalLM
  tokenizer = None if args.ids else _load_tokenizer(args.model)
  ids = _encode_prompts(prompts, None if tokenizer is None else
                        lambda p: tokenizer.encode(p, add_special_tokens=False).ids)
  model = CometForCausalLM.from_pretrained(args.model, dtype=jnp.dtype(args.dtype),
                                           param_dtype=jnp.float32)
  hf_config = model.backbone.hf_config
  out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, eos_token_id=hf_config.eos_token_id,
                       pad_token_id=hf_config.pad_token_id, return_details=True)
  decode = None if tokenizer is None else lambda new: tokenizer.decode(new,
                                                                       skip_special_tokens=True)
  return _results(prompts, out.tokens, out.num_tokens, decode)


def _generate_from_checkpoint(args, prompts: list[str]) -> list[dict]:
  """A training run's newest checkpoint, with the run's tokenizer."""
  from dlax.models.lm_generation import generate
  from dlax_training.loop import restore_checkpoint
  session, _, params = restore_checkpoint(_load_config(args), args.checkpoint,
                                          distributed=args.distributed or None)
  tokenizer, model = session.tokenizer, session.model(params)
  ids = _encode_prompts(prompts, None if args.ids else tokenizer.encode)
  options = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                 eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
  if session.config.task == "comet":
    out = model.generate(ids, args.max_new_tokens, return_details=True, **options)
  else:
    out = generate(model, ids, args.max_new_tokens, **options)
  return _results(prompts, out.tokens, out.num_tokens,
                  None if args.ids else lambda new: tokenizer.decode(
                      [i for i in new if i != tokenizer.eos_id]))


def generate_command(args) -> list[dict]:
  prompts = _read_prompts(args.prompt_file, args.per_line)
  if args.model is not None:
    return _generate_from_folder(args, prompts)
  return _generate_from_checkpoint(args, prompts)


EXPORT_TARGETS = ("torch", "official")


def export_command(args) -> str:
  """Writes the run's newest checkpoint to `--out`; returns a one-line summary."""
  from dlax.convert import export_lm
  from dlax_training.loop import restore_checkpoint
  config = _load_config(args)
  if args.to == "official" and config.task != "comet":
    raise ValueError(f"--to official is CoMeT's layout; a {config.task!r} run exports --to torch")
  session, step, params = restore_checkpoint(config, args.checkpoint,
                                             distributed=args.distributed or None)
  model = session.model(params)
  if config.task == "comet":
    model.save_pretrained(args.out, format="official" if args.to == "official" else "hf-backbone",
                          dtype=args.dtype)
  else:
    export_lm(model, args.out, dtype=args.dtype)
  return f"dlax export: step {step} of {config.task!r} run -> {args.out} ({args.to}, {args.dtype})"


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
  from dlax_training.loop import evaluate_checkpoint, restore_checkpoint, summary_rows
  config = _load_config(args)
  if args.tasks is None:
    step, results = evaluate_checkpoint(config, args.checkpoint,
                                        distributed=args.distributed or None)
    return format_table([("checkpoint step", str(step)), *summary_rows(config, results=results)])
  from dlax_training.evals.suite import run_suite
  from dlax_training.evals.suite import summary_rows as suite_rows
  session, step, params = restore_checkpoint(config, args.checkpoint,
                                             distributed=args.distributed or None)
  tasks = [t for t in args.tasks.split(",") if t]
  results = run_suite(session.model(params), session.tokenizer, tasks, args.out,
                      lengths=args.lengths, num_examples=args.examples)
  return format_table([("checkpoint step", str(step)), ("folder", args.out),
                       *suite_rows(results)])


def _add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
  parser.add_argument("--config", required=required,
                      help="a preset name in configs/ (e.g. tiny_demo) or a YAML file")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (multi-host runs)")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                      help="config overrides, e.g. optimizer.lr=1e-3 model.dla.capacity=16")


def _run_training_command(command, args) -> str:
  """Runs a subcommand, turning the errors a user can fix into one-line exits."""
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
  evaluate.add_argument("--tasks", help="comma-separated evaluations (JSON + PNG each), e.g. "
                        "passkey,ruler,mqar,forgetting,perplexity,dla_boundaries,comet_memory")
  evaluate.add_argument("--out", default="eval_out", help="folder for --tasks results")
  evaluate.add_argument("--lengths", type=int, nargs="+", help="context lengths (passkey, ruler)")
  evaluate.add_argument("--examples", type=int, help="examples per cell (scoring evaluations)")
  export = commands.add_parser("export", help="write a run's checkpoint as a PyTorch folder")
  export.add_argument("--to", required=True, choices=EXPORT_TARGETS,
                      help="torch: HF folder (dlax modeling file / Qwen3 backbone); official: "
                      "CoMeT's layout")
  _add_config_arguments(export)
  export.add_argument("--checkpoint", help="checkpoint folder (default: checkpoint.dir)")
  export.add_argument("--out", required=True, help="output folder")
  export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  gen = commands.add_parser("generate", help="continue prompts with a saved model")
  gen.add_argument("--model", help="CoMeT or HF Qwen3 folder (instead of --config)")
  _add_config_arguments(gen, required=False)
  gen.add_argument("--checkpoint", help="with --config: checkpoint folder (default: "
                   "checkpoint.dir)")
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
  if not any(a.startswith("-") for a in extra):
    args.overrides += extra        # overrides given after an option
  elif extra:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  commands = {"train": train_command, "eval": eval_command, "export": export_command}
  if args.command in commands:
    try:
      print(_run_training_command(commands[args.command], args))
    except ValueError as e:
      raise SystemExit(f"dlax {args.command}: {e}") from e
    return 0
  if (args.model is None) == (args.config is None):
    parser.error("generate: give exactly one of --model (a CoMeT folder) and --config (a run)")
  if args.model is not None and (args.overrides or args.checkpoint):
    parser.error("generate: overrides and --checkpoint go with --config, not --model")
  try:
    results = _run_training_command(generate_command, args)
  except (ValueError, KeyError) as e:
    raise SystemExit(f"dlax {args.command}: {e}") from e
  for result in results:
    if args.json:
      print(json.dumps(result))
    else:
      print(result.get("text", " ".join(map(str, result["token_ids"]))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
