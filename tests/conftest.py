"""Shared fixtures: tiny models with calibrated BatchNorm and synthetic crops with masks.

Compilation dominates this suite (tiny models, many distinct programs), so the session
compiles with XLA:CPU's cheap LLVM settings and, where this jaxlib has them, its older
elemental emitters (`FAST_COMPILE`; ``GRADCAMO_TEST_FAST_COMPILE=0`` turns them off), and
keeps a persistent compilation cache under ``build/jax_cache`` that the test processes and
their subprocesses share (a cached executable is the same program, so results do not change;
delete the folder to start cold).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = ROOT / "build" / "jax_cache"
# XLA:CPU's older elemental emitters: the tiny models' programs compile in about half the CPU
# time of the fusion emitters' (test_cam + test_regularizer, cold cache: 206 s vs 374 s of CPU).
# jaxlib 0.11 removed the flag, and an unknown flag in XLA_FLAGS aborts the process.
LEGACY_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
    """Whether this jaxlib's XLA starts with `flag` (probed in a child process, once per test
    session: the answer is passed to pytest-xdist's workers in the environment)."""
    key = "GRADCAMO_TEST_XLA_ACCEPTS_LEGACY_EMITTERS"
    if key not in os.environ:
        env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
        probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                               timeout=300)
        os.environ[key] = "1" if probe.returncode == 0 else "0"
    return os.environ[key] == "1"


FAST_COMPILE = " ".join(["--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
                         *([LEGACY_EMITTERS] if _xla_accepts(LEGACY_EMITTERS) else [])])

# Before jax is imported: XLA reads its flags once, at backend start.
if os.environ.get("GRADCAMO_TEST_FAST_COMPILE", "1") != "0" and "xla_backend_optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE_DIR))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gradcamo_jax import EfficientNet, ModelConfig, calibrate_batch_stats, init  # noqa: E402


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
        # Compiled once per session: an un-jitted `apply` dispatches and compiles op by op.
        self.logits = jax.jit(self.model.apply)
        self.features = jax.jit(functools.partial(self.model.apply, method="features"))


@pytest.fixture(scope="session")
def tiny3d() -> Setup:
    """Tiny 3D EfficientNet, 4 classes, crops (4, 7, 24, 20, 3), z not strided by the stem."""
    cfg = ModelConfig("tiny", num_classes=4, stem_stride=(1, 2, 2))
    return Setup(cfg, (7, 24, 20), 3, 4)


@pytest.fixture(scope="session")
def tiny2d() -> Setup:
    """Tiny 2D EfficientNet, 3 classes, crops (3, 30, 26, 2)."""
    return Setup(ModelConfig("tiny", num_classes=3, spatial_dims=2), (30, 26), 2, 3)


def pytest_collection_modifyitems(config, items):
    """A test module may name its quick tests in ``FAST`` (test names, with parameters where
    only some of a grid are quick): the rest of that module gets the ``slow`` marker, so
    ``-m 'not slow'`` (`make test-fast`) runs one representative of each expensive family
    while `make test` runs everything."""
    slow = pytest.mark.slow
    for item in items:
        fast = getattr(item.module, "FAST", None)
        if fast is not None and item.name not in fast and item.originalname not in fast:
            item.add_marker(slow)
    # Longest files first: with --no-loadscope-reorder (the Makefile) pytest-xdist's loadfile
    # hands out whole files in collection order, so the long ones no longer end the run alone.
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), order[id(item)]))


# Files by their share of `make test` (slowest first; measured with --durations, 2 workers),
# the rest in collection order after them. Only the order changes, never what runs.
LONGEST_FIRST = (
    "test_segment.py", "test_regularizer.py", "test_train.py", "test_demo.py", "test_sharding.py",
    "test_cam.py", "test_scoring.py", "test_remedies.py", "test_twin.py", "test_model.py", "test_conv.py",
    "test_learning.py", "test_audit.py", "test_2d_plates.py", "test_report.py", "test_accelerator_check.py",
)


@pytest.fixture(scope="session")
def jax_cache() -> Path:
    """The session's persistent compilation cache, for subprocesses that run the same programs."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return CACHE_DIR


def float64(tree):
    """`tree` with every leaf a float64 array, converted on the host: op by op, each leaf shape
    compiled its own conversion (seconds for a model's variables). Needs float64 enabled (`x64`)."""
    assert jax.config.jax_enable_x64, "float64 needs the x64 fixture"
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)


@pytest.fixture
def x64():
    """Run a test with float64 enabled, restoring the flag afterwards."""
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)
