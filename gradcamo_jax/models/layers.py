"""Flax building blocks of EfficientNet: conv + BatchNorm, squeeze-excite, MBConv.

All modules are channels-last and dimension-agnostic: inputs are
``(B, *S, C)`` with ``S = (Z, Y, X)`` in 3D or ``(Y, X)`` in 2D. The arithmetic
of every convolution lives in `gradcamo_jax.models.conv`, which picks its
formulation per backend; these modules only own parameters.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gradcamo_jax.config import effective_strides
from gradcamo_jax.models import conv as convlib

# TF EfficientNet initialisers: He-normal on fan-out for convs, uniform for the classifier.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")
# A depthwise kernel (*K, 1, C) mixes only prod(K) inputs per output: scaling by flax's fan-out
# (prod(K)·C) would shrink activations ~C-fold per block. Keras counts prod(K) (its layout is (*K, C, 1)).
depthwise_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


class Conv(nn.Module):
    """Bias-free convolution with symmetric ``k // 2`` padding (output = ceil(n / stride)).

    Input ``(B, *S, Cin)`` → output ``(B, *S', features)``. Kernel parameter
    ``(*K, Cin, features)`` (dense) or ``(*K, 1, Cin)`` (``depthwise=True``).
    """

    features: int
    kernel: int
    strides: tuple[int, ...]
    depthwise: bool = False
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        nd = x.ndim - 2
        cin = x.shape[-1]
        if self.depthwise:
            if self.features != cin:
                raise ValueError(f"depthwise Conv needs features == input channels, got {self.features} vs {cin}")
            shape = (self.kernel,) * nd + (1, cin)
        else:
            shape = (self.kernel,) * nd + (cin, self.features)
        w = self.param("kernel", depthwise_init if self.depthwise else conv_init, shape, jnp.float32)
        x, w = x.astype(self.dtype), w.astype(self.dtype)
        if self.depthwise:
            return convlib.depthwise_conv(x, w, self.strides, impl=self.impl)
        return convlib.conv(x, w, self.strides, impl=self.impl)


class ConvBN(nn.Module):
    """Conv → BatchNorm → optional SiLU. Shapes as `Conv`; an axis is not strided when
    that would leave it shorter than `min_size`."""

    features: int
    kernel: int = 1
    strides: tuple[int, ...] | None = None
    depthwise: bool = False
    act: bool = True
    min_size: int = 1
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        strides = effective_strides(x.shape[1:-1], self.strides or (1,) * (x.ndim - 2), self.min_size)
        x = Conv(self.features, self.kernel, strides, self.depthwise, self.dtype, self.impl, name="conv")(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            axis_name=self.bn_axis_name,
            dtype=self.dtype,
            name="bn",
        )(x)
        return nn.silu(x) if self.act else x


class SqueezeExcite(nn.Module):
    """Channel gating: x * sigmoid(W2 · silu(W1 · mean_S(x))). ``(B, *S, C)`` → same shape."""

    reduced: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        spatial = tuple(range(1, x.ndim - 1))
        s = jnp.mean(x, axis=spatial, keepdims=True)
        s = nn.Dense(self.reduced, dtype=self.dtype, kernel_init=conv_init, name="reduce")(s)
        s = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=conv_init, name="expand")(nn.silu(s))
        return x * nn.sigmoid(s)


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Stochastic depth: zero whole samples of a residual branch with probability `rate`,
    scaling survivors by 1 / (1 - rate) so the expectation is unchanged. x: (B, ...)."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excite (EfficientNet's block).

    ``(B, *S, Cin)`` → ``(B, *S', out_channels)``; residual when the block keeps shape.
    `strides` are nominal; an axis is not strided when that would leave it
    shorter than `min_size` (see `gradcamo_jax.config.effective_strides`).
    """

    out_channels: int
    expand_ratio: int
    kernel: int
    strides: tuple[int, ...]
    se_ratio: float = 0.25
    drop_path_rate: float = 0.0
    min_size: int = 2
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cin = x.shape[-1]
        strides = effective_strides(x.shape[1:-1], self.strides, self.min_size)
        bn = dict(
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            bn_axis_name=self.bn_axis_name,
            dtype=self.dtype,
            impl=self.impl,
        )
        h = x
        hidden = cin * self.expand_ratio
        if self.expand_ratio != 1:
            h = ConvBN(hidden, 1, name="expand", **bn)(h, train)
        h = ConvBN(hidden, self.kernel, strides, depthwise=True, name="depthwise", **bn)(h, train)
        if self.se_ratio > 0:
            h = SqueezeExcite(max(1, int(cin * self.se_ratio)), self.dtype, name="se")(h)
        h = ConvBN(self.out_channels, 1, act=False, name="project", **bn)(h, train)
        if all(s == 1 for s in strides) and cin == self.out_channels:
            if train and self.drop_path_rate > 0:
                h = drop_path(h, self.drop_path_rate, self.make_rng("dropout"))
            h = h + x
        return h


class Stage(nn.Module):
    """A run of `repeats` MBConv blocks named ``block0 … block{n-1}``; only the first strides."""

    out_channels: int
    expand_ratio: int
    kernel: int
    strides: tuple[int, ...]
    repeats: int
    drop_path_rates: tuple[float, ...]
    se_ratio: float = 0.25
    min_size: int = 2
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for j in range(self.repeats):
            x = MBConv(
                self.out_channels,
                self.expand_ratio,
                self.kernel,
                self.strides if j == 0 else (1,) * len(self.strides),
                se_ratio=self.se_ratio,
                drop_path_rate=self.drop_path_rates[j],
                min_size=self.min_size,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                bn_axis_name=self.bn_axis_name,
                dtype=self.dtype,
                impl=self.impl,
                name=f"block{j}",
            )(x, train)
        return x
