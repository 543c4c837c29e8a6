"""Shared fixtures: tiny models with calibrated BatchNorm and synthetic crops with masks."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gradcamo_jax import EfficientNet, ModelConfig, calibrate_batch_stats, init


def blob_masks(n: int, spatial: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Masks (n, *spatial) uint8: an ellipsoid of code 1 near the centre, one of code 2 beside it."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij")
    out = np.zeros((n, *spatial), np.uint8)
    for i in range(n):
        for code, centre in ((2, rng.uniform(0.15, 0.85, len(spatial))), (1, rng.uniform(0.35, 0.65, len(spatial)))):
            radii = rng.uniform(0.15, 0.3, len(spatial)) * np.array(spatial)
            d = sum(((g - c * s) / r) ** 2 for g, c, s, r in zip(grids, centre, spatial, radii))
            out[i][d <= 1] = code
    return out


class Setup:
    def __init__(self, config: ModelConfig, spatial: tuple[int, ...], channels: int, n: int, seed: int = 0):
        self.config = config
        self.model = EfficientNet(config)
        key = jax.random.key(seed)
        variables = init(config, key, (*spatial, channels))
        calib = jax.random.normal(jax.random.fold_in(key, 1), (8, *spatial, channels))
        self.variables = calibrate_batch_stats(self.model, variables, calib)
        self.images = np.asarray(jax.random.normal(jax.random.fold_in(key, 2), (n, *spatial, channels)))
        self.masks = blob_masks(n, spatial, seed)


@pytest.fixture(scope="session")
def tiny3d() -> Setup:
    """Tiny 3D EfficientNet, 4 classes, crops (4, 7, 24, 20, 3), z not strided by the stem."""
    cfg = ModelConfig("tiny", num_classes=4, stem_stride=(1, 2, 2))
    return Setup(cfg, (7, 24, 20), 3, 4)


@pytest.fixture(scope="session")
def tiny2d() -> Setup:
    """Tiny 2D EfficientNet, 3 classes, crops (3, 30, 26, 2)."""
    return Setup(ModelConfig("tiny", num_classes=3, spatial_dims=2), (30, 26), 2, 3)


@pytest.fixture
def x64():
    """Run a test with float64 enabled, restoring the flag afterwards."""
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)
