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
      spatial_dims: 3 for crops (B, Z, Y, X, C); 2 for (B, Y, X, C).
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
        `pmap`/`shard_map` (None under `jit`, where the batch is already global).
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

    @property
    def num_blocks(self) -> int:
        return sum(s.repeats for s in self.stages())


def effective_strides(spatial: tuple[int, ...], strides: tuple[int, ...], min_size: int) -> tuple[int, ...]:
    """Per-axis strides after the `min_size` rule: stride s on an axis of length n
    is kept only if ceil(n / s) >= min_size (padding is k//2, so output = ceil(n / s))."""
    return tuple(
        s if s > 1 and -(-n // s) >= min_size else 1 for n, s in zip(spatial, strides, strict=True)
    )
