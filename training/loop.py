"""The training loop: grain batches → one jitted, sharded step → orbax checkpoints, metrics, eval.

    from dlax_training.config import load_config
    from dlax_training.loop import train
    result = train(load_config("tiny_demo", ["steps=100"]))    # resumes from checkpoint.dir
    result.losses[100], result.eval["eval/perplexity"]

`train` checks the config against the devices (`config.validate`) and the tokenizer against the
model's vocabulary before anything is compiled, builds the mesh (`dlax.parallel.make_mesh`, axes
data × fsdp × tensor × stage) and shards parameters and optimizer state by the logical-axis
rules (`dlax.parallel.param_shardings`), batches over ('data', 'fsdp'). The step is
`jax.jit(step, in_shardings, out_shardings, donate_argnums=0)` over the pure train state
`{"params", "opt_state", "step", "rng"}`, the module rebuilt inside with `nnx.merge`.

Every `checkpoint.every_steps` steps (and at the end) the state and the data iterator's state
are saved; a restarted run continues from the newest intact checkpoint with the same losses and
the same batches (a corrupt newest checkpoint is skipped with a warning). Losses are read one
step late, so the host never stalls the device; a NaN or inf loss raises
`checkpoint.NonFiniteLossError` before the state that produced it can be saved.

Multi-host start-up. With `distributed=True` (`dlax train --distributed`) or the environment
variable `DLAX_DISTRIBUTED=1`, `initialize_distributed` calls `jax.distributed.initialize()`
once, in the main process only (never in grain's data-loader workers). Launch the same command
on every host:

    # TPU pod slice: the coordinator, process count and ids are detected.
    gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all \\
        --command="cd dlax && .venv/bin/dlax train --config dla_mamba2 --distributed"
    # GPU nodes under SLURM, one process per GPU (JAX's default there): detected from SLURM_*.
    srun --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 \\
        dlax train --config dla_mamba2 --distributed
    # Anything else: name the coordinator (host 0) and each process's id.
    JAX_COORDINATOR_ADDRESS=host0:8476 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=$RANK \\
        dlax train --config dla_mamba2 --distributed

Each process then reads its own shard of every batch (`data.make_dataset(process_index=...)`),
process 0 writes metrics and checkpoint manifests, and all write their checkpoint shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from dlax.parallel import batch_sharding, make_mesh, optimizer_shardings, param_shardings
from dlax_training import tasks
from dlax_training.checkpoint import Checkpointer, CheckpointError, check_finite
from dlax_training.config import ConfigError, TrainConfig, resolve_mesh, to_dict, validate
from dlax_training.data import make_dataset, make_tokenizer
from dlax_training.eval import check_passkey_lengths, evaluate
from dlax_training.metrics import MetricsWriter, layer_metrics, mfu
from dlax_training.optim import build_optimizer, learning_rate_schedule

Batch = dict[str, np.ndarray]
BatchHook = Callable[[int, Batch], Batch]
# Sections whose change makes a checkpoint belong to a different run (warned about on resume).
RUN_DEFINING = ("task", "seed", "model", "comet", "data", "optimizer", "schedule")


def initialize_distributed(distributed: bool | None = None) -> bool:
  """Calls `jax.distributed.initialize()` when asked (`distributed`, default: the environment
  variable DLAX_DISTRIBUTED), once, and only in a main process (not in a multiprocessing child
  such as a grain worker). JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID are
  passed on when set; otherwise JAX detects TPU pods, SLURM and Open MPI. Returns whether it
  initialized."""
  if distributed is None:
    distributed = os.environ.get("DLAX_DISTRIBUTED", "").lower() not in ("", "0", "false")
  if (not distributed or multiprocessing.parent_process() is not None
      or jax.distributed.is_initialized()):
    return False
  ints = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
  kwargs = {name: int(os.environ[var]) for name, var in ints.items() if var in os.environ}
  jax.distributed.initialize(**kwargs)
  return True


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What a `train` call did. `losses` holds the loss of every step this call trained (a resumed
  run starts after `start_step`); `eval` the final evaluation (empty when disabled)."""
  step: int
  start_step: int
  losses: dict[int, float]
  eval: dict[str, float]
  tokens_per_second: float
  checkpoint_dir: str | None
  model: nnx.Module


class Session:
  """What training and evaluation share: devices, mesh, tokenizer, task, optimizer, shardings,
  and the train state's initialisation and restoration. Builds nothing on the devices until
  `init_state` / `restore`; raises `ConfigError` for settings that cannot run."""

  def __init__(self, config: TrainConfig, devices: Sequence[jax.Device] | None = None):
    self.config = config
    self.devices = list(jax.devices() if devices is None else devices)
    validate(config, len(self.devices))
    self.mesh = make_mesh(**resolve_mesh(config.mesh, len(self.devices)), devices=self.devices)
    self.tokenizer = make_tokenizer(config.data.tokenizer)
    self.task = tasks.make_task(config, self.mesh)
    abstract = self.task.abstract_model()
    tasks.check_vocab(abstract, self.tokenizer)
    check_passkey_lengths(config, self.tokenizer)
    self.graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise NotImplementedError(f"the model has non-parameter state {list(rest.keys())}; the "
                                "loop trains nnx.Param only")
    self.abstract_model, self.abstract_params = abstract, abstract_params
    self.tx = build_optimizer(config, _skeleton(abstract))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharding = batch_sharding(self.mesh)
    self.state_shardings = self._state_shardings(abstract_params)

  # The train state.

  def _state_shardings(self, abstract_params) -> dict[str, Any]:
    rules = _sharding_rules(self.config)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    return {"params": param_shardings(abstract_params, self.mesh, *rules),
            "opt_state": optimizer_shardings(abstract_opt, self.mesh, *rules),
            "step": self.replicated, "rng": self.replicated}

  def _new_state(self, params) -> dict[str, Any]:
    rng = jax.random.fold_in(jax.random.key(self.config.seed), 1)   # not the init's key
    return {"params": params, "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32), "rng": rng}

  def init_state(self) -> dict[str, Any]:
    """A fresh train state, created sharded (random init inside `jit`, or CoMeT's weights)."""
    if self.config.task == "comet" and self.config.comet.init_from is not None:
      params = jax.device_put(nnx.state(self.task.build_model(), nnx.Param),
                              self.state_shardings["params"])
      return jax.jit(self._new_state, out_shardings=self.state_shardings)(params)

    def fresh():
      return self._new_state(nnx.state(self.task.build_model(), nnx.Param))
    return jax.jit(fresh, out_shardings=self.state_shardings)()

  def abstract_state(self) -> dict[str, Any]:
    """`jax.ShapeDtypeStruct`s of the train state with their shardings (for restoring)."""
    abstract = jax.eval_shape(self._new_state, self.abstract_params)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, self.state_shardings)

  def model(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params)

  # Batches and compiled functions.

  def device_batch(self, host_batch: Batch):
    """This process's rows of a batch → global arrays sharded over the data axes."""
    prepared = self.task.prepare(host_batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)),
        prepared)

  def train_step(self):
    """The jitted `(state, batch) -> (state, metrics)`; the input state is donated."""
    task, graphdef, tx = self.task, self.graphdef, self.tx

    def step(state, batch):
      def loss_fn(params):
        stats, metrics = task.token_stats(nnx.merge(graphdef, params), batch, train=True)
        return stats.loss, metrics

      # No dlax model draws random numbers yet; the key still advances once per step, so that a
      # stochastic layer added later gets a fresh, checkpointed key each step.
      rng, _ = jax.random.split(state["rng"])
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      new_state = {"params": optax.apply_updates(state["params"], updates),
                   "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
      return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

    return jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)

  def stats_fn(self) -> Callable[[Any, Batch], tasks.TokenStats]:
    """`(params, host batch) -> per-row TokenStats` as numpy (jitted; for evaluation)."""
    task, graphdef = self.task, self.graphdef
    stats = jax.jit(lambda params, batch: task.token_stats(nnx.merge(graphdef, params), batch)[0],
                    in_shardings=(self.state_shardings["params"], self.batch_sharding),
                    out_shardings=self.replicated)
    return lambda params, batch: jax.tree.map(np.asarray, stats(params, self.device_batch(batch)))

  def evaluate(self, params, stats_fn=None) -> dict[str, float]:
    stats_fn = stats_fn or self.stats_fn()
    return evaluate(self.config, self.tokenizer, lambda batch: stats_fn(params, batch),
                    self.task.chunk_size, process_index=jax.process_index(),
                    process_count=jax.process_count())

  def flops_per_token(self) -> float:
    return tasks.model_flops_per_token(self.abstract_model, self.task)


def _skeleton(abstract: nnx.Module) -> nnx.Module:
  """`abstract` with zero-strided numpy views as parameter values: what `build_optimizer` reads
  (shapes, ranks; CoMeT's helpers index the values) at no memory cost."""
  graphdef, state = nnx.split(abstract)
  return nnx.merge(graphdef, jax.tree.map(
      lambda a: np.broadcast_to(np.zeros((), a.dtype), a.shape), state))


def _sharding_rules(config: TrainConfig) -> tuple:
  """Extra positional `rules` for `param_shardings` (CoMeT's pipeline replicates layers)."""
  if config.mesh.pipeline != "comet":
    return ()
  try:
    from dlax.parallel.comet_pipeline import COMET_PIPELINE_RULES
  except ImportError as error:
    raise NotImplementedError("mesh.pipeline='comet' needs dlax.parallel.comet_pipeline "
                              f"({error})") from None
  return (COMET_PIPELINE_RULES,)


def _restore(checkpointer: Checkpointer, session: Session):
  """The newest intact checkpoint (None on a fresh run); a clear `CheckpointError` when it holds
  another model's state (orbax's own message lists every mismatching leaf)."""
  try:
    return checkpointer.restore_latest(session.abstract_state())
  except CheckpointError as error:
    first_line = str(error).splitlines()[0].rstrip(":")
    raise CheckpointError(f"{first_line}. Is it a checkpoint of another model or optimizer? "
                          "Resume with its config, or choose another checkpoint.dir") from error


def _check_resumable(restored_config: dict | None, config: TrainConfig) -> None:
  if restored_config is None:
    return
  now = to_dict(config)
  changed = [key for key in RUN_DEFINING if restored_config.get(key) != now.get(key)]
  if changed:
    warnings.warn(f"resuming a checkpoint saved with different settings of {', '.join(changed)}",
                  stacklevel=3)


class _Progress:
  """Per-step bookkeeping on the host: losses, the non-finite check, metrics, the progress bar."""

  def __init__(self, session: Session, start: int, writer: MetricsWriter | None):
    config = session.config
    self.config, self.writer, self.losses = config, writer, {}
    self.schedule = learning_rate_schedule(config)
    self.tokens_per_step = config.data.global_batch_size * config.data.seq_len
    self.flops_per_token, self.n_devices = session.flops_per_token(), len(session.devices)
    self.bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True,
                    disable=not (config.logging.progress and jax.process_index() == 0))
    self.window = (start, None)    # (step, time) where the tokens/s window starts
    self.tokens_per_second = math.nan

  def finish(self, step: int, metrics: dict, params) -> None:
    """Reads step `step`'s metrics (blocking), stops on a non-finite loss (naming the non-finite
    leaves of the newest `params`), logs."""
    loss = check_finite(metrics["loss"], step, grad_norm=metrics["grad_norm"], params=params)
    self.losses[step] = loss
    now = time.perf_counter()
    first, since = self.window
    if since is None:     # the first step includes compilation: time from its end
      self.window = (step, now)
    elif step > first:
      self.tokens_per_second = (step - first) * self.tokens_per_step / (now - since)
    self.bar.update(step - self.bar.n)
    speed = {"tok_s": f"{self.tokens_per_second:,.0f}"} if since is not None else {}
    self.bar.set_postfix(loss=f"{loss:.4f}", **speed, refresh=False)
    if self.writer is not None and (step % self.config.logging.every_steps == 0
                                    or step == self.config.steps):
      self.writer.write(step, self.scalars(step, loss, metrics))
      self.window = (step, now)

  def scalars(self, step: int, loss: float, metrics: dict) -> dict[str, float]:
    scalars = {"loss": loss, "learning_rate": float(self.schedule(step - 1)),
               "grad_norm": float(metrics["grad_norm"]), "tokens": step * self.tokens_per_step}
    if math.isfinite(self.tokens_per_second):
      scalars["tokens_per_second"] = self.tokens_per_second
      utilisation = mfu(self.tokens_per_second, self.flops_per_token, self.n_devices)
      if math.isfinite(utilisation):    # unknown peak (CPU): left out
        scalars["mfu"] = utilisation
    layers = {name: np.asarray(value) for name, value in metrics.items()
              if name not in ("loss", "grad_norm")}
    scalars.update(layer_metrics(layers))
    return scalars

  def close(self) -> None:
    self.bar.close()

  def __enter__(self) -> _Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def train(config: TrainConfig, *, resume: bool = True, devices: Sequence[jax.Device] | None = None,
          distributed: bool | None = None, batch_hook: BatchHook | None = None) -> TrainResult:
  """Trains `config.steps` steps (see the module docstring) and evaluates at the end.

  resume: continue from the newest intact checkpoint in `checkpoint.dir`; with False an existing
    checkpoint there is an error (old and new steps would mix). devices: the mesh's devices
    (default all). distributed: see `initialize_distributed`. batch_hook: `(step, host batch) ->
    batch`, called before each step (to record or alter data, e.g. in tests).
  Raises `ConfigError` before any compilation, `NonFiniteLossError` on a NaN/inf loss (the last
  checkpoint stays the last good one).
  """
  initialize_distributed(distributed)
  session = Session(config, devices)
  with contextlib.ExitStack() as stack:
    checkpointer = None
    if config.checkpoint.dir:
      # Closed last: waits for the last save, so a good checkpoint is never left half written.
      checkpointer = stack.enter_context(_checkpointer(config.checkpoint.dir, config))
      if not resume and checkpointer.steps():
        raise ConfigError(f"checkpoint.dir {config.checkpoint.dir} already holds steps "
                          f"{checkpointer.steps()}; resume, or choose another directory")
    data = stack.enter_context(make_dataset(**tasks.dataset_options(config),
                                            process_index=jax.process_index(),
                                            process_count=jax.process_count()))
    restored = _restore(checkpointer, session) if checkpointer is not None and resume else None
    if restored is None:
      state, start = session.init_state(), 0
    else:
      _check_resumable(restored.config, config)
      state, start = restored.state, restored.step
      data.set_state(_own_data_state(restored.data_state))
    writer = None
    if config.logging.dir:
      writer = MetricsWriter(config.logging.dir, jsonl=config.logging.jsonl,
                             tensorboard=config.logging.tensorboard)
      stack.callback(writer.close)
    progress = stack.enter_context(_Progress(session, start, writer))
    stats_fn = session.stats_fn()   # compiled on first use only
    state = _train_steps(session, state, start, data, checkpointer, progress, writer, stats_fn,
                         batch_hook)
    progress.close()
    results = {}
    if config.eval.batches or config.eval.passkey_lengths:
      results = session.evaluate(state["params"], stats_fn)
      _write(writer, int(state["step"]), results)
  return TrainResult(step=int(state["step"]), start_step=start, losses=progress.losses,
                     eval=results, tokens_per_second=progress.tokens_per_second,
                     checkpoint_dir=config.checkpoint.dir, model=session.model(state["params"]))


def _train_steps(session: Session, state, start: int, data, checkpointer: Checkpointer | None,
                 progress: _Progress, writer: MetricsWriter | None, stats_fn,
                 batch_hook: BatchHook | None):
  """Steps `start + 1 ... config.steps`: the host reads each step's metrics while the next one
  runs, except before a checkpoint or an evaluation. Returns the final state."""
  config, step_fn = session.config, session.train_step()
  pending = None     # (step, metrics) not read yet
  for step in range(start + 1, config.steps + 1):
    batch = next(data)
    if batch_hook is not None:
      batch = batch_hook(step, batch)
    state, metrics = step_fn(state, session.device_batch(batch))
    if pending is not None:
      progress.finish(*pending, state["params"])
    pending = (step, metrics)
    saving = checkpointer is not None and (checkpointer.should_save(step) or step == config.steps)
    evaluating = config.eval.every_steps and step % config.eval.every_steps == 0
    if saving or evaluating:
      progress.finish(*pending, state["params"])   # a non-finite loss stops before the save
      pending = None
    if saving:
      checkpointer.save(step, state, data_state=_all_data_states(data), config=config,
                        force=True)
    if evaluating and step < config.steps:
      _write(writer, step, session.evaluate(state["params"], stats_fn))
  if pending is not None:
    progress.finish(*pending, state["params"])
  return state


def _all_data_states(data) -> dict[str, list]:
  """Every process's data-iterator state (each reads its own shard), gathered for the checkpoint:
  `{"processes": [state of process 0, 1, ...]}`."""
  own = data.get_state()
  if jax.process_count() == 1:
    return {"processes": [own]}
  from jax.experimental import multihost_utils
  encoded = np.frombuffer(json.dumps(own).encode(), np.uint8)
  longest = int(np.max(multihost_utils.process_allgather(np.int32(len(encoded)))))
  padded = np.pad(encoded, (0, longest - len(encoded)), constant_values=ord(" "))
  return {"processes": [json.loads(bytes(row)) for row in
                        multihost_utils.process_allgather(padded)]}


def _own_data_state(saved: dict) -> dict:
  states = saved["processes"]
  if len(states) != jax.process_count():
    raise CheckpointError(f"the checkpoint holds the data states of {len(states)} processes, this "
                          f"run has {jax.process_count()}")
  return states[jax.process_index()]


def _checkpointer(directory: str, config: TrainConfig | None = None) -> Checkpointer:
  """A `Checkpointer` on the absolute path of `directory` (orbax rejects relative paths)."""
  directory = os.path.abspath(directory)
  if config is None:
    return Checkpointer(directory, async_save=False)
  options = config.checkpoint
  return Checkpointer(directory, every_steps=options.every_steps, keep=options.keep,
                      async_save=options.async_save)


def _write(writer: MetricsWriter | None, step: int, scalars: dict[str, float]) -> None:
  if writer is not None and scalars:
    writer.write(step, scalars)


def restore_checkpoint(config: TrainConfig, checkpoint_dir: str | None = None, *,
                       devices: Sequence[jax.Device] | None = None,
                       distributed: bool | None = None) -> tuple[Session, int, Any]:
  """(session, step, params) of the newest intact checkpoint in `checkpoint_dir` (default
  `checkpoint.dir`); step 0 and the fresh initialisation when neither names a folder.
  `FileNotFoundError` when the folder holds no checkpoint."""
  initialize_distributed(distributed)
  session = Session(config, devices)
  directory = checkpoint_dir or config.checkpoint.dir
  if directory is None:
    return session, 0, session.init_state()["params"]
  with _checkpointer(directory) as checkpointer:
    restored = _restore(checkpointer, session)
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  return session, restored.step, restored.state["params"]


def evaluate_checkpoint(config: TrainConfig, checkpoint_dir: str | None = None, *,
                        devices: Sequence[jax.Device] | None = None,
                        distributed: bool | None = None) -> tuple[int, dict[str, float]]:
  """(step, evaluation) of `restore_checkpoint`'s parameters."""
  session, step, params = restore_checkpoint(config, checkpoint_dir, devices=devices,
                                             distributed=distributed)
  return step, session.evaluate(params)


def summary_rows(config: TrainConfig, result: TrainResult | None = None,
                 results: dict[str, float] | None = None) -> list[tuple[str, str]]:
  """Rows of the result table printed by `dlax train` / `dlax eval` and the demo."""
  rows = []
  if result is not None:
    losses = list(result.losses.values())
    trained = (f"{result.start_step} → {result.step}" if result.start_step else str(result.step))
    rows.append(("steps", trained))
    if losses:
      rows.append(("train loss (first → last step)", f"{losses[0]:.3f} → {losses[-1]:.3f}"))
    if math.isfinite(result.tokens_per_second):
      rows.append(("train tokens/s", f"{result.tokens_per_second:,.0f}"))
    results = result.eval
  results = results or {}
  if "eval/loss" in results:
    source = tasks.describe_heldout(config)
    rows.append((f"eval loss ({source})", f"{results['eval/loss']:.3f}"))
    rows.append(("eval perplexity", f"{results['eval/perplexity']:.2f}"))
  for length in config.eval.passkey_lengths:
    value = results.get(f"eval/passkey_{length}")
    if value is not None:
      rows.append((f"passkey accuracy @ {length} tokens", f"{value:.0%}"))
  if result is not None and result.checkpoint_dir:
    rows.append(("checkpoint", os.path.join(result.checkpoint_dir, str(result.step))))
  return rows
