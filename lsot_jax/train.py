"""Optax training loops for the autoencoder, the VAE baseline and the evaluation classifier.

All three loops share one engine with these properties:

* The train state is a plain pytree ``{"params", "opt_state", "step"}`` updated by one jitted step that
  donates it (``donate_argnums=0``). The step key is ``jax.random.fold_in(train_key, step)``, so a resumed
  run draws exactly the keys an uninterrupted run would.
* Data order is a pure function of ``(seed, epoch)``: epoch ``e`` visits ``default_rng([seed, e])
  .permutation(N)`` in batches of ``batch_size`` (the last partial batch is dropped so shapes stay static).
  The stream position is therefore the step count; it is saved with the state (and checked on resume), so a
  resumed run continues the same stream and reaches the same parameters as an uninterrupted one.
* :func:`train_autoencoder`, :func:`train_vae` and :func:`train_classifier` take the data as arrays or as an
  :class:`lsot_jax.streaming.ImageStream` of the same order (:func:`lsot_jax.feeds.training_stream`:
  bounded host memory); the stream's ``get_state()`` goes into each checkpoint's JSON metadata and a resume
  restores it, and the batches, hence the parameters, are those of the in-memory loop (:mod:`lsot_jax.feeds`).
* Checkpoints go to a :class:`~lsot_jax.checkpoint.StageCheckpointer` every ``checkpoint_every`` steps (or
  at every epoch end) and at the end; the last one is written with ``save_final`` so a finished stage is
  skipped on rerun. A rerun resumes from the latest valid step. The state is saved under field names
  (:func:`lsot_jax.checkpoint.named_state`; the optimiser's steps named ``clip``, ``adam``, ``weight_decay``,
  ``learning_rate``); checkpoints of the versions before, in optax's tuple layout, are still read.
* Losses stay on the device and are fetched every ``log_every`` steps and before every checkpoint. A
  non-finite loss or parameter raises :class:`TrainingDiverged` (a ``FloatingPointError``) naming the stage
  and the first bad step; nothing after the last finite check is ever saved, so the previous checkpoint
  stays restorable.
* Data parallelism: given a ``jax.sharding.Mesh``, the train state is replicated over the mesh axis
  (:func:`lsot_jax.sharding.replicate`) and every batch is split along it
  (:func:`lsot_jax.sharding.shard_batch`; the batch size must divide by the number of devices on the axis),
  so XLA partitions the jitted step by the batch and all-reduces the gradients. The loss is a batch mean
  and the per-step keys do not depend on the placement (JAX's partitionable threefry), so a mesh run
  follows the single-device run to float tolerance, and checkpoints resume with or without a mesh.
* One JSON line per finished epoch goes to ``log_path`` (``stage, epoch, step, loss, examples_per_sec,
  seconds``), and a tqdm bar shows loss and throughput when stderr is a terminal.
* With a ``tracker`` (:mod:`lsot_jax.tracking`, e.g. TensorBoard event files), every fetched step loss is
  written as the scalar ``<stage>/loss`` at its step (1-based: steps done), and each epoch's record as
  ``<stage>/epoch_loss`` and ``<stage>/examples_per_sec`` at the epoch's last step. The tracker only
  receives fetched host values, so the parameters are the same with or without one.
* One update step (:func:`optimizer_step`) serves these loops and :func:`train_autoencoders_vmapped`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from lsot_jax import checkpoint as checkpoint_lib
from lsot_jax import feeds
from lsot_jax import models
from lsot_jax import sharding
from lsot_jax import streaming
from lsot_jax import tracking
from lsot_jax.feeds import batched_apply

__all__ = [
    "LR_SCHEDULES",
    "StackedAutoencoders",
    "TrainConfig",
    "TrainingDiverged",
    "batched_apply",
    "epoch_permutation",
    "optimizer_step",
    "restore_autoencoder",
    "train_autoencoder",
    "train_autoencoders_vmapped",
    "train_classifier",
    "train_vae",
]

_LOG = logging.getLogger(__name__)
History = List[Dict[str, Any]]
LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Hyperparameters shared by the training loops.

  Attributes:
    seed: seeds the model init, the per-step keys and the data order.
    epochs: number of passes over the data; the stage is complete after ``epochs * (N // batch_size)``
      steps.
    batch_size: examples per step (clipped to N).
    learning_rate: Adam(W) step size (the peak of the schedule).
    lr_schedule: ``"constant"``, or ``"cosine"``: decays the step from ``learning_rate`` to 0 over the
      ``epochs * (N // batch_size)`` steps (half a cosine; the schedule's count is in the checkpointed
      optimizer state, so a resumed run continues it).
    weight_decay: decoupled weight decay (AdamW); 0 gives Adam.
    grad_clip_norm: clip gradients to this global norm; None disables clipping.
    checkpoint_every: save every this many steps; 0 saves at the end of every epoch.
    max_to_keep: checkpoints kept on disk.
    max_steps: stop after this many total steps without marking the stage complete (quick runs, tests);
      None trains all epochs.
    log_every: steps between device-to-host loss fetches (divergence checks and progress updates).
  """

  seed: int = 0
  epochs: int = 10
  batch_size: int = 128
  learning_rate: float = 1e-3
  lr_schedule: str = "constant"
  weight_decay: float = 0.0
  grad_clip_norm: Optional[float] = None
  checkpoint_every: int = 0
  max_to_keep: int = 3
  max_steps: Optional[int] = None
  log_every: int = 50

  def __post_init__(self):
    if self.epochs < 1 or self.batch_size < 1:
      raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}.")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
    if self.lr_schedule not in LR_SCHEDULES:
      raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}.")
    if self.weight_decay < 0 or self.checkpoint_every < 0 or self.max_to_keep < 1 or self.log_every < 1:
      raise ValueError("weight_decay and checkpoint_every must be >= 0, max_to_keep and log_every >= 1.")
    if self.max_steps is not None and self.max_steps < 0:
      raise ValueError(f"max_steps must be >= 0 or None, got {self.max_steps}.")
    if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
      raise ValueError(f"grad_clip_norm must be positive or None, got {self.grad_clip_norm}.")


class TrainingDiverged(FloatingPointError):
  """A training loss or parameter became NaN/Inf.

  Attributes:
    stage: the training stage name.
    step: the first step (0-based) whose loss or updated parameters were not finite.
    directory: the checkpoint directory.
    last_good_step: the latest checkpointed step on disk (None if there is none).
  """

  def __init__(self, stage: str, step: int, directory: str, last_good_step: Optional[int]):
    self.stage, self.step, self.directory, self.last_good_step = stage, step, directory, last_good_step
    kept = (f"the last good checkpoint (step {last_good_step}) is kept in {directory}"
            if last_good_step is not None else f"no checkpoint was written to {directory}")
    super().__init__(f"Training stage {stage!r} diverged: non-finite loss or parameters at step {step}; "
                     f"{kept}. Lower the learning rate or check the inputs for NaN/Inf.")


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The data order of one epoch, a pure function of ``(seed, epoch)``.

  Args:
    seed: the training seed.
    epoch: 0-based epoch index.
    num_examples: N.

  Returns:
    int64 array of shape [N], a permutation of ``range(N)``.
  """
  return np.random.default_rng([int(seed), int(epoch)]).permutation(int(num_examples))


def _resolve_config(train_cfg: Optional[TrainConfig], overrides: Dict[str, Any]) -> TrainConfig:
  cfg = train_cfg if train_cfg is not None else TrainConfig()
  if not isinstance(cfg, TrainConfig):
    raise ValueError(f"train_cfg must be a TrainConfig, got {type(cfg).__name__}.")
  names = {f.name for f in dataclasses.fields(TrainConfig)}
  unknown = sorted(set(overrides) - names)
  if unknown:
    raise ValueError(f"Unknown training options {unknown}; TrainConfig fields are {sorted(names)}.")
  return dataclasses.replace(cfg, **overrides)


def _make_optimizer(cfg: TrainConfig, total_steps: int, *, learning_rate: Any = None,
                    weight_decay: Any = None) -> optax.GradientTransformation:
  """Adam (AdamW when ``weight_decay`` is given or ``cfg.weight_decay > 0``) with ``cfg``'s schedule and clip.

  ``optax.adam`` / ``optax.adamw``'s steps (after the clip) as an ``optax.named_chain``: the state is a dict
  keyed ``clip``, ``adam``, ``weight_decay``, ``learning_rate``, saved under those names. ``learning_rate`` /
  ``weight_decay`` override ``cfg``'s and may be traced (vmapped scans): a traced weight decay always gives
  AdamW, whose ``0 * params`` term changes no finite value, so one program serves Adam and AdamW alike.
  """
  lr: Any = cfg.learning_rate if learning_rate is None else learning_rate
  if cfg.lr_schedule == "cosine":
    lr = optax.cosine_decay_schedule(lr, decay_steps=max(int(total_steps), 1))
  wd = (cfg.weight_decay or None) if weight_decay is None else weight_decay
  steps = [] if cfg.grad_clip_norm is None else [("clip", optax.clip_by_global_norm(cfg.grad_clip_norm))]
  steps.append(("adam", optax.scale_by_adam()))
  if wd is not None:
    steps.append(("weight_decay", optax.add_decayed_weights(wd)))
  steps.append(("learning_rate", optax.scale_by_learning_rate(lr)))
  return optax.named_chain(*steps)


def _legacy_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  """The optimiser of the versions before named checkpoint keys (its state is optax's tuple of states): read
  only, to restore their checkpoints. Its leaves are those of :func:`_make_optimizer`'s state, in order."""
  lr: Any = cfg.learning_rate
  if cfg.lr_schedule == "cosine":
    lr = optax.cosine_decay_schedule(lr, decay_steps=max(int(total_steps), 1))
  opt = optax.adamw(lr, weight_decay=cfg.weight_decay) if cfg.weight_decay else optax.adam(lr)
  return opt if cfg.grad_clip_norm is None else optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)


def _restore_state(ckpt: checkpoint_lib.StageCheckpointer, template: Dict[str, Any], cfg: TrainConfig,
                   total_steps: int, step: Optional[int] = None) -> Tuple[int, Dict[str, Any], Dict[str, Any]]:
  """The latest valid (or exactly ``step``) training state ``{"params", "opt_state", "step"}`` of ``ckpt``, in
  ``template``'s structure: saved under names, or in optax's tuple layout by the versions before them."""
  def target_of(meta: Dict[str, Any]) -> Any:
    if meta.get(checkpoint_lib.STATE_LAYOUT_KEY) == checkpoint_lib.NAMED_LAYOUT:
      return checkpoint_lib.named_state(template)
    return {**template, "opt_state": _legacy_optimizer(cfg, total_steps).init(template["params"])}

  step, saved, meta = ckpt.restore(step=step, target_of=target_of)
  if meta.get(checkpoint_lib.STATE_LAYOUT_KEY) == checkpoint_lib.NAMED_LAYOUT:
    return step, checkpoint_lib.state_from_named(template, saved), meta
  opt_state = jax.tree.unflatten(jax.tree.structure(template["opt_state"]), jax.tree.leaves(saved["opt_state"]))
  return step, {**saved, "opt_state": opt_state}, meta


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def optimizer_step(loss_fn: Callable[..., Tuple[jax.Array, Any]], tx: optax.GradientTransformation,
               params: models.Params, opt_state: Any, batch: Any, key: Optional[jax.Array]
               ) -> Tuple[models.Params, Any, jax.Array, jax.Array]:
  """One optimiser step on ``loss_fn(params, batch, key) -> (loss, aux)``.

  Returns:
    ``(new_params, new_opt_state, loss, finite)``: ``loss`` is the scalar loss at ``params``; ``finite`` a
    scalar bool, whether the loss and every new parameter are finite.
  """
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
  updates, opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  return new_params, opt_state, loss, jnp.isfinite(loss) & _all_finite(new_params)


def _append_log(log_path: Optional[str], record: Dict[str, Any]) -> None:
  if log_path is None:
    return
  path = os.path.abspath(os.fspath(log_path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")


def _fit(stage: str, params: models.Params, loss_fn: Callable[..., Tuple[jax.Array, Any]],
         data: Union[Sequence[np.ndarray], streaming.ImageStream], ckpt_dir: str, cfg: TrainConfig,
         log_path: Optional[str], progress: bool, info: Dict[str, Any],
         mesh: Optional[jax.sharding.Mesh] = None, axis_name: Optional[str] = None,
         tracker: Optional[tracking.Tracker] = None, keys: Sequence[str] = ("image",)
         ) -> Tuple[models.Params, History, Dict[str, Any]]:
  """Runs (or resumes, or skips) one training stage. ``loss_fn(params, batch_tuple, key) -> (loss, aux)``.

  ``data``: arrays, or a fresh stream whose position is checkpointed (:mod:`lsot_jax.feeds`; a step takes its
  batches' ``keys``). With ``mesh``, the state is replicated over ``axis_name`` and each batch split along it.
  """
  feed = feeds.make_feed(stage, data, cfg, keys)
  n, bs = feed.num_examples, feed.batch_size
  place_state: Callable[[Any], Any] = lambda tree: tree
  place_batch: Callable[[Any], Any] = lambda batch: batch
  jit_kwargs: Dict[str, Any] = {}
  if mesh is not None:
    axis = sharding.resolve_axis(mesh, axis_name)
    devices = mesh.shape[axis]
    if bs % devices:
      raise ValueError(f"{stage}: the batch size {bs} (batch_size={cfg.batch_size}, N={n}) must be "
                       f"divisible by the {devices} devices of mesh axis {axis!r} for data-parallel "
                       "training.")
    place_state = lambda tree: sharding.replicate(mesh, tree)
    place_batch = lambda batch: sharding.shard_batch(mesh, batch, axis)
    jit_kwargs["out_shardings"] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  steps_per_epoch = feed.steps_per_epoch
  total_steps = cfg.epochs * steps_per_epoch
  stop_at = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
  data_spec = {"num_examples": n, "batch_size": bs, "seed": int(cfg.seed), "steps_per_epoch": steps_per_epoch}

  tx = _make_optimizer(cfg, total_steps)
  train_key = place_state(jax.random.fold_in(jax.random.key(cfg.seed), 1))
  state = place_state(
      {"params": params, "opt_state": tx.init(params), "step": jnp.asarray(0, jnp.int32)}
  )
  ckpt = checkpoint_lib.StageCheckpointer(ckpt_dir, max_to_keep=cfg.max_to_keep)
  bar = None
  try:
    step, history, acc, saved_stream = 0, [], {"loss_sum": 0.0, "loss_count": 0}, None
    if ckpt.latest_step() is not None:
      step, state, meta = _restore_state(ckpt, state, cfg, total_steps)
      state = place_state(state)
      if meta.get("data") != data_spec:
        raise ValueError(f"{stage}: the checkpoint in {ckpt.directory} was written for data stream "
                         f"{meta.get('data')}, but this run has {data_spec}; use a fresh directory.")
      if int(state["step"]) != step:
        raise ValueError(f"{stage}: checkpoint step {step} holds state step {int(state['step'])}.")
      history, acc, saved_stream = list(meta["history"]), dict(meta["epoch_accumulator"]), meta.get("stream")
      _LOG.info("%s: resuming from step %d of %d (%s).", stage, step, total_steps, ckpt.directory)

    def make_meta(stream_state: Optional[Dict[str, Any]]) -> Dict[str, Any]:
      meta = {"stage": stage, "step": step, "total_steps": total_steps, "data": data_spec,
              "history": history, "epoch_accumulator": acc, "train_config": dataclasses.asdict(cfg),
              checkpoint_lib.STATE_LAYOUT_KEY: checkpoint_lib.NAMED_LAYOUT, **info}
      return meta if stream_state is None else {**meta, "stream": stream_state}

    if step >= stop_at:
      if step >= total_steps and not ckpt.is_complete():
        ckpt.mark_complete(step, make_meta(saved_stream))
      _LOG.info("%s: already trained to step %d; skipping.", stage, step)
      return state["params"], history, make_meta(saved_stream)
    ckpt.clear_complete()
    feed.restore(step, saved_stream)

    def train_step(state, batch, key):
      step_key = jax.random.fold_in(key, state["step"])
      new_params, opt_state, loss, finite = optimizer_step(loss_fn, tx, state["params"], state["opt_state"], batch,
                                                       step_key)
      new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
      return new_state, loss, finite

    step_fn = jax.jit(train_step, donate_argnums=0, **jit_kwargs)
    bar = tqdm.tqdm(total=stop_at, initial=step, desc=stage, unit="step", dynamic_ncols=True,
                    disable=not (progress and sys.stderr.isatty()))
    pending: List[Tuple[int, jax.Array, jax.Array]] = []
    clock, clock_steps = time.perf_counter(), 0

    def flush() -> None:
      fetched = jax.device_get([(loss, finite) for _, loss, finite in pending])
      for (s, _, _), (loss, finite) in zip(pending, fetched):
        if not (bool(finite) and math.isfinite(float(loss))):
          raise TrainingDiverged(stage, s, str(ckpt.directory), ckpt.latest_step())
        acc["loss_sum"] += float(loss)
        acc["loss_count"] += 1
        if tracker is not None:
          tracker.scalars(s + 1, {"loss": float(loss)}, stage)
      if pending:
        elapsed = max(time.perf_counter() - clock, 1e-9)
        bar.set_postfix(loss=f"{float(fetched[-1][0]):.4g}", ex_s=f"{clock_steps * bs / elapsed:.0f}")
        bar.update(len(pending))
      pending.clear()

    while step < stop_at:
      epoch = step // steps_per_epoch
      batch = place_batch(feed.batch(step))
      state, loss, finite = step_fn(state, batch, train_key)
      pending.append((step, loss, finite))
      step += 1
      clock_steps += 1
      epoch_end = step % steps_per_epoch == 0
      save_now = (epoch_end if cfg.checkpoint_every == 0 else step % cfg.checkpoint_every == 0)
      save_now = save_now or step == stop_at
      if len(pending) >= cfg.log_every or epoch_end or save_now:
        flush()
      if epoch_end:
        seconds = time.perf_counter() - clock
        record = {"stage": stage, "epoch": epoch + 1, "step": step,
                  "loss": acc["loss_sum"] / max(acc["loss_count"], 1),
                  "examples_per_sec": clock_steps * bs / max(seconds, 1e-9), "seconds": seconds}
        history.append(record)
        acc = {"loss_sum": 0.0, "loss_count": 0}
        if tracker is not None:
          tracker.scalars(step, {"epoch_loss": record["loss"], "examples_per_sec": record["examples_per_sec"]},
                          stage)
      if save_now:
        save = ckpt.save_final if step == total_steps else ckpt.save
        save(step, checkpoint_lib.named_state(state), make_meta(feed.state()))
      if epoch_end:
        _append_log(log_path, history[-1])
        clock, clock_steps = time.perf_counter(), 0
    return state["params"], history, make_meta(feed.state())
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()


def train_autoencoder(x_train: Union[np.ndarray, streaming.ImageStream], model_cfg: models.AutoencoderConfig,
                      ckpt_dir: str, train_cfg: Optional[TrainConfig] = None, *, code_penalty: float = 0.0,
                      log_path: Optional[str] = None, progress: bool = True,
                      mesh: Optional[jax.sharding.Mesh] = None, axis_name: Optional[str] = None,
                      tracker: Optional[tracking.Tracker] = None,
                      **overrides: Any) -> Tuple[Any, models.Params, History]:
  """Trains (or resumes, or skips) the deterministic autoencoder on reconstruction MSE.

  Args:
    x_train: array of shape [N, *model_cfg.input_shape] (images in [0, 1] or points), or a fresh stream of
      those examples opened with the training's settings (:func:`lsot_jax.feeds.training_stream`); the
      stream's position is checkpointed, and a resume takes a fresh stream of the same settings.
    model_cfg: the architecture.
    ckpt_dir: checkpoint directory of this stage (made absolute).
    train_cfg: hyperparameters; defaults to ``TrainConfig()``.
    code_penalty: weight of the mean squared code norm added to the loss.
    log_path: JSON-lines file that receives one record per epoch; None disables it.
    progress: show a tqdm bar (only when stderr is a terminal).
    mesh: optional device mesh for data-parallel training: the state is replicated over ``axis_name`` and
      every batch split along it (the batch size must divide by the axis size); the returned parameters are
      replicated on the mesh. None trains on the default device. A checkpoint written with or without a
      mesh resumes with or without one.
    axis_name: the mesh axis to split batches over; the mesh's only axis if None.
    tracker: a :class:`lsot_jax.tracking.Tracker` for the ``autoencoder/`` scalars (module docstring), or None.
    **overrides: ``TrainConfig`` fields replacing those of ``train_cfg`` (e.g. ``epochs=3, seed=1``).

  Returns:
    ``(graphdef, params, history)``; ``history`` is a list of per-epoch records (see module docstring).

  Raises:
    TrainingDiverged: on a non-finite loss or parameter.
    ValueError: on bad inputs, or a batch size not divisible by the mesh axis size.
  """
  cfg = _resolve_config(train_cfg, overrides)
  data = feeds.training_data(x_train, model_cfg.input_shape, "x_train")
  graphdef, params = models.init_autoencoder(jax.random.fold_in(jax.random.key(cfg.seed), 0), model_cfg)

  def loss_fn(p, batch, key):
    del key
    return models.autoencoder_loss(graphdef, p, batch[0], code_penalty=code_penalty)

  info = {"model": "autoencoder", "model_config": dataclasses.asdict(model_cfg), "code_penalty": code_penalty}
  params, history, _ = _fit("autoencoder", params, loss_fn, data, ckpt_dir, cfg, log_path, progress, info,
                            mesh, axis_name, tracker)
  return graphdef, params, history


def restore_autoencoder(ckpt_dir: str) -> Tuple[Any, models.Params]:
  """The trained autoencoder of a finished :func:`train_autoencoder` checkpoint, restored without data.

  The architecture, optimiser and step count are read from the checkpoint's completion record, so neither
  the training data nor the config is needed and nothing is trained or written.

  Args:
    ckpt_dir: the checkpoint directory :func:`train_autoencoder` wrote.

  Returns:
    ``(graphdef, params)``, as :func:`train_autoencoder` returns them.

  Raises:
    lsot_jax.checkpoint.CheckpointError: the directory holds no finished autoencoder training, or its final
      state is unreadable.
  """
  if not os.path.isdir(ckpt_dir):
    raise checkpoint_lib.CheckpointError(f"No autoencoder checkpoint in {ckpt_dir}.")
  with checkpoint_lib.StageCheckpointer(ckpt_dir, max_to_keep=1) as ckpt:
    done = ckpt.completion()
    if done is None or done["meta"].get("model") != "autoencoder":
      raise checkpoint_lib.CheckpointError(f"No finished autoencoder training in {ckpt_dir}.")
    meta = done["meta"]
    model_cfg = models.AutoencoderConfig(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_config"].items()})
    cfg = TrainConfig(**meta["train_config"])
    graphdef, params = models.init_autoencoder(jax.random.fold_in(jax.random.key(cfg.seed), 0), model_cfg)
    total_steps = int(meta["total_steps"])
    template = {"params": params, "opt_state": _make_optimizer(cfg, total_steps).init(params),
                "step": jnp.asarray(0, jnp.int32)}
    _, state, _ = _restore_state(ckpt, template, cfg, total_steps, step=int(done["step"]))
  return graphdef, state["params"]


@dataclasses.dataclass(frozen=True)
class StackedAutoencoders:
  """Autoencoders trained side by side by :func:`train_autoencoders_vmapped`.

  Attributes:
    graphdef: the graph definition shared by every setting.
    params: the parameter pytree with a leading settings axis S on every leaf; setting i is
      ``jax.tree.map(lambda a: a[i], params)``. A diverged setting holds its parameters from before its
      first non-finite step.
    epoch_losses: float64 array of shape [S, epochs], the mean training loss of each epoch (the ``loss`` of
      :func:`train_autoencoder`'s history); NaN from the epoch of a setting's first non-finite step on.
    diverged_step: int64 array of shape [S], the first step (0-based) whose loss or updated parameters were
      not finite; -1 for a setting that trained to the end.
  """

  graphdef: Any
  params: models.Params
  epoch_losses: np.ndarray
  diverged_step: np.ndarray

  @property
  def final_loss(self) -> np.ndarray:
    """Float64 array of shape [S], the mean training loss of the last epoch."""
    return self.epoch_losses[:, -1]


def train_autoencoders_vmapped(x_train: np.ndarray, model_cfg: models.AutoencoderConfig,
                               train_cfgs: Sequence[TrainConfig], *,
                               code_penalties: Optional[Sequence[float]] = None,
                               log: Optional[Callable[[int, np.ndarray], None]] = None) -> StackedAutoencoders:
  """Trains one autoencoder per setting, all S settings at once in one vmapped, jitted loop (scans).

  Every setting follows :func:`train_autoencoder` run alone with its ``TrainConfig`` and code penalty, to
  float tolerance: the same init (``fold_in(key(seed), 0)``), the same data order
  (:func:`epoch_permutation` of its seed, batch size clipped to N, ``N // batch_size`` steps per epoch) and
  the same optimizer (Adam, AdamW when ``weight_decay > 0``, constant or cosine schedule). The parameters,
  optimizer states, learning rates, weight decays, code penalties and per-seed batch indices are stacked
  along a settings axis and one ``jax.jit(jax.vmap(...))`` epoch function (a ``lax.scan`` over the steps
  of an epoch, the training data on the device, a per-setting batch gather) is compiled once and called
  once per epoch.

  Nothing is checkpointed (a scan is a re-runnable experiment) and nothing is sharded. A setting whose loss
  or parameters become non-finite does not stop the others: it is marked (``diverged_step``), its
  parameters stay those before that step and its later losses are NaN; the caller decides what to do (the
  pipeline's scan reports it in the setting's row).

  Memory: the S models train at the same time, so parameters, gradients, the two Adam moments and the
  activations of one batch all cost S times those of one run (no bound is enforced here).

  Args:
    x_train: array of shape [N, *model_cfg.input_shape].
    model_cfg: the architecture, shared by every setting.
    train_cfgs: one :class:`TrainConfig` per setting. ``seed``, ``learning_rate`` and ``weight_decay`` may
      differ; ``epochs``, ``batch_size``, ``lr_schedule`` and ``grad_clip_norm`` set shapes or the
      program and must be equal (group the settings by them and call once per group); ``max_steps`` must
      be None; the checkpoint and logging fields are ignored.
    code_penalties: per-setting weight of the mean squared code norm (length S); zeros if None.
    log: called after every epoch as ``log(epoch, losses)`` with the 1-based epoch and float64 array of
      shape [S], the epoch's mean losses.

  Returns:
    A :class:`StackedAutoencoders`.

  Raises:
    ValueError: no settings, settings that differ in a static field, ``max_steps`` set, code penalties of
      the wrong length, or badly shaped data.
  """
  cfgs = list(train_cfgs)
  if not cfgs or not all(isinstance(c, TrainConfig) for c in cfgs):
    raise ValueError("train_cfgs must be a non-empty sequence of TrainConfig.")
  static = [(c.epochs, c.batch_size, c.lr_schedule, c.grad_clip_norm) for c in cfgs]
  if len(set(static)) != 1:
    raise ValueError("All settings of one vmapped training must share epochs, batch_size, lr_schedule and "
                     f"grad_clip_norm (they set shapes or the program); got {sorted(set(static), key=str)}. "
                     "Group the settings by them and call once per group.")
  if any(c.max_steps is not None for c in cfgs):
    raise ValueError("train_autoencoders_vmapped trains every epoch; max_steps must be None.")
  penalties = [0.0] * len(cfgs) if code_penalties is None else [float(p) for p in code_penalties]
  if len(penalties) != len(cfgs):
    raise ValueError(f"code_penalties has {len(penalties)} values for {len(cfgs)} settings.")
  x = feeds.float_array(x_train, model_cfg.input_shape, "x_train")
  n = int(x.shape[0])
  if n == 0:
    raise ValueError("x_train must be non-empty.")
  first = cfgs[0]
  bs = min(first.batch_size, n)
  steps_per_epoch = n // bs
  total_steps = first.epochs * steps_per_epoch
  make_tx = lambda lr, wd: _make_optimizer(first, total_steps, learning_rate=lr, weight_decay=wd)  # pylint: disable=unnecessary-lambda-assignment
  graphdef, _ = models.init_autoencoder(jax.random.key(0), model_cfg)

  def init_one(key, lr, wd):
    params = models.init_autoencoder(key, model_cfg)[1]
    return {"params": params, "opt_state": make_tx(lr, wd).init(params), "step": jnp.asarray(0, jnp.int32),
            "diverged_step": jnp.asarray(-1, jnp.int32)}

  def epoch_one(state, idx, lr, wd, penalty, x_all):
    """One epoch of one setting: ``idx`` int32 [steps_per_epoch, bs] -> (state, losses [steps_per_epoch])."""
    tx = make_tx(lr, wd)

    def loss_fn(p, batch, key):
      del key
      return models.autoencoder_loss(graphdef, p, batch, code_penalty=penalty)

    def step(state, batch_idx):
      params, opt_state, loss, finite = optimizer_step(loss_fn, tx, state["params"], state["opt_state"],
                                                   x_all[batch_idx], None)
      alive = state["diverged_step"] < 0
      keep = alive & finite
      pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)  # pylint: disable=unnecessary-lambda-assignment
      new_state = {"params": pick(params, state["params"]), "opt_state": pick(opt_state, state["opt_state"]),
                   "step": state["step"] + 1,
                   "diverged_step": jnp.where(alive & ~keep, state["step"], state["diverged_step"])}
      return new_state, jnp.where(keep, loss, jnp.nan)

    return jax.lax.scan(step, state, idx)

  lrs = jnp.asarray([c.learning_rate for c in cfgs], jnp.float32)
  wds = jnp.asarray([c.weight_decay for c in cfgs], jnp.float32)
  pens = jnp.asarray(penalties, jnp.float32)
  keys = jnp.stack([jax.random.fold_in(jax.random.key(c.seed), 0) for c in cfgs])
  state = jax.jit(jax.vmap(init_one))(keys, lrs, wds)
  run_epoch = jax.jit(jax.vmap(epoch_one, in_axes=(0, 0, 0, 0, 0, None)), donate_argnums=0)
  x_dev = jnp.asarray(x)
  epoch_losses = np.zeros((len(cfgs), first.epochs), np.float64)
  for epoch in range(first.epochs):
    idx = np.stack([epoch_permutation(c.seed, epoch, n)[:steps_per_epoch * bs].reshape(steps_per_epoch, bs)
                    for c in cfgs]).astype(np.int32)
    state, losses = run_epoch(state, jnp.asarray(idx), lrs, wds, pens, x_dev)
    epoch_losses[:, epoch] = np.asarray(jax.device_get(losses), np.float64).mean(axis=1)
    if log is not None:
      log(epoch + 1, epoch_losses[:, epoch].copy())
  return StackedAutoencoders(graphdef=graphdef, params=state["params"], epoch_losses=epoch_losses,
                             diverged_step=np.asarray(jax.device_get(state["diverged_step"]), np.int64))


def train_vae(x_train: Union[np.ndarray, streaming.ImageStream], model_cfg: models.AutoencoderConfig,
              ckpt_dir: str, train_cfg: Optional[TrainConfig] = None, *, beta: float = 1.0, obs_std: float = 0.1,
              log_path: Optional[str] = None, progress: bool = True,
              mesh: Optional[jax.sharding.Mesh] = None, axis_name: Optional[str] = None,
              tracker: Optional[tracking.Tracker] = None,
              **overrides: Any) -> Tuple[Any, models.Params, History]:
  """Trains (or resumes, or skips) the Gaussian-prior VAE baseline on the negative ELBO.

  Args:
    x_train: array of shape [N, *model_cfg.input_shape], or a fresh stream (as :func:`train_autoencoder`).
    model_cfg: the architecture (shared with the autoencoder).
    ckpt_dir: checkpoint directory of this stage.
    train_cfg: hyperparameters; defaults to ``TrainConfig()``.
    beta: KL weight.
    obs_std: Gaussian observation noise (point data only).
    log_path: JSON-lines file for per-epoch records.
    progress: show a tqdm bar (only when stderr is a terminal).
    mesh: optional device mesh for data-parallel training: the state is replicated over ``axis_name`` and
      every batch split along it (the batch size must divide by the axis size); the returned parameters are
      replicated on the mesh. None trains on the default device. A checkpoint written with or without a
      mesh resumes with or without one.
    axis_name: the mesh axis to split batches over; the mesh's only axis if None.
    tracker: a :class:`lsot_jax.tracking.Tracker` for the ``vae/`` scalars (module docstring), or None.
    **overrides: ``TrainConfig`` fields replacing those of ``train_cfg``.

  Returns:
    ``(graphdef, params, history)``.

  Raises:
    TrainingDiverged: on a non-finite loss or parameter.
    ValueError: on bad inputs, or a batch size not divisible by the mesh axis size.
  """
  cfg = _resolve_config(train_cfg, overrides)
  data = feeds.training_data(x_train, model_cfg.input_shape, "x_train")
  graphdef, params = models.init_vae(jax.random.fold_in(jax.random.key(cfg.seed), 0), model_cfg)

  def loss_fn(p, batch, key):
    return models.vae_loss(graphdef, p, key, batch[0], beta=beta, obs_std=obs_std)

  info = {"model": "vae", "model_config": dataclasses.asdict(model_cfg), "beta": beta, "obs_std": obs_std}
  params, history, _ = _fit("vae", params, loss_fn, data, ckpt_dir, cfg, log_path, progress, info, mesh,
                            axis_name, tracker)
  return graphdef, params, history


def train_classifier(x_train: Union[np.ndarray, streaming.ImageStream], labels_train: Optional[np.ndarray],
                     x_test: Union[np.ndarray, streaming.ImageStream], labels_test: Optional[np.ndarray],
                     model_cfg: models.ClassifierConfig, ckpt_dir: str,
                     train_cfg: Optional[TrainConfig] = None, *, log_path: Optional[str] = None,
                     progress: bool = True, mesh: Optional[jax.sharding.Mesh] = None,
                     axis_name: Optional[str] = None, tracker: Optional[tracking.Tracker] = None,
                     **overrides: Any) -> Tuple[Any, models.Params, float]:
  """Trains (or resumes, or skips) the evaluation classifier and reports its test accuracy.

  Args:
    x_train: array of shape [N, *model_cfg.input_shape], or a fresh stream with labels (as
      :func:`train_autoencoder`; the same parameters as its arrays).
    labels_train: int array of shape [N], values in [0, num_classes); None with a stream.
    x_test: array of shape [M, *model_cfg.input_shape], or a fresh one-epoch stream with labels
      (:func:`lsot_jax.feeds.classification_accuracy`).
    labels_test: int array of shape [M]; None with a stream.
    model_cfg: the architecture.
    ckpt_dir: checkpoint directory of this stage.
    train_cfg: hyperparameters; defaults to ``TrainConfig()``.
    log_path: JSON-lines file for per-epoch records.
    progress: show a tqdm bar (only when stderr is a terminal).
    mesh: optional device mesh for data-parallel training: the state is replicated over ``axis_name`` and
      every batch split along it (the batch size must divide by the axis size); the returned parameters are
      replicated on the mesh. None trains on the default device. A checkpoint written with or without a
      mesh resumes with or without one.
    axis_name: the mesh axis to split batches over; the mesh's only axis if None.
    tracker: a :class:`lsot_jax.tracking.Tracker` receiving the step losses and epoch records as scalars
      under ``"classifier/"`` (module docstring) and ``classifier/test_accuracy`` at the last step; None
      writes nothing. The results do not depend on it.
    **overrides: ``TrainConfig`` fields replacing those of ``train_cfg``.

  Returns:
    ``(graphdef, params, test_accuracy)``.

  Raises:
    TrainingDiverged: on a non-finite loss or parameter.
    ValueError: on bad inputs, or a batch size not divisible by the mesh axis size.
  """
  cfg = _resolve_config(train_cfg, overrides)
  shape, num_classes = model_cfg.input_shape, model_cfg.num_classes
  data = feeds.labelled_data(x_train, labels_train, shape, num_classes, "train")
  test = feeds.labelled_data(x_test, labels_test, shape, num_classes, "test")
  graphdef, params = models.init_classifier(jax.random.fold_in(jax.random.key(cfg.seed), 0), model_cfg)

  def loss_fn(p, batch, key):
    del key
    return models.classifier_loss(graphdef, p, batch[0], batch[1])

  info = {"model": "classifier", "model_config": dataclasses.asdict(model_cfg)}
  params, _, meta = _fit("classifier", params, loss_fn, data, ckpt_dir, cfg, log_path, progress, info,
                         mesh, axis_name, tracker, keys=("image", "label"))
  predict = jax.jit(lambda xb: jnp.argmax(models.classifier_logits(graphdef, params, xb), axis=-1))
  accuracy = feeds.classification_accuracy(predict, test, batch_size=1024)
  if tracker is not None:
    tracker.scalars(int(meta["step"]), {"test_accuracy": accuracy}, "classifier")
  return graphdef, params, accuracy
