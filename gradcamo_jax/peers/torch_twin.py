"""A PyTorch twin of `gradcamo_jax.models.EfficientNet`: same architecture, same weights, same numbers.

What it is for
--------------
The twin is the *reference peer* of gradcamo-jax:

* correctness tests (`tests/test_twin.py`): with the Flax weights copied in, the
  twin's logits and every named activation agree with ``model.apply`` to float32
  precision, and the Grad-CAM family computed on the twin by third-party code
  (pytorch-grad-cam, MONAI) agrees with `gradcamo_jax.cam`;
* the PyTorch side of `experiments/benchmark.py` (forward, hook-based Grad-CAM,
  pytorch-grad-cam, MONAI and a train step on the identical network).

It lives in `gradcamo_jax.peers`, which the pipeline never imports, so torch stays optional.

Architecture (channels-first: ``(N, C, Z, Y, X)`` in 3D, ``(N, C, Y, X)`` in 2D)
-------------------------------------------------------------------------------
``stem`` (3×3(×3) bias-free conv + BN + SiLU) → ``stage1`` … ``stage7`` (MBConv
blocks ``block0 …``) → ``top`` (1×1 conv + BN + SiLU) → global average pool →
dropout → ``classifier`` (Linear). An MBConv block is: ``expand`` (1×1 + BN + SiLU,
only when expand_ratio != 1) → ``depthwise`` (k×k(×k), groups = C, + BN + SiLU) →
``se`` (mean → Linear(C, max(1, int(cin·se_ratio))) → SiLU → Linear → sigmoid, with
cin the block's *input* channels) → ``project`` (1×1 + BN) → + input when the block
keeps shape (stochastic depth on that branch in train mode).

The modules ``twin.stem``, ``twin.stage1`` … ``twin.stage7``, ``twin.top`` output
exactly the activations our ``features()`` returns under the same names
(`gradcamo_jax.config.STAGE_NAMES`), so CAM libraries target e.g. ``[twin.stage5]``
(pytorch-grad-cam) or ``"stage5"`` (MONAI).

Geometry. Padding is symmetric ``k // 2`` on every axis, so an axis of length n
with stride s has ceil(n / s) outputs, as in `gradcamo_jax.models.conv`. Our model
decides its per-axis strides from the *actual* input shape at trace time (an axis
is not strided when that would leave it shorter than ``config.min_size``, see
`gradcamo_jax.config.effective_strides`); PyTorch modules are built before they
see data, so the twin takes ``input_spatial`` and replays that rule at
construction, tracking each layer's spatial size. A twin therefore matches our
model only for inputs of that spatial shape; `forward` checks it.

BatchNorm. ``eps = config.bn_epsilon``; ``momentum = 1 - config.bn_momentum``
(Flax/Keras weight the *old* running value by momentum, PyTorch weights the *new*
batch statistic). One unavoidable train-mode difference: PyTorch updates
``running_var`` with the unbiased (n-1) batch variance, Flax with the biased one.
Normalisation itself (train: biased batch variance; eval: running stats) is the same.

How the weights map (`load_flax_variables`)
-------------------------------------------
Module paths are the Flax paths: ``params/stage2/block0/expand/conv/kernel`` →
``stage2.block0.expand.conv.weight``, leaf by leaf:

===========================  ==========================  ===========================
Flax leaf                    PyTorch tensor              layout change
===========================  ==========================  ===========================
conv ``kernel``              ``conv.weight``             (*K, Cin, Cout) → (Cout, Cin, *K)
depthwise ``kernel``         ``conv.weight``             (*K, 1, C) → (C, 1, *K)
Dense ``kernel`` / ``bias``  Linear ``weight``/``bias``  (in, out) → (out, in)
BN ``scale`` / ``bias``      ``bn.weight`` / ``bn.bias``  none
BN ``mean`` / ``var``        ``bn.running_mean/var``     none (batch_stats collection)
===========================  ==========================  ===========================

Both frameworks compute cross-correlation (no kernel flip). Any Flax leaf without a
twin tensor, any twin tensor left unfilled, or any shape mismatch raises.

torchvision
-----------
pytorch-grad-cam imports torchvision (`import_torchvision_safely` explains why
that fails here and how it is worked around). MONAI's ``monai.visualize.GradCAM``
does not import torchvision.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcamo_jax.config import STAGE_NAMES, ModelConfig, effective_strides

__all__ = [
    "TorchEfficientNet",
    "import_torchvision_safely",
    "load_flax_variables",
    "to_channels_first",
]


def _conv_cls(nd: int):
    return {2: nn.Conv2d, 3: nn.Conv3d}[nd]


def _bn_cls(nd: int):
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd]


def _out_spatial(spatial: Sequence[int], strides: Sequence[int]) -> tuple[int, ...]:
    """Output size of a conv with symmetric k//2 padding: ceil(n / s) per axis."""
    return tuple(-(-n // s) for n, s in zip(spatial, strides, strict=True))


class ConvBN(nn.Module):
    """Bias-free conv (padding k//2, given per-axis strides) → BatchNorm → SiLU (if `act`).

    Mirrors `gradcamo_jax.models.layers.ConvBN`; ``strides`` are already effective.
    Submodules ``conv``, ``bn`` (, ``act``) as the Flax names.
    """

    def __init__(
        self,
        nd: int,
        cin: int,
        cout: int,
        kernel: int,
        strides: tuple[int, ...],
        *,
        depthwise: bool = False,
        act: bool = True,
        bn_momentum: float = 0.99,
        bn_epsilon: float = 1e-3,
    ):
        super().__init__()
        if depthwise and cin != cout:
            raise ValueError(f"depthwise ConvBN needs cin == cout, got {cin} vs {cout}")
        self.conv = _conv_cls(nd)(
            cin,
            cout,
            kernel,
            stride=tuple(strides),
            padding=kernel // 2,
            groups=cin if depthwise else 1,
            bias=False,
        )
        # PyTorch momentum weights the new batch statistic; Flax's weights the old running value.
        self.bn = _bn_cls(nd)(cout, eps=bn_epsilon, momentum=1.0 - bn_momentum)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    """x * sigmoid(expand(silu(reduce(mean_S(x))))) with Linear layers (= Flax Dense on (B,1,…,1,C))."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Linear(channels, reduced)
        self.expand = nn.Linear(reduced, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=tuple(range(2, x.ndim)))
        s = torch.sigmoid(self.expand(F.silu(self.reduce(s))))
        return x * s.reshape(*s.shape, *(1,) * (x.ndim - 2))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth as `gradcamo_jax.models.layers.drop_path`: zero whole samples with
    probability `rate`, scale survivors by 1/(1-rate). Identity in eval mode."""
    if not training or rate <= 0:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < 1.0 - rate
    return torch.where(keep, x / (1.0 - rate), torch.zeros_like(x))


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excite; ``strides`` already effective.

    Submodules ``expand`` (absent when expand_ratio == 1), ``depthwise``, ``se`` (absent
    when se_ratio == 0), ``project``, as in `gradcamo_jax.models.layers.MBConv`.
    """

    def __init__(
        self,
        nd: int,
        cin: int,
        cout: int,
        expand_ratio: int,
        kernel: int,
        strides: tuple[int, ...],
        *,
        se_ratio: float,
        drop_path_rate: float,
        bn_momentum: float,
        bn_epsilon: float,
    ):
        super().__init__()
        bn = dict(bn_momentum=bn_momentum, bn_epsilon=bn_epsilon)
        hidden = cin * expand_ratio
        if expand_ratio != 1:
            self.expand = ConvBN(nd, cin, hidden, 1, (1,) * nd, **bn)
        else:
            self.expand = None
        self.depthwise = ConvBN(nd, hidden, hidden, kernel, strides, depthwise=True, **bn)
        self.se = SqueezeExcite(hidden, max(1, int(cin * se_ratio))) if se_ratio > 0 else None
        self.project = ConvBN(nd, hidden, cout, 1, (1,) * nd, act=False, **bn)
        self.residual = all(s == 1 for s in strides) and cin == cout
        self.drop_path_rate = drop_path_rate
        self.strides = tuple(strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand is not None:
            h = self.expand(h)
        h = self.depthwise(h)
        if self.se is not None:
            h = self.se(h)
        h = self.project(h)
        if self.residual:
            h = drop_path(h, self.drop_path_rate, self.training) + x
        return h

    def extra_repr(self) -> str:
        return f"strides={self.strides}, residual={self.residual}, drop_path_rate={self.drop_path_rate:.4g}"


class TorchEfficientNet(nn.Module):
    """The PyTorch twin of `gradcamo_jax.models.EfficientNet` for one input geometry.

    Args:
      config: the `ModelConfig` of the Flax model (variant, classes, spatial_dims,
        strides, min_size, se_ratio, drop_path_rate, BN constants, dropout). ``dtype``
        and ``conv_impl`` are ignored: the twin is float32 (``.double()`` for float64).
      in_channels: image channels C.
      input_spatial: ``(Z, Y, X)`` (3D) or ``(Y, X)`` (2D); the per-axis stride rule is
        evaluated for this shape, so inputs must have it.

    ``forward(x)``: ``(N, C, *input_spatial)`` → logits ``(N, num_classes)``.
    ``features(x)``: ``{name: (N, C_name, *S_name)}`` for every name of `STAGE_NAMES`.
    ``layer_spatial``: ``{name: S_name}``, the spatial shape of each named activation.
    """

    def __init__(self, config: ModelConfig, in_channels: int, input_spatial: Sequence[int]):
        super().__init__()
        nd = config.spatial_dims
        spatial = tuple(int(n) for n in input_spatial)
        if len(spatial) != nd:
            raise ValueError(f"input_spatial={spatial} has {len(spatial)} axes; config.spatial_dims={nd}")
        self.config = config
        self.in_channels = int(in_channels)
        self.input_spatial = spatial
        bn = dict(bn_momentum=config.bn_momentum, bn_epsilon=config.bn_epsilon)
        layer_spatial: dict[str, tuple[int, ...]] = {}

        # Stem: min_size applies (Flax ConvBN gets min_size=config.min_size).
        strides = effective_strides(spatial, config.axis_strides(config.stem_stride), config.min_size)
        self.stem = ConvBN(nd, self.in_channels, config.stem_channels, 3, strides, **bn)
        spatial = _out_spatial(spatial, strides)
        layer_spatial["stem"] = spatial
        cin = config.stem_channels

        stages = config.stages()
        n_blocks = sum(s.repeats for s in stages)
        block = 0
        for i, spec in enumerate(stages):
            blocks = OrderedDict()
            for j in range(spec.repeats):
                nominal = spec.stride if j == 0 else (1,) * nd
                strides = effective_strides(spatial, nominal, config.min_size)
                blocks[f"block{j}"] = MBConv(
                    nd,
                    cin,
                    spec.out_channels,
                    spec.expand_ratio,
                    spec.kernel,
                    strides,
                    se_ratio=config.se_ratio,
                    drop_path_rate=config.drop_path_rate * (block + j) / n_blocks,
                    **bn,
                )
                spatial = _out_spatial(spatial, strides)
                cin = spec.out_channels
            block += spec.repeats
            self.add_module(f"stage{i + 1}", nn.Sequential(blocks))
            layer_spatial[f"stage{i + 1}"] = spatial

        self.top = ConvBN(nd, cin, config.top_channels, 1, (1,) * nd, **bn)
        layer_spatial["top"] = spatial
        self.dropout = nn.Dropout(config.head_dropout)
        self.classifier = nn.Linear(config.top_channels, config.num_classes)
        self.layer_spatial = layer_spatial

    def _check(self, x: torch.Tensor) -> None:
        want = (self.in_channels, *self.input_spatial)
        if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"input has shape {tuple(x.shape)}; this twin was built for (N, {', '.join(map(str, want))}) "
                "(channels first; the per-axis strides depend on the spatial shape)"
            )

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named activations ``{name: (N, C_name, *S_name)}``, as our ``features()`` (channels first)."""
        self._check(x)
        out = {}
        h = x
        for name in STAGE_NAMES:
            h = getattr(self, name)(h)
            out[name] = h
        return out

    def head(self, a: torch.Tensor) -> torch.Tensor:
        """Global average pool → dropout → classifier: ``(N, C_top, *S)`` → ``(N, num_classes)``."""
        pooled = a.mean(dim=tuple(range(2, a.ndim)))
        return self.classifier(self.dropout(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        h = x
        for name in STAGE_NAMES:
            h = getattr(self, name)(h)
        return self.head(h)


# ----------------------------------------------------------------------------- weights


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], np.ndarray]:
    out = {}
    for k, v in tree.items():
        path = prefix + (str(k),)
        if isinstance(v, Mapping):
            out.update(_flatten(v, path))
        else:
            out[path] = np.asarray(v)
    return out


_PARAM_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STAT_LEAVES = {"mean": "running_mean", "var": "running_var"}


def _to_torch_layout(path: tuple[str, ...], value: np.ndarray, target: torch.Tensor) -> np.ndarray:
    leaf = path[-1]
    if leaf == "kernel":
        if target.ndim == 2:  # Dense (in, out) → Linear (out, in)
            return value.T
        # conv (*K, Cin, Cout) → (Cout, Cin, *K); depthwise (*K, 1, C) → (C, 1, *K)
        nd = value.ndim - 2
        return np.transpose(value, (nd + 1, nd, *range(nd)))
    return value


@torch.no_grad()
def load_flax_variables(twin: TorchEfficientNet, variables: Mapping) -> TorchEfficientNet:
    """Copy Flax ``{"params", "batch_stats"}`` into `twin` in place (and return it).

    Raises ValueError listing every Flax leaf with no twin tensor, every twin tensor
    that no Flax leaf fills, and every shape mismatch (after the layout change).
    """
    if "params" not in variables or "batch_stats" not in variables:
        raise ValueError(f"variables have collections {sorted(variables)}; expected 'params' and 'batch_stats'")
    extra_collections = sorted(set(variables) - {"params", "batch_stats"})
    state = twin.state_dict()
    wanted = {k for k in state if not k.endswith("num_batches_tracked")}
    filled: dict[str, np.ndarray] = {}
    missing, mismatched = [], []
    for collection, leaves in (("params", _PARAM_LEAVES), ("batch_stats", _STAT_LEAVES)):
        for path, value in _flatten(variables[collection]).items():
            name = "/".join((collection, *path))
            if path[-1] not in leaves:
                missing.append(f"{name} (unknown leaf)")
                continue
            key = ".".join(path[:-1] + (leaves[path[-1]],))
            if key not in state or key in filled:
                missing.append(f"{name} -> {key}")
                continue
            value = _to_torch_layout(path, value, state[key])
            if tuple(value.shape) != tuple(state[key].shape):
                mismatched.append(f"{name} {tuple(value.shape)} -> {key} {tuple(state[key].shape)}")
                continue
            filled[key] = value
    unfilled = sorted(wanted - set(filled))
    if extra_collections or missing or mismatched or unfilled:
        lines = []
        if extra_collections:
            lines.append(f"unexpected collections: {extra_collections}")
        if missing:
            lines.append(f"Flax leaves without a twin tensor ({len(missing)}): {missing[:20]}")
        if mismatched:
            lines.append(f"shape mismatches ({len(mismatched)}): {mismatched[:20]}")
        if unfilled:
            lines.append(f"twin tensors not in the Flax variables ({len(unfilled)}): {unfilled[:20]}")
        raise ValueError(
            "Flax variables do not match the twin (same ModelConfig, in_channels and input_spatial?):\n  "
            + "\n  ".join(lines)
        )
    for key, value in filled.items():
        t = state[key]
        t.copy_(torch.from_numpy(np.array(value, copy=True)).to(t.dtype))
    return twin


def to_channels_first(images) -> torch.Tensor:
    """``(N, *S, C)`` array (NumPy/JAX) → contiguous float tensor ``(N, C, *S)`` for the twin."""
    a = np.asarray(images)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))


# ----------------------------------------------------------------------------- torchvision

# Keeps the fallback op schemas registered: a torch.library.Library deregisters on deletion.
_TORCHVISION_SCHEMAS: torch.library.Library | None = None


def import_torchvision_safely():
    """Import torchvision (as pytorch-grad-cam does) even when its C++ ops cannot load.

    Why: the registry's torchvision here is a CUDA build; against the CPU torch 2.13.0
    its ``_C.so`` fails to load, which torchvision tolerates, but
    ``torchvision/_meta_registrations.py`` then calls
    ``torch.library.register_fake("torchvision::nms")`` (and ``"torchvision::qnms"``)
    unconditionally, and registering a fake kernel for an operator whose schema was
    never defined raises ``RuntimeError: operator torchvision::nms does not exist``.
    Every other torchvision registration is guarded by ``extension._has_ops()``.

    Fix: try a normal import; if it fails with that error, drop the half-imported
    ``torchvision*`` modules, define the two schemas ourselves with
    ``torch.library.Library("torchvision", "DEF")`` (exactly as torchvision's C++
    defines them), and import again. The pure-Python parts of torchvision
    (transforms, models, what pytorch-grad-cam uses) then work; calling
    ``torchvision.ops.nms`` raises because the op has no kernel. When torchvision's
    ops load normally, nothing is registered. Returns the torchvision module.
    """
    global _TORCHVISION_SCHEMAS
    try:
        import torchvision

        return torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc) or "does not exist" not in str(exc):
            raise
        first_error = exc
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    if _TORCHVISION_SCHEMAS is None:
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SCHEMAS = lib
    try:
        import torchvision
    except RuntimeError as exc:
        raise RuntimeError(
            f"torchvision still fails to import after defining the nms/qnms schemas: {exc} "
            f"(first error: {first_error})"
        ) from exc
    return torchvision


if __name__ == "__main__":  # pragma: no cover - a quick look at a twin
    cfg = ModelConfig("b0", num_classes=6)
    twin = TorchEfficientNet(cfg, 5, (21, 128, 128))
    print(twin.layer_spatial)
    print(f"{sum(p.numel() for p in twin.parameters()):,} parameters")
