"""EfficientNet B0–B7 for 2D and 3D crops, with named stages.

The network is ``stem → stage1 … stage7 → top → pool → dropout → classifier``.
Every arrow after the stem is a named activation, so Grad-CAM at any layer is
the gradient of `forward_from(a, layer)` with respect to ``a = features(x)[layer]``:
the backward pass only crosses the part of the network after that layer.

Axis order is channels-last: ``(B, Z, Y, X, C)`` in 3D, ``(B, Y, X, C)`` in 2D.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from gradcamo_jax.config import STAGE_NAMES, ModelConfig, effective_strides
from gradcamo_jax.models.layers import ConvBN, Stage, dense_init


def layer_index(layer: str) -> int:
    """Position of a named activation in `STAGE_NAMES` (ValueError listing the names otherwise)."""
    try:
        return STAGE_NAMES.index(layer)
    except ValueError:
        raise ValueError(f"unknown layer {layer!r}; expected one of {STAGE_NAMES}") from None


def check_images(images: jax.Array, config: ModelConfig, in_channels: int | None = None) -> None:
    """Raise ValueError unless `images` is ``(B, *S, C)`` with ``len(S) == config.spatial_dims``
    (and C == `in_channels` when given). Shape checks only: no device sync."""
    axes = "(B, Z, Y, X, C)" if config.spatial_dims == 3 else "(B, Y, X, C)"
    if images.ndim != config.spatial_dims + 2:
        raise ValueError(
            f"images have shape {tuple(images.shape)} (rank {images.ndim}); expected rank "
            f"{config.spatial_dims + 2}, axes {axes}, channels last"
        )
    if in_channels is not None and images.shape[-1] != in_channels:
        raise ValueError(
            f"images have {images.shape[-1]} channels (shape {tuple(images.shape)}, axes {axes}); "
            f"the model was initialised with {in_channels}. If the channels are on another axis, "
            "move them last (e.g. np.moveaxis(x, 1, -1) for ZCYX stacks)"
        )


class EfficientNet(nn.Module):
    """EfficientNet (Tan & Le 2019) with per-axis strides and named intermediate stages.

    Call conventions (``x``: ``(B, *S, C_in)`` float; ``train`` switches BatchNorm to
    batch statistics and enables dropout / stochastic depth, which need a "dropout" rng):

    * ``apply(v, x)`` → logits ``(B, num_classes)`` (float32; float64 when dtype is).
    * ``apply(v, x, method="features")`` → dict ``{name: (B, *S_name, C_name)}`` for
      every name of `STAGE_NAMES` (``upto=`` stops early).
    * ``apply(v, a, layer, method="forward_from")`` → ``(logits, feats)``: the network
      after ``layer`` applied to its activation ``a``, and the activations it passed.
    * ``apply(v, a, method="head")`` → logits from the "top" activation.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        common = dict(
            bn_momentum=cfg.bn_momentum,
            bn_epsilon=cfg.bn_epsilon,
            bn_axis_name=cfg.bn_axis_name,
            dtype=self.dtype,
            impl=cfg.conv_impl,
        )
        self.stem = ConvBN(cfg.stem_channels, 3, cfg.axis_strides(cfg.stem_stride), min_size=cfg.min_size, **common)
        stages = cfg.stages()
        n_blocks = sum(s.repeats for s in stages)
        block = 0
        for i, spec in enumerate(stages):
            rates = tuple(cfg.drop_path_rate * (block + j) / n_blocks for j in range(spec.repeats))
            block += spec.repeats
            stage = Stage(
                spec.out_channels,
                spec.expand_ratio,
                spec.kernel,
                spec.stride,
                spec.repeats,
                rates,
                se_ratio=cfg.se_ratio,
                min_size=cfg.min_size,
                **common,
            )
            # Explicit attribute names keep parameter paths and CAM layers stable.
            setattr(self, f"stage{i + 1}", stage)
        self.top = ConvBN(cfg.top_channels, 1, **common)
        self.dropout = nn.Dropout(cfg.head_dropout)
        self.classifier = nn.Dense(cfg.num_classes, kernel_init=dense_init, dtype=self.dtype)

    @property
    def dtype(self):
        return jnp.dtype(self.config.dtype)

    def _run(self, name: str, x: jax.Array, train: bool) -> jax.Array:
        return getattr(self, name)(x, train)

    def features(self, x: jax.Array, train: bool = False, upto: str = "top") -> dict[str, jax.Array]:
        """Named activations ``{name: (B, *S_name, C_name)}`` from "stem" to `upto` inclusive."""
        check_images(x, self.config)
        last = layer_index(upto)
        out = {}
        h = x.astype(self.dtype)
        for name in STAGE_NAMES[: last + 1]:
            h = self._run(name, h, train)
            out[name] = h
        return out

    def forward_from(self, a: jax.Array, layer: str, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits ``(B, num_classes)`` from the activation ``a`` of `layer`, plus the later activations."""
        start = layer_index(layer)
        feats = {}
        h = a
        for name in STAGE_NAMES[start + 1 :]:
            h = self._run(name, h, train)
            feats[name] = h
        return self.head(h, train), feats

    def head(self, a: jax.Array, train: bool = False) -> jax.Array:
        """Global average pool → dropout → dense: ``(B, *S_top, C_top)`` → float32 logits ``(B, K)``."""
        pooled = jnp.mean(a, axis=tuple(range(1, a.ndim - 1)))
        pooled = self.dropout(pooled, deterministic=not train)
        return self.classifier(pooled).astype(jnp.promote_types(self.dtype, jnp.float32))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(B, num_classes)`` of images ``x`` ``(B, *S, C)``."""
        a = self.features(x, train)["top"]
        return self.head(a, train)


def layer_shapes(config: ModelConfig, spatial: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Spatial shape of every named activation (`STAGE_NAMES`) for crops of `spatial`
    (``(Z, Y, X)`` or ``(Y, X)``, no batch or channel axis), by the stride rule the layers
    apply (`gradcamo_jax.config.effective_strides`, output ``ceil(n / s)``) without tracing."""
    if len(spatial) != config.spatial_dims:
        raise ValueError(f"spatial {tuple(spatial)} has {len(spatial)} axes; the model has spatial_dims={config.spatial_dims}")

    def strided(shape, stride):
        eff = effective_strides(shape, config.axis_strides(stride), config.min_size)
        return tuple(-(-n // s) for n, s in zip(shape, eff))

    shape = strided(tuple(int(n) for n in spatial), config.stem_stride)
    out = {"stem": shape}
    for i, spec in enumerate(config.stages()):
        shape = strided(shape, spec.stride)
        out[f"stage{i + 1}"] = shape
    out["top"] = shape
    return out


def init(config: ModelConfig, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
    """Initial variables ``{"params", "batch_stats"}`` for inputs of ``input_shape`` = ``(*S, C)`` (no batch axis)."""
    x = jnp.zeros((1, *input_shape), jnp.float32)
    return _init_fn(config)(rng, x)


@functools.lru_cache(maxsize=32)
def _init_fn(config: ModelConfig):
    # One jitted function per config, so repeated inits (seeds, random-model baselines) compile once.
    return jax.jit(functools.partial(EfficientNet(config).init, train=False))


def calibrate_batch_stats(model: EfficientNet, variables: dict, images: jax.Array) -> dict:
    """Variables whose BatchNorm running statistics are the batch statistics of ``images``
    ``(B, *S, C)``: one train-mode forward with momentum 0 (dropout off).

    A freshly initialised network in inference mode has mean 0 / variance 1 running
    statistics, under which activations shrink block after block (to almost nothing at
    "top" in B0; BENCHMARKS.md, 'Measurements behind code choices', efficientnet.py) and
    CAMs are numerical noise; calibrating makes random-weight models meaningful
    for tests and benchmarks. Trained models do not need it.
    """
    cfg = dataclasses.replace(model.config, bn_momentum=0.0, drop_path_rate=0.0, dropout_rate=0.0)
    return _calibrate(cfg, variables, images)


@functools.partial(jax.jit, static_argnums=0)
def _calibrate(cfg: ModelConfig, variables: dict, images: jax.Array) -> dict:
    # Jitted: run op by op, the engineered convolutions' loops and custom VJPs made one
    # calibration of B0 on 8 crops of 5×21×128×128 take minutes on 2 cores (BENCHMARKS.md,
    # 'Measurements behind code choices', efficientnet.py).
    _, updates = EfficientNet(cfg).apply(variables, images, train=True, mutable=["batch_stats"])
    return {**variables, "batch_stats": updates["batch_stats"]}
