"""Typed, frozen configuration objects.

Every field is documented where it is declared. Configs are hashable so that
jitted functions can be cached on them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

Stride = int | tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One EfficientNet stage (a run of MBConv blocks sharing a setting) at width/depth 1.0.

    Attributes:
      expand_ratio: channel expansion of the inverted bottleneck (1 or 6 in EfficientNet).
      kernel: depthwise kernel size, the same on every spatial axis (odd).
      stride: stride of the first block of the stage; an int (all axes) or one per spatial axis.
      out_channels: output channels before width scaling.
      repeats: number of blocks before depth scaling.
    """

    expand_ratio: int
    kernel: int
    stride: Stride
    out_channels: int
    repeats: int


# Tan & Le 2019, Table 1 (B0 baseline).
EFFICIENTNET_B0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 16, 1),
    StageSpec(6, 3, 2, 24, 2),
    StageSpec(6, 5, 2, 40, 2),
    StageSpec(6, 3, 2, 80, 3),
    StageSpec(6, 5, 1, 112, 3),
    StageSpec(6, 5, 2, 192, 4),
    StageSpec(6, 3, 1, 320, 1),
)

# (width multiplier, depth multiplier, head dropout) per variant; the resolution
# coefficient is not used because crops have whatever size the data has.
VARIANTS: dict[str, tuple[float, float, float]] = {
    "b0": (1.0, 1.0, 0.2),
    "b1": (1.0, 1.1, 0.2),
    "b2": (1.1, 1.2, 0.3),
    "b3": (1.2, 1.4, 0.3),
    "b4": (1.4, 1.8, 0.4),
    "b5": (1.6, 2.2, 0.4),
    "b6": (1.8, 2.6, 0.5),
    "b7": (2.0, 3.1, 0.5),
    # A few-thousand-parameter model with every stage present, for tests.
    "tiny": (0.25, 0.25, 0.0),
}

STAGE_NAMES: tuple[str, ...] = ("stem",) + tuple(f"stage{i}" for i in range(1, 8)) + ("top",)
"""Names of the activations `EfficientNet.features` returns, input side first."""


def round_filters(channels: int, width_mult: float, divisor: int = 8) -> int:
    """Channel count scaled by `width_mult`, rounded to a multiple of `divisor` (never down by >10%)."""
    scaled = channels * width_mult
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth_mult: float) -> int:
    """Block count scaled by `depth_mult`, rounded up."""
    return int(math.ceil(depth_mult * repeats))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """EfficientNet B0–B7 (2D or 3D) with per-axis strides.

    Attributes:
      variant: "b0" … "b7" (compound scaling of Tan & Le 2019) or "tiny" (tests).
      num_classes: number of logits (e.g. control + 5 doses = 6).
      spatial_dims: 3 for crops (B, Z, Y, X, C); 2 for (B, Y, X, C). Training turns 3 into 2
        when the crops have one plane (2D plates; `gradcamo_jax.train.model_config_for_crops`)
        and saves the model it trained, so scoring rebuilds the same one.
      stem_stride: stride of the 3×3(×3) stem; int or one per spatial axis (Z first).
      stage_strides: stride of the first block of each of the 7 stages; None takes
        the EfficientNet table (1, 2, 2, 2, 1, 2, 1). Each entry is an int or a
        per-axis tuple, e.g. ``(1, 2, 2)`` to stop striding z.
      min_size: an axis is not strided when that would leave it shorter than this,
        so 21 z-slices are never divided by 32 (21 → 11 → 6 → 3 → 2 → 2 …).
      width_mult, depth_mult, dropout_rate: override the variant's values when set.
      head_channels: channels of the final 1×1 conv ("top"); None = round_filters(1280).
      se_ratio: squeeze-excite bottleneck as a fraction of a block's input channels.
      drop_path_rate: stochastic-depth rate of the last block (linear in block index).
      bn_momentum, bn_epsilon: BatchNorm running-average momentum and epsilon (TF/Keras values).
      bn_axis_name: mapped axis over which BatchNorm averages batch statistics under
        `pmap`/`shard_map` (None for a plain `jit` of the global batch; training sets
        "data", see `gradcamo_jax.train`).
      dtype: compute dtype ("float32", "bfloat16" for GPU/TPU, or "float64" for
        reference computations under ``jax_enable_x64``); parameters are created float32.
      conv_impl: "auto" (engineered convolutions on CPU, XLA's native ones elsewhere),
        "xla" or "shifted"; see `gradcamo_jax.models.conv`.
    """

    variant: str = "b0"
    num_classes: int = 6
    spatial_dims: int = 3
    stem_stride: Stride = 2
    stage_strides: tuple[Stride, ...] | None = None
    min_size: int = 2
    width_mult: float | None = None
    depth_mult: float | None = None
    dropout_rate: float | None = None
    head_channels: int | None = None
    se_ratio: float = 0.25
    drop_path_rate: float = 0.2
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    bn_axis_name: str | None = None
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    conv_impl: Literal["auto", "xla", "shifted"] = "auto"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"ModelConfig.variant={self.variant!r}; expected one of {sorted(VARIANTS)}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"ModelConfig.spatial_dims={self.spatial_dims}; expected 2 or 3")
        if self.num_classes < 1:
            raise ValueError(f"ModelConfig.num_classes={self.num_classes}; expected >= 1")
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise ValueError(f"ModelConfig.dtype={self.dtype!r}; expected 'float32', 'bfloat16' or 'float64'")
        if self.stage_strides is not None and len(self.stage_strides) != len(EFFICIENTNET_B0_STAGES):
            raise ValueError(
                f"ModelConfig.stage_strides has {len(self.stage_strides)} entries; expected "
                f"{len(EFFICIENTNET_B0_STAGES)} (one per stage)"
            )
        for s in (self.stem_stride, *(self.stage_strides or ())):
            self.axis_strides(s)  # validates length

    def axis_strides(self, stride: Stride) -> tuple[int, ...]:
        """A stride setting as one int per spatial axis."""
        if isinstance(stride, int):
            return (stride,) * self.spatial_dims
        stride = tuple(int(s) for s in stride)
        if len(stride) != self.spatial_dims:
            raise ValueError(
                f"stride {stride} has {len(stride)} axes; the model has spatial_dims={self.spatial_dims}"
            )
        return stride

    @property
    def width(self) -> float:
        return VARIANTS[self.variant][0] if self.width_mult is None else self.width_mult

    @property
    def depth(self) -> float:
        return VARIANTS[self.variant][1] if self.depth_mult is None else self.depth_mult

    @property
    def head_dropout(self) -> float:
        return VARIANTS[self.variant][2] if self.dropout_rate is None else self.dropout_rate

    @property
    def stem_channels(self) -> int:
        return round_filters(32, self.width)

    @property
    def top_channels(self) -> int:
        if self.head_channels is not None:
            return self.head_channels
        if self.variant == "tiny":
            return 64
        return round_filters(1280, self.width)

    def stages(self) -> tuple[StageSpec, ...]:
        """The 7 stages after width/depth scaling and stride overrides."""
        out = []
        for i, spec in enumerate(EFFICIENTNET_B0_STAGES):
            stride = spec.stride if self.stage_strides is None else self.stage_strides[i]
            out.append(
                StageSpec(
                    expand_ratio=spec.expand_ratio,
                    kernel=spec.kernel,
                    stride=self.axis_strides(stride),
                    out_channels=round_filters(spec.out_channels, self.width),
                    repeats=round_repeats(spec.repeats, self.depth),
                )
            )
        return tuple(out)


def effective_strides(spatial: tuple[int, ...], strides: tuple[int, ...], min_size: int) -> tuple[int, ...]:
    """Per-axis strides after the `min_size` rule: stride s on an axis of length n
    is kept only if ceil(n / s) >= min_size (padding is k//2, so output = ceil(n / s))."""
    return tuple(
        s if s > 1 and -(-n // s) >= min_size else 1 for n, s in zip(spatial, strides, strict=True)
    )


# ----------------------------------------------------------------------------- training

import ast  # noqa: E402  (kept with the training configs they serve)
import types  # noqa: E402
import typing  # noqa: E402


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the grain pipeline reads and how it augments (see `gradcamo_jax.data.pipeline`).

    Attributes:
      batch_size: global training batch (all processes together); must divide by the
        number of processes, and by the number of devices for the pmap strategy.
      eval_batch_size: global evaluation batch; the last batch is padded (and masked).
      split_fractions: None (default) takes the split the crop step stored in ``cells.parquet``
        (``Metadata_Split``, set by ``tools/crop.py --split``; checked: a well in two splits is
        an error), or (0.6, 0.2, 0.2) of each class's wells for a table without one. A
        ``(train, val, test)`` tuple splits the cells anew by well (`gradcamo_jax.data.splits`),
        overriding a stored split. The test split is never read by training.
      split_seed: seed of that new split (unused when the stored split is taken).
      crop_shape: ``(Z, Y, X)`` centre crop applied to every stored crop; None keeps the stored size.
      downsample: ``(Z, Y, X)`` integer mean-pooling factors after the crop (the mask takes the
        value at each bin's centre), to train small models on big crops.
      flip_xy: random flips of Y and X (independently, p = 0.5 each).
      rot90_xy: random multiples of 90° in the XY plane (only 0°/180° when Y != X).
      intensity_scale: per-channel multiplicative jitter, ``x * (1 + U(-s, s))``.
      intensity_shift: per-channel additive jitter, ``x + U(-t, t)`` (crops are percentile
        normalised to about [0, 1], so t is in those units).
      worker_count: grain worker processes (0 = load in the training process's threads).
      read_threads: threads per process (or per worker) reading elements.
      prefetch: batches buffered ahead of the training step (at least `read_threads`,
        since each thread works on one batch).
      context_remedy: what the model may see of a cell's context (background, mask code 0, and
        other cells, code 2), a remedy against context shortcuts (`gradcamo_jax.data.pipeline`,
        experiments/README.md "Remedies study"):

        * "none": the crop as it is (default);
        * "randomize": during training only, with probability `randomize_prob` per crop, the
          context is replaced by one of the audit's fills (`gradcamo_jax.audit.fill_region`,
          region "context"): noise matched to the crop's own context per channel, or the
          context voxels of a control cell's crop (`randomize_fill`); inference is unchanged;
        * "mask": the crop multiplied by the central-cell mask (context set to 0, as
          DeepProfiler's ``mask_objects``), in training, validation *and* inference;
        * "attenuate": context multiplied by `context_factor`, in training and inference.

        "mask" and "attenuate" are input transforms the model needs at inference: they travel
        with the run's config (checkpoint meta) and `gradcamo_jax.scoring.score_dataset`
        applies them when given the run's ``data_config``.
      context_factor: the "attenuate" factor in (0, 1).
      randomize_prob: probability that a training crop's context is randomised.
      randomize_fill: "noise", "swap" (a control cell's context) or "both" (each randomised
        crop picks one of the two with probability 1/2).
      control_class: class index of control cells, the donors of the "swap" fill.
    """

    batch_size: int = 32
    eval_batch_size: int = 64
    split_fractions: tuple[float, float, float] | None = None
    split_seed: int = 0
    crop_shape: tuple[int, int, int] | None = None
    downsample: tuple[int, int, int] = (1, 1, 1)
    flip_xy: bool = True
    rot90_xy: bool = True
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05
    worker_count: int = 0
    read_threads: int = 2
    prefetch: int = 4
    context_remedy: Literal["none", "randomize", "mask", "attenuate"] = "none"
    context_factor: float = 0.25
    randomize_prob: float = 0.5
    randomize_fill: Literal["noise", "swap", "both"] = "both"
    control_class: int = 0

    def __post_init__(self):
        if self.context_remedy not in ("none", "randomize", "mask", "attenuate"):
            raise ValueError(f"DataConfig.context_remedy={self.context_remedy!r}; expected "
                             "'none', 'randomize', 'mask' or 'attenuate'")
        if not 0 < self.context_factor < 1:
            raise ValueError(f"DataConfig.context_factor={self.context_factor}; expected in (0, 1)")
        if not 0 <= self.randomize_prob <= 1:
            raise ValueError(f"DataConfig.randomize_prob={self.randomize_prob}; expected in [0, 1]")
        if self.randomize_fill not in ("noise", "swap", "both"):
            raise ValueError(f"DataConfig.randomize_fill={self.randomize_fill!r}; expected 'noise', 'swap' or 'both'")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"DataConfig batch sizes must be >= 1 (got {self.batch_size}, {self.eval_batch_size})")
        if self.split_fractions is not None:
            from gradcamo_jax.data.splits import check_fractions

            check_fractions(self.split_fractions, "DataConfig.split_fractions")
        if len(self.downsample) != 3 or min(self.downsample) < 1:
            raise ValueError(f"DataConfig.downsample={self.downsample}; expected 3 integers >= 1 (Z, Y, X)")
        if self.crop_shape is not None and (len(self.crop_shape) != 3 or min(self.crop_shape) < 1):
            raise ValueError(f"DataConfig.crop_shape={self.crop_shape}; expected None or 3 integers >= 1 (Z, Y, X)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: model, data, optimiser, parallelism and checkpoints.

    Attributes:
      model: the network; ``model.num_classes`` must equal the number of classes in the data.
      data: the input pipeline.
      seed: initialisation, shuffling, augmentation and dropout all derive from it.
      num_steps: optimiser steps (global batches) in the run.
      learning_rate: peak learning rate of AdamW (reached after `warmup_steps`).
      warmup_steps: linear warm-up from 0; then cosine decay to ``end_lr_fraction * learning_rate``.
      end_lr_fraction: final learning rate as a fraction of the peak.
      weight_decay: AdamW decoupled weight decay (not applied to biases, BatchNorm or 1-D params).
      b1, b2: Adam moment decay rates.
      adam_eps: Adam's epsilon. Adam turns any nonzero gradient into a step of about the
        learning rate, including rounding noise on parameters whose exact gradient is 0
        (a BatchNorm bias feeding only a conv + BatchNorm); raise it to damp those.
      grad_clip_norm: clip the global gradient norm to this value; None disables clipping.
      label_smoothing: mass spread uniformly over the classes in the cross-entropy target.
      class_weights: "none", "balanced" (inverse class frequency in the training wells,
        normalised to mean 1) or one weight per class; the loss is the weighted mean.
      compute_dtype: "auto" (bfloat16 on GPU/TPU, float32 on CPU), "float32" or "bfloat16";
        overrides ``model.dtype`` for training. Parameters and optimiser state stay float32.
      strategy: "jit" (one Mesh, batch sharded on "data", parameters replicated, the step
        `shard_map`'d over "data") or "pmap" (the legacy `jax.pmap` of the same step); both
        reduce gradients and BatchNorm statistics over the global batch.
      log_every: steps between JSONL log lines / progress-bar updates (also syncs the host).
      checkpoint_every: steps between checkpoints; every checkpoint is preceded by an
        evaluation on the validation wells, whose accuracy ranks the checkpoints.
      keep_checkpoints: the latest K checkpoints are kept ...
      keep_best: ... plus the one with the best validation accuracy when True.
      async_checkpointing: write checkpoints in a background thread while training goes on.
      progress_bar: show a tqdm bar on process 0.
      gradcamo_weight: λ of the Grad-CAMO regulariser: the loss becomes
        ``CE + λ · mean_i (1 - GradCAMO_i)`` over the valid cells of the batch, where
        GradCAMO_i is `gradcamo_jax.cam.soft_gradcamo` of cell i for its *true* class at
        `gradcamo_layer` with `gradcamo_method`, differentiated through the CAM (a gradient
        of a gradient). The CAM inside the penalty runs BatchNorm in inference mode with
        the running statistics of the step's start, as every CAM does (train-mode
        statistics would make each cell's map depend on the rest of the batch). Needs the
        batch's ``mask`` (crop stores always carry it). 0 disables it (no extra cost).
      gradcamo_layer: the named layer the penalty's CAM explains.
      gradcamo_method: the penalty's CAM method (a key of `gradcamo_jax.CAM_METHODS`).
    """

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    seed: int = 0
    num_steps: int = 10_000
    learning_rate: float = 1e-3
    warmup_steps: int = 500
    end_lr_fraction: float = 0.01
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip_norm: float | None = 1.0
    label_smoothing: float = 0.0
    class_weights: str | tuple[float, ...] = "none"
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    strategy: Literal["jit", "pmap"] = "jit"
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    keep_best: bool = True
    async_checkpointing: bool = True
    progress_bar: bool = True
    gradcamo_weight: float = 0.0
    gradcamo_layer: str = "stage2"
    gradcamo_method: str = "gradcam"

    def __post_init__(self):
        if self.gradcamo_weight < 0:
            raise ValueError(f"TrainConfig.gradcamo_weight={self.gradcamo_weight}; expected >= 0")
        if self.gradcamo_layer not in STAGE_NAMES:
            raise ValueError(f"TrainConfig.gradcamo_layer={self.gradcamo_layer!r}; choose from {STAGE_NAMES}")
        if self.num_steps < 1 or self.log_every < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("TrainConfig.num_steps, log_every, checkpoint_every and keep_checkpoints must be >= 1")
        if self.strategy not in ("jit", "pmap"):
            raise ValueError(f"TrainConfig.strategy={self.strategy!r}; expected 'jit' or 'pmap'")
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"TrainConfig.compute_dtype={self.compute_dtype!r}; expected 'auto', 'float32' or 'bfloat16'")
        if isinstance(self.class_weights, str) and self.class_weights not in ("none", "balanced"):
            raise ValueError(f"TrainConfig.class_weights={self.class_weights!r}; expected 'none', 'balanced' or a tuple")
        if not isinstance(self.class_weights, str) and len(self.class_weights) != self.model.num_classes:
            raise ValueError(
                f"TrainConfig.class_weights has {len(self.class_weights)} entries; "
                f"the model has {self.model.num_classes} classes"
            )
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"TrainConfig.label_smoothing={self.label_smoothing}; expected in [0, 1)")


# ----------------------------------------------------------------------------- overrides


def config_to_dict(config) -> dict:
    """A (nested) config dataclass as plain JSON-able data; inverse of `config_from_dict`."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: dict):
    """Rebuild a (nested) config dataclass from `config_to_dict` output, typed by `cls`'s fields."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{cls.__name__}.{f.name}")
    return cls(**kwargs)


def apply_overrides(config, overrides: typing.Sequence[str]):
    """`config` with ``"dotted.field=value"`` overrides applied via `dataclasses.replace`.

    The value is read as a Python literal when it is one (``3``, ``1e-3``, ``(1, 2, 2)``,
    ``None``), else as a string, then checked and converted against the field's declared
    type: ``model.variant=b0``, ``data.crop_shape=5,24,24``, ``grad_clip_norm=none``,
    ``model.stage_strides=((1,1,1),2,2,2,1,2,1)``. Unknown fields and values of the wrong
    type are errors that name the field.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        config = _replace_path(config, key.strip().split("."), text.strip(), key.strip())
    return config


def _replace_path(obj, path: list[str], text: str, full: str):
    if not dataclasses.is_dataclass(obj):
        raise ValueError(f"override {full!r}: {type(obj).__name__} has no fields")
    names = {f.name for f in dataclasses.fields(obj)}
    head = path[0]
    if head not in names:
        raise ValueError(f"override {full!r}: {type(obj).__name__} has no field {head!r}; fields: {sorted(names)}")
    if len(path) > 1:
        return dataclasses.replace(obj, **{head: _replace_path(getattr(obj, head), path[1:], text, full)})
    tp = typing.get_type_hints(type(obj))[head]
    return dataclasses.replace(obj, **{head: _coerce(_literal(text), tp, full)})


def _literal(text: str):
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(value, tp, name: str):
    """`value` converted to type `tp` (int, float, bool, str, Literal, Optional/Union, tuple,
    nested config dataclass given as a dict); TypeError naming `name` otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        # Try the arms in a stable order: exact type matches first (so 2 stays an int for `int | tuple`).
        arms = sorted((a for a in args if a is not type(None)), key=lambda a: not _matches(value, a))
        for arm in arms:
            try:
                return _coerce(value, arm, name)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(f"{name}: {value!r} does not fit {tp}: " + "; ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{name}: {value!r} is not one of {args}")
        return value
    if origin is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{name}: expected a tuple, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ValueError(f"{name}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return config_from_dict(tp, value)
        raise TypeError(f"{name}: set its fields (e.g. {name}.<field>=...), not {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
        raise TypeError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{name}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{name}: unsupported field type {tp}")


def _matches(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return isinstance(value, (tuple, list))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    return isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))


def load_preset(name_or_path: str, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """A training config with ``"dotted.field=value"`` overrides applied.

    `name_or_path` is the name of a preset shipped in `gradcamo_jax.configs` ("paper",
    "smoke"), or the path of a Python file defining ``get_config() -> TrainConfig``.
    """
    import importlib
    import importlib.util
    from pathlib import Path

    from gradcamo_jax.configs import PRESETS

    if name_or_path in PRESETS:
        module = importlib.import_module(f"gradcamo_jax.configs.{name_or_path}")
    else:
        path = Path(name_or_path)
        if path.suffix != ".py" or not path.is_file():
            raise FileNotFoundError(
                f"no config {name_or_path!r}: expected a preset name {list(PRESETS)} or an existing "
                ".py file that defines get_config()"
            )
        spec = importlib.util.spec_from_file_location(f"gradcamo_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config {name_or_path!r} defines no get_config() -> TrainConfig")
    return apply_overrides(module.get_config(), overrides)
