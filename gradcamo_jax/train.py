"""Training: pure steps, a data-parallel loop, orbax checkpoints with exact resume.

    state = create_state(config, model_config, input_shape)        # TrainState, host values
    state, metrics = train_step(state, batch, model=..., tx=..., ...)   # pure
    sums = eval_step(state, batch, model=...)                          # pure
    train_and_evaluate(config, workdir, data)                          # the whole run, resumable
    config, variables = load_checkpoint(workdir, "best")               # for scoring

A batch is a dict of arrays with a leading batch axis: ``image`` ``(B, Z, Y, X, C)``
float32 (``(B, Y, X, C)`` for a 2D model), ``label`` ``(B,)`` int32, ``valid`` ``(B,)`` bool
(False rows are padding and count for nothing), plus whatever else the pipeline carries
(``mask``, ``index``). Crops with one plane (2D plates) train a 2D model:
`model_config_for_crops` decides, from the data, before anything is built.

Two strategies run the same per-device program: "jit" (one Mesh over every device of every
process, `jax.jit` of a `jax.shard_map` over its ``"data"`` axis, the state donated) and
"pmap" (the legacy `jax.pmap`). In both, each device differentiates its rows and the
gradients, losses and BatchNorm statistics are reduced over ``"data"``, so BatchNorm sees
the global batch and dropout masks are drawn per device the same way.

Why "jit" maps explicitly instead of letting XLA partition the global step: the CPU
convolutions (`gradcamo_jax.models.conv`) loop over blocks of the batch axis with dynamic
slices, which the partitioner can only serve by all-gathering the whole batch's
activations onto every device (the 8-device step then cost several 1-device steps on one
CPU host; BENCHMARKS.md, 'Measurements behind code choices', train.py). Under `shard_map`
every device loops over its own rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from gradcamo_jax import sharding
from gradcamo_jax.config import DataConfig, ModelConfig, TrainConfig, config_from_dict, config_to_dict
from gradcamo_jax.models.efficientnet import EfficientNet, init

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "log.jsonl"


# ----------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
    """Everything a step changes.

    Attributes:
      step: int32 scalar, optimiser steps taken.
      params: float32 parameters (also under bf16 compute).
      batch_stats: BatchNorm running statistics.
      opt_state: optax state.
      rng: raw uint32 key data ``(2,)``; the step's key is ``fold_in(rng, step)``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    def variables(self) -> dict:
        """``{"params", "batch_stats"}`` for `EfficientNet.apply`."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def training_model_config(config: TrainConfig) -> ModelConfig:
    """``config.model`` with the compute dtype resolved and BatchNorm reducing over ``"data"``
    (both strategies run a per-device program, see the module docstring)."""
    dtype = config.compute_dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return dataclasses.replace(config.model, dtype=dtype, bn_axis_name=sharding.DATA_AXIS)


def _drop_plane_stride(stride):
    """A stride setting of a 3D model for the 2D model of the same crops: an int stays (it
    meant every axis); a per-axis ``(z, y, x)`` tuple loses its z entry, which had no effect
    on one plane anyway (an axis of length 1 stays of length 1 whatever its stride)."""
    if isinstance(stride, int):
        return stride
    stride = tuple(int(v) for v in stride)
    return stride[1:] if len(stride) == 3 else stride


def model_config_for_crops(model: ModelConfig, crop_shape: tuple[int, ...]) -> ModelConfig:
    """The model to train on crops of `crop_shape` ``(Z, Y, X, C)`` (as the pipeline delivers
    them, after ``DataConfig.crop_shape``/``downsample``): `model`, made 2D when the crops
    have one plane.

    Why here (the one place): the data decides. A plate imaged as one plane per site (most of
    the Cell Painting Gallery, JUMP included) has Z = 1 crops. A 3D model would run on them,
    but only the middle plane of each kernel ever meets data (the other taps read z padding,
    dead weights that `models.conv` skips on CPU), and its CAM maps would be ``(1, Y, X)``:
    it is a 2D model in disguise. So ``spatial_dims=3`` (the default) means "3D where the
    crops have depth" and
    becomes ``spatial_dims=2`` on one-plane crops, with per-axis strides losing their z entry
    (`_drop_plane_stride`). `train_and_evaluate` saves the resolved config in
    ``config.json`` and in every checkpoint, so scoring and the report rebuild the same 2D
    model; the pipeline drops the plane axis (`pipeline.to_model_axes`).

    Raises:
      ValueError: ``spatial_dims=2`` asked for crops with more than one plane (the message
        names the two fixes: a 3D model, or ``data.crop_shape=(1, Y, X)``).
    """
    from gradcamo_jax.data.pipeline import model_input_shape

    z = int(crop_shape[0])
    if model.spatial_dims == 2:
        model_input_shape(tuple(crop_shape), 2)  # raises for Z > 1, naming the fixes
        return model
    if z != 1:
        return model
    strides = None if model.stage_strides is None else tuple(_drop_plane_stride(s) for s in model.stage_strides)
    return dataclasses.replace(model, spatial_dims=2, stem_stride=_drop_plane_stride(model.stem_stride),
                               stage_strides=strides)


def config_for_data(config: TrainConfig, crop_shape: tuple[int, ...]) -> TrainConfig:
    """`config` with its model resolved for crops of `crop_shape` ``(Z, Y, X, C)``
    (`model_config_for_crops`); the same object when nothing changes (every 3D plate)."""
    model = model_config_for_crops(config.model, crop_shape)
    return config if model == config.model else dataclasses.replace(config, model=model)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then cosine decay to ``end_lr_fraction`` of it."""
    warmup = min(config.warmup_steps, config.num_steps - 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, config.num_steps, end_value=config.learning_rate * config.end_lr_fraction
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW on the schedule, after global-norm clipping; no decay on biases/BatchNorm (ndim ≤ 1)."""
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=config.b1,
        b2=config.b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params),
    )
    if config.grad_clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)


def create_state(config: TrainConfig, model_config: ModelConfig, input_shape: tuple[int, ...]) -> TrainState:
    """Initial state (host NumPy values, identical on every process) for crops ``(Z, Y, X, C)``."""
    return jax.tree.map(np.asarray, jax.device_get(_initial_state(config, model_config, input_shape)))


def _initial_state(config: TrainConfig, model_config: ModelConfig, input_shape: tuple[int, ...]) -> TrainState:
    key = jax.random.key(config.seed)
    init_key, step_key = jax.random.split(key)
    variables = init(model_config, init_key, tuple(input_shape))
    tx = make_optimizer(config)
    return TrainState(
        step=jnp.int32(0),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        rng=jax.random.key_data(step_key),
    )


def class_weight_vector(config: TrainConfig, train_counts: np.ndarray) -> np.ndarray:
    """``(K,)`` float32 loss weight per class: ones, ``n / (K * n_k)`` normalised to mean 1
    over the classes present ("balanced"), or the given tuple."""
    k = config.model.num_classes
    if config.class_weights == "none":
        return np.ones(k, np.float32)
    if config.class_weights == "balanced":
        counts = np.asarray(train_counts, np.float64)[:k]
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / k, 0.0)
        return (w / w[counts > 0].mean()).astype(np.float32)
    return np.asarray(config.class_weights, np.float32)


# ----------------------------------------------------------------------------- steps


def _psum(x, axis_name: str | None):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: EfficientNet,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    class_weights: jax.Array,
    label_smoothing: float = 0.0,
    axis_name: str | None = None,
    gradcamo_weight: float = 0.0,
    gradcamo_layer: str = "stage2",
    gradcamo_method: str = "gradcam",
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step on the weighted, label-smoothed cross-entropy of `batch`.

    The loss is ``Σ_i w_i ce_i / Σ_i w_i`` over the *global* batch (w = class weight ×
    valid). Under `jax.pmap` (`axis_name` set) each device differentiates its share
    ``Σ_local w ce / Σ_global w`` and the gradients are summed, which is the gradient
    of the same global loss. Metrics are global: loss, accuracy, grad_norm, lr.

    With ``gradcamo_weight`` λ > 0 the loss adds ``λ · Σ_i v_i (1 - g_i) / Σ_i v_i``
    (v = valid, g = `cam.soft_gradcamo` of the true class, see `TrainConfig`), and the
    metrics add ``gradcamo`` (the batch mean of g) and ``ce`` (the cross-entropy alone).
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    labels = batch["label"]
    valid = batch["valid"].astype(jnp.float32)
    weights = class_weights[labels] * valid
    weight_sum = _psum(jnp.sum(weights), axis_name)
    count = _psum(jnp.sum(valid), axis_name)  # valid cells of the global batch
    num_classes = class_weights.shape[0]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": rng},
        )
        ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
        ce = jnp.sum(ce * weights) / jnp.maximum(weight_sum, 1e-12)
        extra = {}
        loss = ce
        if gradcamo_weight > 0:
            from gradcamo_jax.cam import soft_gradcamo

            g = soft_gradcamo(model, {"params": params, "batch_stats": state.batch_stats}, batch["image"],
                              batch["mask"], labels, layer=gradcamo_layer, method=gradcamo_method)
            n = jnp.maximum(count, 1.0)
            loss = ce + gradcamo_weight * jnp.sum((1.0 - g) * valid) / n
            extra = {"ce": ce, "gradcamo": jnp.sum(g * valid) / n}
        return loss, (logits, updates["batch_stats"], extra)

    (loss, (logits, batch_stats, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    extra = _psum(extra, axis_name)
    grads = _psum(grads, axis_name)
    loss = _psum(loss, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct = _psum(jnp.sum((jnp.argmax(logits, -1) == labels) * valid), axis_name)
    metrics = {
        "loss": loss,
        "accuracy": correct / jnp.maximum(count, 1.0),
        "grad_norm": optax.global_norm(grads),
        "lr": schedule(state.step),
        **extra,
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics


def eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: EfficientNet,
    num_classes: int,
    axis_name: str | None = None,
) -> dict[str, jax.Array]:
    """Sums over the valid rows of `batch` (BatchNorm in inference mode): ``loss`` (unweighted
    cross-entropy), ``correct``, ``count``, and ``(K,)`` ``class_correct``/``class_count``."""
    logits = model.apply(state.variables(), batch["image"], train=False).astype(jnp.float32)
    labels = batch["label"]
    valid = batch["valid"].astype(jnp.float32)
    onehot = jax.nn.one_hot(labels, num_classes) * valid[:, None]
    correct = (jnp.argmax(logits, -1) == labels) * valid
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    sums = {
        "loss": jnp.sum(ce * valid),
        "correct": jnp.sum(correct),
        "count": jnp.sum(valid),
        "class_correct": jnp.sum(onehot * correct[:, None], axis=0),
        "class_count": jnp.sum(onehot, axis=0),
    }
    return _psum(sums, axis_name)


def summarize_eval(sums: dict[str, np.ndarray]) -> dict[str, Any]:
    """Accumulated `eval_step` sums → loss, accuracy, per-class accuracy (None for absent
    classes), balanced accuracy (mean over present classes) and the cell count."""
    count = float(sums["count"])
    present = sums["class_count"] > 0
    per_class = np.where(present, sums["class_correct"] / np.maximum(sums["class_count"], 1), np.nan)
    return {
        "loss": float(sums["loss"]) / max(count, 1.0),
        "accuracy": float(sums["correct"]) / max(count, 1.0),
        "balanced_accuracy": float(np.nanmean(per_class)) if present.any() else float("nan"),
        "per_class_accuracy": [None if np.isnan(a) else float(a) for a in per_class],
        "count": int(count),
    }


# ----------------------------------------------------------------------------- strategies


@dataclasses.dataclass
class Runner:
    """A strategy's compiled steps and the moves of state and batches onto its devices.

    `put_state`/`get_state` convert between host NumPy `TrainState`s and the strategy's
    device layout; `to_mesh` gives the state as arrays replicated on the mesh (what the
    checkpoint stores, whatever the strategy); `put_batch` takes this process's rows
    ``(B/P, ...)``; `step` returns global metrics as device values, `host_metrics` turns
    them into NumPy scalars; `eval_sums` returns `eval_step` sums as NumPy.
    """

    put_state: Callable[[TrainState], Any]
    get_state: Callable[[Any], TrainState]
    to_mesh: Callable[[Any], Any]
    put_batch: Callable[[dict[str, np.ndarray]], Any]
    step: Callable[[Any, Any], tuple[Any, dict]]
    eval_sums: Callable[[Any, Any], dict]
    host_metrics: Callable[[dict], dict]


def make_runner(config: TrainConfig, mesh: jax.sharding.Mesh, class_weights: np.ndarray) -> Runner:
    """Compiled train/eval steps for ``config.strategy`` on `mesh`."""
    model_config = training_model_config(config)
    model = EfficientNet(model_config)
    tx = make_optimizer(config)
    kwargs = dict(
        model=model,
        tx=tx,
        schedule=learning_rate_schedule(config),
        class_weights=jnp.asarray(class_weights),
        label_smoothing=config.label_smoothing,
        gradcamo_weight=config.gradcamo_weight,
        gradcamo_layer=config.gradcamo_layer,
        gradcamo_method=config.gradcamo_method,
    )
    if config.gradcamo_weight > 0:
        from gradcamo_jax.cam import get_method

        get_method(config.gradcamo_method)  # unknown names fail here, before compiling
    k = config.model.num_classes
    axis = sharding.DATA_AXIS
    if config.strategy == "jit":
        repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        specs = dict(mesh=mesh, in_specs=(P(), P(axis)), check_vma=False)
        # Every output is psum'd over "data" inside the step, hence replicated (out_specs P()).
        step = jax.jit(
            jax.shard_map(functools.partial(train_step, axis_name=axis, **kwargs), out_specs=(P(), P()), **specs),
            in_shardings=(repl, data),
            out_shardings=(repl, repl),
            donate_argnums=0,
        )
        ev = jax.jit(
            jax.shard_map(functools.partial(eval_step, model=model, num_classes=k, axis_name=axis), out_specs=P(), **specs),
            in_shardings=(repl, data),
            out_shardings=repl,
        )
        return Runner(
            put_state=lambda s: sharding.replicate(s, mesh),
            get_state=sharding.to_host,
            to_mesh=lambda s: s,
            put_batch=lambda b: sharding.to_global(b, mesh),
            step=step,
            eval_sums=lambda s, b: sharding.to_host(ev(s, b)),
            host_metrics=sharding.to_host,
        )
    step = jax.pmap(functools.partial(train_step, axis_name=axis, **kwargs), axis_name=axis, donate_argnums=0)
    ev = jax.pmap(functools.partial(eval_step, model=model, num_classes=k, axis_name=axis), axis_name=axis)
    return Runner(
        put_state=sharding.pmap_replicate,
        get_state=lambda s: sharding.pmap_unreplicate(s),
        to_mesh=lambda s: sharding.replicate(sharding.pmap_unreplicate(s), mesh),
        put_batch=sharding.pmap_split,
        step=step,
        eval_sums=lambda s, b: sharding.pmap_unreplicate(ev(s, b)),
        host_metrics=sharding.pmap_unreplicate,
    )


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str | os.PathLike, config: TrainConfig | None = None, read_only: bool = False):
    """Orbax manager over ``workdir/checkpoints``: items ``state`` (the `TrainState`),
    ``data`` (the grain iterator state), ``meta`` (config, input shape, metrics).

    Keeps the latest ``keep_checkpoints`` plus, with ``keep_best``, the best by validation
    accuracy. Orbax writes each step to a temporary folder and renames it when complete,
    so a killed save leaves the previous checkpoints intact (and is cleaned up at start).
    """
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as cm

    config = config or TrainConfig()
    policies = [cm.LatestN(config.keep_checkpoints)]
    if config.keep_best:
        policies.append(cm.BestN(get_metric_fn=lambda m: m["val_accuracy"], n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=config.async_checkpointing,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options, item_names=("state", "data", "meta"))


def _abstract(tree, sharding_: jax.sharding.Sharding):
    def leaf(x):
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding_)

    return jax.tree.map(leaf, tree)


def best_step(manager) -> int | None:
    """The kept step with the highest validation accuracy (None if none has one)."""
    import orbax.checkpoint as ocp

    scored = []
    for s in manager.all_steps():
        meta = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("val") is not None:
            scored.append((meta["val"]["accuracy"], s))
    return max(scored)[1] if scored else None


def load_checkpoint(workdir: str | os.PathLike, step: int | str = "best") -> tuple[TrainConfig, dict]:
    """``(config, variables)`` of a run in `workdir`, for scoring.

    `step`: "best" (highest validation accuracy; the latest if none was evaluated),
    "latest" or a step number. `variables` is ``{"params", "batch_stats"}`` as NumPy
    float32, ready for ``EfficientNet(config.model).apply(variables, images)`` (the
    model config is the one trained, with its compute dtype; replace ``dtype`` to taste).
    """
    import orbax.checkpoint as ocp

    manager = checkpoint_manager(workdir, read_only=True)
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"{Path(workdir) / CHECKPOINT_DIR}: no checkpoints")
    if step == "best":
        step = best_step(manager) or manager.latest_step()
    elif step == "latest":
        step = manager.latest_step()
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    config = config_from_dict(TrainConfig, meta["config"])
    template = jax.eval_shape(lambda: _initial_state(config, training_model_config(config), tuple(meta["input_shape"])))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(template, device))))
    state = jax.tree.map(np.asarray, restored["state"])
    manager.close()
    return config, {"params": state.params, "batch_stats": state.batch_stats}


# ----------------------------------------------------------------------------- the loop


class _JsonlLog:
    """Append-only JSONL log on process 0; on resume, lines past the restored step are dropped
    (the resumed run writes them again, identically)."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def evaluate(runner: Runner, state, source, data_config: DataConfig, num_classes: int,
             spatial_dims: int = 3) -> dict[str, Any]:
    """`summarize_eval` over one pass of `source` (this process reads its rows of each batch),
    crops in the axes of a model with `spatial_dims`."""
    from gradcamo_jax.data import pipeline

    ds = pipeline.eval_dataset(source, data_config, jax.process_index(), jax.process_count(),
                               spatial_dims=spatial_dims)
    total = None
    for batch in pipeline.make_iterator(ds, dataclasses.replace(data_config, worker_count=0)):
        sums = runner.eval_sums(state, runner.put_batch(batch))
        total = sums if total is None else jax.tree.map(np.add, total, sums)
    return summarize_eval(total)


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | os.PathLike,
    data,
    hooks: Sequence[Callable[[int], None]] = (),
) -> dict[str, Any]:
    """Train ``config`` on `data`, checkpointing to `workdir`; resume from its latest checkpoint.

    Args:
      config: the run (see `TrainConfig`). Its model is resolved for the data first
        (`config_for_data`: one-plane crops train a 2D model); the resolved config is the
        one saved in ``config.json`` and the checkpoints.
      workdir: ``checkpoints/`` (orbax), ``log.jsonl`` and ``config.json`` go here.
      data: a cell dataset folder (``cells.parquet`` + ``crops.zarr``) or a
        `gradcamo_jax.data.pipeline.CellDataset` (e.g. from `dataset_from_arrays`).
      hooks: called as ``hook(step)`` after every step (progress reporting, tests).

    Returns:
      ``{"step", "val": summarize_eval(...) | None, "state": TrainState (NumPy),
      "steps_per_second", "cells_per_second", "config"}`` — rates over the steps this call
      ran, after the first (compilation); ``config`` is the resolved `TrainConfig`.
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    from gradcamo_jax.data import pipeline

    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    dataset = data if isinstance(data, pipeline.CellDataset) else pipeline.open_dataset(str(data), config.data)
    resolved = config_for_data(config, dataset.input_shape)
    if resolved.model.spatial_dims != config.model.spatial_dims:
        log.info("crops %s have one plane: training a 2D model (model.spatial_dims=2)", dataset.input_shape)
    config = resolved
    # What the model takes: (Z, Y, X, C), or (Y, X, C) for a 2D model; also what load_checkpoint inits.
    input_shape = pipeline.model_input_shape(dataset.input_shape, config.model.spatial_dims)
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))
    if dataset.num_classes > config.model.num_classes:
        raise ValueError(
            f"the data has {dataset.num_classes} classes but model.num_classes={config.model.num_classes}; "
            f"set model.num_classes={dataset.num_classes}"
        )
    mesh = sharding.make_mesh()
    runner = make_runner(config, mesh, class_weight_vector(config, dataset.class_counts("train")))
    host_state = create_state(config, training_model_config(config), input_shape)

    manager = checkpoint_manager(workdir, config)
    it = pipeline.make_iterator(
        pipeline.train_dataset(
            dataset.sources["train"], config.data, config.seed, jax.process_index(), jax.process_count(),
            spatial_dims=config.model.spatial_dims,
        ),
        config.data,
    )
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        restored = manager.restore(
            start,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(host_state, sharding.replicated(mesh))),
                data=ocp.args.JsonRestore(),
            ),
        )
        it.set_state(restored["data"]["iterator"])
        host_state = sharding.to_host(restored["state"])
        log.info("resumed from step %d", start)
    state = runner.put_state(host_state)
    logfile = _JsonlLog(workdir / LOG_FILE, start, is_main)

    def save(step: int, val: dict | None) -> None:
        meta = {"config": config_to_dict(config), "input_shape": list(input_shape), "val": val}
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(runner.to_mesh(state)),
                data=ocp.args.JsonSave({"iterator": it.get_state(), "process_count": jax.process_count()}),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics=None if val is None else {"val_accuracy": val["accuracy"]},
        )

    val = None
    pending: list[dict] = []
    bar = tqdm(total=config.num_steps, initial=start, disable=not (is_main and config.progress_bar), desc="train")
    # Rates exclude the first step (compilation) and evaluation/checkpoint pauses.
    timer_start, timed_steps, overhead = None, 0, 0.0
    for step in range(start, config.num_steps):
        batch = next(it)
        state, metrics = runner.step(state, runner.put_batch(batch))
        pending.append(metrics)
        if timer_start is None:
            jax.block_until_ready(metrics)
            timer_start = time.perf_counter()
        else:
            timed_steps += 1
        done = step + 1
        if done % config.log_every == 0 or done == config.num_steps:
            host = [runner.host_metrics(m) for m in pending]
            means = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
            pending = []
            logfile.write({"step": done, "split": "train", **means, "time": time.time()})
            bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['accuracy']:.3f}")
        if done % config.checkpoint_every == 0 or done == config.num_steps:
            jax.block_until_ready(state)
            pause = time.perf_counter()
            val = None
            if len(dataset.sources["val"]):
                val = evaluate(runner, state, dataset.sources["val"], config.data, config.model.num_classes,
                               config.model.spatial_dims)
                logfile.write({"step": done, "split": "val", **val, "time": time.time()})
            save(done, val)
            overhead += time.perf_counter() - pause
        bar.update(1)
        for hook in hooks:
            hook(done)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - timer_start - overhead if timer_start is not None else 0.0
    bar.close()
    manager.wait_until_finished()
    manager.close()
    rate = timed_steps / elapsed if elapsed > 0 and timed_steps else float("nan")
    return {
        "step": config.num_steps,
        "val": val,
        "state": runner.get_state(state),
        "steps_per_second": rate,
        "cells_per_second": rate * config.data.batch_size,
        "config": config,
    }
