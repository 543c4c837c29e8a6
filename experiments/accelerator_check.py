"""One prepared run for a lent GPU machine: environment, correctness, throughput, end to end.

Written for one H100/H200 with the workplace's 'cuda' image (Python 3.12, jax 0.11.2 with
the CUDA plugin, flax, optax, orbax, torch 2.11 CUDA, numpy, pandas, pyarrow, tifffile,
scikit-learn, scipy, matplotlib, tqdm, torchvision, opencv; no network), to finish in
≤ 8 minutes (``--budget-s 480``) and leave one JSON and one Markdown table in ``--out``:
``accelerator_check.json`` and ``accelerator_check.md`` (both rewritten after every
section, so a run killed from outside keeps what it had measured).

Sections (each timed; an exception in one is recorded with its traceback and the next
one runs; once the global deadline ``--budget-s`` has passed, the remaining sections are
recorded as skipped with a note):

1. ``environment``: backend, devices and ``device.memory_stats()``, versions of jax,
   jaxlib, the CUDA plugin, flax, optax, orbax, torch (+ its CUDA and cuDNN), zarr and
   grad-cam, the XLA allocator settings, ``nvidia-smi``.
2. ``correctness``: ``models.conv.conv`` / ``depthwise_conv`` (values and VJPs, small
   shapes) with ``impl="xla"`` on the accelerator and ``impl="shifted"`` on
   ``jax.devices("cpu")``, both against a float64 CPU reference; `explain` of the same
   weights (calibrated B0 at the paper geometry) with ``conv_impl="xla"`` on the
   accelerator vs ``conv_impl="shifted"`` on the CPU (logits, CAM maps, Grad-CAMO); the
   PyTorch twin on the same device (logits, hook Grad-CAMO). Accelerator numbers come
   twice: at the default precision (cuDNN/XLA may use TF32 for float32 there; PyTorch
   allows TF32 in cuDNN by default) and at ``jax.default_matmul_precision("highest")``
   with PyTorch's TF32 switched off. Max abs/rel differences are reported; the
   ``within_tolerance`` flags use the tolerances in the JSON (rough, not yet calibrated
   on a GPU).
3. ``throughput`` at the paper geometry (B0, 21×128×128×5,
   ``ModelConfig("b0", num_classes=6, stem_stride=(1, 2, 2))``, random He-normal weights,
   BatchNorm calibrated), float32 and bfloat16, batch sizes ``--batch-sizes``: JAX forward,
   `explain` (Grad-CAM + Grad-CAMO at stage5, outputs to the host), ``audit.model_reliance``
   (4 regions × 3 fills, forward batches of about the batch size) and the training step of
   `gradcamo_jax.train` (AdamW, clipping, BatchNorm in train mode; the compile-heavy two can
   be limited with ``--heavy-batch-sizes`` / ``--heavy-dtypes``); PyTorch on the same
   device: the twin's forward, hook +
   ``torch.autograd.grad`` Grad-CAM (+ Grad-CAMO on the device), pytorch-grad-cam
   (float32, batches ≤ ``--pgc-max-batch``, maps on the host as that library makes them)
   and an AdamW train step (bfloat16 = ``torch.autocast``). Each function of each
   framework and dtype stops at its first out-of-memory batch (recorded). Memory: JAX
   runs with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` and PyTorch's rows all run first,
   after which ``torch.cuda.empty_cache()`` hands its cache back, so each framework can
   use the whole card. The section ends ``--e2e-reserve-s`` (default a quarter of the
   budget) before the global deadline, or at ``--throughput-budget-s`` if given; PyTorch's
   sweeps get a quarter of that, JAX's three quarters (unused time rolls over), and a
   measurement whose estimate (the function's last first-call time and per-cell time)
   does not fit in what is left is skipped and recorded. Every measurement: the first
   call (compilation, cuDNN autotuning) timed alone, one settling call, then the median of
   up to ``--repeats`` calls (``--max-timed-s`` caps them).
4. ``end_to_end``: `scoring.score_dataset` over a synthetic crop store of ``--cells``
   paper-geometry cells: ``--unique-cells`` random float16 crops with blob masks written
   with ``formats.crop_store_writer``, repeated to N with ``formats.link_crop_stores``
   (hard links: the disk holds the unique cells only; N × 3.4 MB would not fit, and the
   reads then come from the page cache, so the input pipeline figure is decode +
   Python, not disk). Scoring runs one part (``--rows-per-shard`` cells) per
   ``score_dataset(max_parts=1)`` call, resuming, until done or the deadline. Reported:
   cells/s overall and without the first part, the store read alone through scoring's
   own reader at each ``--read-threads``, the host→device copy alone, explain alone (the
   throughput section's float32 row at ``--score-batch``, whose compilation scoring
   reuses: same cached function, same one-device-mesh sharding), GPU utilisation sampled
   from ``nvidia-smi`` every 0.5 s while scoring runs, and which of them bounds the run.

``--dry`` runs the same code on the CPU at tiny sizes so the script cannot rot
(``tests/test_accelerator_check.py`` runs it in-process): tiny model with XLA's native
convolutions (what "auto" picks on a GPU), 5×16×16 crops, batch sizes 2 and 4, float32,
64 cells, budget 60 s. To stay under a minute on 2 cores, where compiling dominates, it
checks one convolution case, runs reliance once (batch 2, regions cell/context, noise
fill), only traces the JAX train step (``jax.eval_shape``: its glue and
`train.train_step`'s signature, no compilation), leaves out pytorch-grad-cam (importing
it and torchvision is ~10 s of CPU) and uses one PyTorch thread. Each of those is a flag
(``--dtypes``, ``--heavy-batch-sizes``, ``--trace-only``, ``--pgc-max-batch``, ...) for a
longer dry run.

    python -m experiments.accelerator_check --out results/            # on the GPU machine
    python -m experiments.accelerator_check --dry --out /tmp/ac        # anywhere, ~1 min

Packages the GPU image lacks (checked against its package list; everything else this
script imports is there): these wheels travel in the working tree (``.whl/``, ignored by
git, 9.3 MiB together; download command below) and are installed with ``--no-deps``:

    zarr==3.1.6                 zarr-3.1.6-py3-none-any.whl                                (296 kB)
    numcodecs==0.16.6           numcodecs-0.16.6-cp312-cp312-manylinux2014_x86_64…whl    (9.35 MB)
    donfig==0.8.1.post1         donfig-0.8.1.post1-py3-none-any.whl                        (22 kB)
    google-crc32c==1.9.0        google_crc32c-1.9.0-cp312-cp312-manylinux2014_x86_64…whl   (36 kB)
    grad-cam==1.5.7             grad_cam-1.5.7-py3-none-any.whl (sdist only on PyPI: built
                                here with ``pip wheel --no-deps grad-cam==1.5.7``)           (53 kB)
    ttach==0.0.3                ttach-0.0.3-py3-none-any.whl                                (10 kB)

zarr's other needs (numpy ≥ 2, packaging, typing-extensions, pyyaml for donfig) and
grad-cam's (torchvision, opencv-python-headless, tqdm, matplotlib, scikit-learn, scipy,
pillow) are in the image. Of the project's own dependencies the image also lacks grain,
imagecodecs and umap-learn, which this script never imports. gradcamo_jax itself is not
installed there: ``PYTHONPATH=.`` (the repository root) imports it, so its ``jax<0.11`` pin
is not enforced against the image's jax 0.11.2.

Fetch the wheels here (repository root)::

    echo /.whl/ >> .git/info/exclude
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 ttach==0.0.3
    pip wheel --no-deps -w .whl grad-cam==1.5.7

and run on the device (``carry: [".whl"]``, timeout_s 600)::

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \\
      --target /tmp/site .whl/*.whl && PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:. timeout 560 \\
      python3 -m experiments.accelerator_check --out $OUT 2>&1 | tee $OUT/accelerator_check.log

Verified here: the wheels download for cp312 manylinux x86_64 and install with
``--no-deps`` into an empty ``--target`` under a Python 3.12 pip, where zarr, numcodecs,
donfig and google-crc32c import and a crop-store-shaped Zarr v3 array round-trips. Not
yet run on a GPU (no device was drawn for the task that wrote it): the tolerances, the
time split and the defaults are first guesses that the first device run will correct.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmark
from gradcamo_jax import EfficientNet, ModelConfig, calibrate_batch_stats, explain, init, make_explain_fn
from gradcamo_jax.runtime import peak_rss_mb

SECTIONS: tuple[str, ...] = ("environment", "correctness", "throughput", "end_to_end")
"""Section names, in run order; section NAME runs the module function ``section_NAME(ctx)``."""

JSON_NAME = "accelerator_check.json"
MD_NAME = "accelerator_check.md"

# Defaults of the GPU run and of --dry; a flag given on the command line wins over both.
FULL: dict[str, Any] = dict(
    variant="b0", crop=(21, 128, 128), channels=5, classes=6, batch_sizes=(8, 32, 64, 128, 256),
    dtypes=("float32", "bfloat16"), heavy_batch_sizes=None, heavy_dtypes=None,
    reliance_regions=("background", "neighbors", "cell", "context"), reliance_fills=("noise", "blur", "mean"),
    trace_only=(), repeats=5, max_timed_s=2.0, check_batch=4, cells=20000, unique_cells=256, score_batch=64, rows_per_shard=4096,
    read_cells=2048, read_threads=(2, 8), pgc_max_batch=32, budget_s=480.0,
)
# Compilation dominates a CPU run of tiny shapes (on 2 busy cores: a tiny model's forward 2-3 s,
# explain 3-7 s, reliance 6 s, its JAX train step 20-27 s, each again in bfloat16), so --dry
# runs float32 only, reliance once (batch 2), and traces the JAX train step (jax.eval_shape:
# the glue and train_step's signature, no compilation); PyTorch's train step runs for real.
# pytorch-grad-cam is left out (importing it and torchvision takes ~10 s of CPU here).
DRY: dict[str, Any] = dict(
    variant="tiny", crop=(5, 16, 16), channels=5, classes=6, batch_sizes=(2, 4),
    dtypes=("float32",), heavy_batch_sizes=(2,), heavy_dtypes=("float32",),
    reliance_regions=("cell", "context"), reliance_fills=("noise",),
    trace_only=("train_step",), repeats=1, max_timed_s=0.3, check_batch=2, cells=64, unique_cells=16, score_batch=4,
    rows_per_shard=16, read_cells=64, read_threads=(2,), pgc_max_batch=0, budget_s=60.0,
)
HEAVY = ("reliance", "train_step")
"""Functions measured only at ``--heavy-batch-sizes`` in ``--heavy-dtypes`` (compile-heavy)."""

# Rough tolerances of the ``within_tolerance`` flags (relative to the reference's max |value|,
# Grad-CAMO in absolute units). "default" allows TF32 convolutions on the accelerator.
TOLERANCES: dict[str, dict[str, float]] = {
    "conv_rel": {"default": 5e-3, "highest": 1e-5, "cpu": 1e-5},
    "logits_rel": {"default": 2e-2, "highest": 1e-4},
    "cam_rel": {"default": 5e-2, "highest": 1e-3},
    "gradcamo_abs": {"default": 2e-2, "highest": 1e-3},
}


# ----------------------------------------------------------------------------- helpers


def _now() -> float:
    return time.perf_counter()


def _err(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}


def _is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("resource_exhausted", "out of memory", "outofmemory", "failed to allocate"))


def _diff(a, b, ref=None) -> dict:
    """Max abs difference of a and b, and that relative to max |ref| (ref defaults to b)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    ref = b if ref is None else np.asarray(ref, np.float64)
    d = np.abs(a - b)
    scale = float(np.nanmax(np.abs(ref))) if ref.size else 0.0
    max_abs = float(np.nanmax(d)) if d.size else 0.0
    nonfinite = int(np.sum(~np.isfinite(a)) + np.sum(~np.isfinite(b)))
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else float("nan"), "ref_max_abs": scale,
            "nonfinite": nonfinite}


def _clean(obj):
    """JSON-safe copy: NumPy scalars to Python, non-finite floats to the strings "nan"/"inf"/"-inf"."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _mem_stats(device) -> dict | None:
    try:
        stats = device.memory_stats()
    except Exception:  # not every backend implements it
        return None
    if not stats:
        return None
    keep = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "bytes_reserved", "largest_alloc_size", "num_allocs")
    return {k: int(v) for k, v in stats.items() if k in keep}


def _cycle(base: np.ndarray, n: int) -> np.ndarray:
    """``n`` rows cycling through the rows of `base` (masks from `benchmark.synthetic_masks`, a
    batch of crops read from a store), contiguous."""
    reps = -(-n // len(base))
    return np.ascontiguousarray(np.tile(base, (reps,) + (1,) * (base.ndim - 1))[:n])


def _scoring_explain_fn(model: EfficientNet, layer: str):
    """`make_explain_fn` as `scoring.score_part` calls it (Grad-CAM, features of `layer` only, no
    CAM volumes), so the throughput row, the end-to-end section and scoring share one compilation."""
    return make_explain_fn(model, layer, "gradcam", feature_layers=(layer,), return_cam=False, with_masks=True,
                           resize=True)


def _timed(fn: Callable[[], Any], sync: Callable[[Any], Any], repeats: int, max_timed_s: float) -> dict:
    """First call (compile) timed alone, one untimed settling call (when ``repeats > 1``), then up
    to `repeats` timed calls, stopping early (after at least 2) once they add up to `max_timed_s`.
    `sync` blocks on a result."""
    t0 = _now()
    sync(fn())
    first = _now() - t0
    if repeats > 1:
        sync(fn())
    times: list[float] = []
    while len(times) < max(1, repeats):
        t0 = _now()
        sync(fn())
        times.append(_now() - t0)
        if len(times) >= 2 and sum(times) >= max_timed_s:
            break
    return {"first_call_s": first, "median_s": statistics.median(times), "min_s": min(times), "n_timed": len(times)}


def _jax_sync(out):
    return jax.block_until_ready(out)


# ----------------------------------------------------------------------------- context


def random_variables(config: ModelConfig, shape: tuple[int, ...], seed: int = 0) -> dict:
    """Random ``{"params", "batch_stats"}`` of the model's structure, made on the host: the shapes
    from ``jax.eval_shape`` of `init` (tracing only), kernels He-normal (fan-in), biases 0,
    BatchNorm scale 1, running mean 0 and variance 1. Compiling `init` itself costs seconds
    for no use here (8-10 s for the tiny model on 2 busy cores)."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda k: init(config, k, shape), jax.random.key(seed))

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1])) or 1
            return (rng.standard_normal(leaf.shape) * math.sqrt(2.0 / fan_in)).astype(leaf.dtype)
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, leaf.dtype)
        return (rng.standard_normal(leaf.shape) * 0.02).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@dataclasses.dataclass
class Setup:
    config: ModelConfig  # float32; conv_impl "auto" ("xla" under --dry)
    model: EfficientNet
    variables: dict  # host NumPy, BatchNorm calibrated
    base_masks: np.ndarray  # (8, *crop) uint8


class Ctx:
    """What the sections share: arguments, deadlines, the model and its calibrated weights (built
    on first use, so a section that fails does not take the weights from the next)."""

    def __init__(self, args: argparse.Namespace, start: float):
        self.args = args
        self.start = start
        self.deadline = start + args.budget_s
        self._setup: Setup | None = None
        self.setup_s: float | None = None
        self.shared: dict[str, Any] = {}  # measurements one section leaves for another

    def left(self, deadline: float | None = None) -> float:
        return (self.deadline if deadline is None else deadline) - _now()

    @property
    def crop(self) -> tuple[int, int, int]:
        return tuple(self.args.crop)

    def config(self, **changes) -> ModelConfig:
        """The model under test; under --dry with XLA's native convolutions, what "auto" picks on a
        GPU (they also compile faster on the CPU than the engineered ones)."""
        a = self.args
        base = ModelConfig(a.variant, num_classes=a.classes, stem_stride=(1, 2, 2), conv_impl="xla" if a.dry else "auto")
        return dataclasses.replace(base, **changes) if changes else base

    def precision_modes(self) -> tuple[str, ...]:
        """Both on an accelerator; on a CPU "highest" is the default, so only that."""
        return ("default",) if self.accelerator().platform == "cpu" else ("default", "highest")

    def setup(self) -> Setup:
        if self._setup is None:
            t0 = _now()
            config = self.config()
            model = EfficientNet(config)
            key = jax.random.key(0)
            shape = (*self.crop, self.args.channels)
            variables = random_variables(config, shape, seed=0)
            # Random weights in inference mode make activations vanish; calibrate BatchNorm.
            calib = jax.random.normal(jax.random.fold_in(key, 1), (8, *shape), jnp.float32)
            variables = jax.device_get(calibrate_batch_stats(model, variables, calib))
            variables = jax.tree.map(np.asarray, variables)
            self._setup = Setup(config, model, variables, benchmark.synthetic_masks(8, self.crop))
            self.setup_s = _now() - t0
        return self._setup

    def accelerator(self):
        """The device under test: JAX's first device, the CPU under --dry."""
        return self.cpu() if self.args.dry else jax.devices()[0]

    def cpu(self):
        return jax.devices("cpu")[0]

    def torch_device(self):
        import torch

        return torch.device("cuda" if torch.cuda.is_available() and not self.args.dry else "cpu")


def _sub(result: dict, name: str, fn: Callable[[], Any]) -> None:
    """Run one sub-check into ``result[name]``; an exception is recorded there (and in
    ``result["errors"]``) instead of ending the section."""
    t0 = _now()
    try:
        result[name] = fn()
    except Exception as exc:  # recorded, the section goes on
        result[name] = {"status": "error", **_err(exc)}
        result.setdefault("errors", []).append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
    if isinstance(result[name], dict):
        result[name].setdefault("seconds", _now() - t0)
        if result[name].get("errors"):  # a nested sub-check's errors surface at this level too
            result.setdefault("errors", []).extend(f"{name}/{e}" for e in result[name]["errors"])


# ----------------------------------------------------------------------------- 1. environment


def section_environment(ctx: Ctx) -> dict:
    devices = jax.devices()
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [
            {"id": d.id, "platform": d.platform, "kind": d.device_kind, "memory_stats": _mem_stats(d)} for d in devices
        ],
        "versions": {
            name: _version(name)
            for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt",
                         "flax", "optax", "orbax-checkpoint", "numpy", "scipy", "pandas", "pyarrow", "torch",
                         "torchvision", "zarr", "numcodecs", "grad-cam", "tqdm", "nvidia-cudnn-cu13", "nvidia-cudnn-cu12")
        },
        "env": {k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                                               "XLA_PYTHON_CLIENT_ALLOCATOR", "XLA_FLAGS", "JAX_PLATFORMS",
                                               "CUDA_VISIBLE_DEVICES", "PYTHONPATH")},
        "peak_rss_mb": peak_rss_mb(),
    }
    with contextlib.suppress(Exception):
        out["jax_platform_version"] = devices[0].client.platform_version
    try:
        from jax._src.lib import cuda_versions  # private; present with the CUDA plugin

        if cuda_versions is not None:
            out["jax_cuda"] = {
                name: getattr(cuda_versions, f)()
                for name, f in (("cuda_runtime", "cuda_runtime_get_version"), ("cudnn", "cudnn_get_version"),
                                ("cuda_driver", "cuda_driver_get_version"))
                if hasattr(cuda_versions, f)
            }
    except Exception as exc:
        out["jax_cuda"] = f"unavailable ({type(exc).__name__})"
    try:
        import torch

        t: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda,
                             "cuda_available": torch.cuda.is_available(), "threads": torch.get_num_threads()}
        with contextlib.suppress(Exception):
            t["cudnn"] = torch.backends.cudnn.version()
        if torch.cuda.is_available():
            t["device"] = torch.cuda.get_device_name(0)
            free, total = torch.cuda.mem_get_info(0)
            t["mem_free_mb"], t["mem_total_mb"] = free / 2**20, total / 2**20
            t["allow_tf32_cudnn"] = torch.backends.cudnn.allow_tf32
            t["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        out["torch"] = t
    except Exception as exc:
        out["torch"] = {"status": "error", **_err(exc)}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            out["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except Exception as exc:
            out["nvidia_smi"] = f"failed: {type(exc).__name__}: {exc}"
    else:
        out["nvidia_smi"] = None
    with contextlib.suppress(Exception):
        out["jax_environment_info"] = jax.print_environment_info(return_string=True)[-3000:]
    return out


# ----------------------------------------------------------------------------- 2. correctness

# (name, depthwise, input shape (B, Z, Y, X, C), kernel, strides, Cout for dense)
CONV_CASES: tuple[tuple[str, bool, tuple[int, ...], int, tuple[int, int, int], int], ...] = (
    ("dense k3 s(1,2,2) stem", False, (2, 7, 12, 10, 5), 3, (1, 2, 2), 8),
    ("dense k1 s(1,1,1) expand", False, (2, 5, 6, 7, 16), 1, (1, 1, 1), 24),
    ("depthwise k3 s(2,2,2)", True, (2, 7, 11, 10, 16), 3, (2, 2, 2), 0),
    ("depthwise k5 s(1,1,1)", True, (2, 5, 9, 8, 16), 5, (1, 1, 1), 0),
)


@contextlib.contextmanager
def _x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


@contextlib.contextmanager
def _precision(mode: str):
    """"default": the backend's defaults; "highest": JAX at HIGHEST precision and PyTorch without TF32."""
    if mode == "default":
        yield
        return
    try:
        import torch

        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    except Exception:  # no torch: JAX's setting alone
        torch, saved = None, None
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        if torch is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@functools.cache
def _conv_vjp_fn(depthwise: bool, strides: tuple[int, ...], impl: str):
    from gradcamo_jax.models import conv as convlib

    op = convlib.depthwise_conv if depthwise else convlib.conv

    def f(x, w, g):
        y, vjp = jax.vjp(lambda x, w: op(x, w, strides, impl=impl), x, w)
        return (y, *vjp(g))

    return jax.jit(f)


def _conv_run(case, impl: str, device, dtype) -> tuple[np.ndarray, ...]:
    _, depthwise, shape, k, strides, cout = case
    rng = np.random.default_rng(zlib.crc32(case[0].encode()))
    cin = shape[-1]
    x = rng.standard_normal(shape)
    w = rng.standard_normal((k, k, k, 1, cin) if depthwise else (k, k, k, cin, cout)) / math.sqrt(k**3 * (1 if depthwise else cin))
    out_shape = (shape[0], *(-(-n // s) for n, s in zip(shape[1:4], strides)), cin if depthwise else cout)
    g = rng.standard_normal(out_shape)
    with jax.default_device(device):
        args = [jax.device_put(np.asarray(a, dtype), device) for a in (x, w, g)]
        out = _conv_vjp_fn(depthwise, tuple(strides), impl)(*args)
        return tuple(np.asarray(jax.device_get(o), np.float64) for o in out)


def check_convolutions(ctx: Ctx) -> dict:
    acc, cpu = ctx.accelerator(), ctx.cpu()
    rows = []
    cases = CONV_CASES[2:3] if ctx.args.dry else CONV_CASES  # dry: the strided depthwise case
    modes = ctx.precision_modes()
    for case in cases:
        row: dict[str, Any] = {"case": case[0], "input": list(case[2])}
        with _x64():
            ref = _conv_run(case, "xla", cpu, np.float64)
        runs = {"cpu_shifted": lambda case=case: _conv_run(case, "shifted", cpu, np.float32)}
        for mode in modes:
            def acc_run(case=case, mode=mode):
                with _precision(mode):
                    return _conv_run(case, "xla", acc, np.float32)

            runs[f"accelerator_xla_{mode}"] = acc_run
        got = {}
        for name, run in runs.items():
            try:
                got[name] = run()
            except Exception as exc:
                row[name] = {"status": "error", **_err(exc)}
                continue
            row[name] = {part: _diff(a, r) for part, a, r in zip(("value", "vjp_x", "vjp_w"), got[name], ref)}
            tol = TOLERANCES["conv_rel"]["cpu" if name == "cpu_shifted" else name.rsplit("_", 1)[1]]
            row[name]["within_tolerance"] = all(v["max_rel"] <= tol for v in row[name].values() if isinstance(v, dict))
            row[name]["tolerance_rel"] = tol
        best = f"accelerator_xla_{modes[-1]}"
        if "cpu_shifted" in got and best in got:
            row[f"{best}_vs_cpu_shifted"] = {
                part: _diff(a, b, r) for part, a, b, r in zip(("value", "vjp_x", "vjp_w"), got[best], got["cpu_shifted"], ref)
            }
        rows.append(row)
    ok = all(r.get(k, {}).get("within_tolerance", False) for r in rows
             for k in ("cpu_shifted", *(f"accelerator_xla_{m}" for m in modes)))
    return {"accelerator": str(acc), "precision_modes": list(modes), "cases": rows, "all_within_tolerance": ok}


def _explain_inputs(ctx: Ctx):
    s = ctx.setup()
    n = ctx.args.check_batch
    rng = np.random.default_rng(3)
    images = rng.standard_normal((n, *ctx.crop, ctx.args.channels)).astype(np.float32)
    masks = _cycle(s.base_masks, n)
    targets = (np.arange(n) % ctx.args.classes).astype(np.int32)  # fixed: a near-tie must not switch the class
    return s, images, masks, targets


def _explain_on(ctx: Ctx, device, conv_impl: str, images, masks, targets):
    s = ctx.setup()
    model = EfficientNet(ctx.config(conv_impl=conv_impl))
    with jax.default_device(device):
        put = functools.partial(jax.device_put, device=device)
        out = explain(model, put(s.variables), put(images), put(masks), layer=ctx.args.layer, targets=put(targets),
                      return_cam=True)
        return jax.tree.map(np.asarray, jax.device_get(out))


def check_explain(ctx: Ctx) -> dict:
    s, images, masks, targets = _explain_inputs(ctx)
    ref = _explain_on(ctx, ctx.cpu(), "shifted", images, masks, targets)
    res: dict[str, Any] = {"cells": len(images), "crop": list(ctx.crop), "layer": ctx.args.layer,
                           "reference": "conv_impl='shifted' on jax.devices('cpu')",
                           "cpu_gradcamo": ref.scores.cell.tolist()}
    for mode in ctx.precision_modes():
        _sub(res, f"accelerator_{mode}", functools.partial(_explain_mode, ctx, mode, ref, images, masks, targets))
    res["tolerances"] = {k: v for k, v in TOLERANCES.items() if k != "conv_rel"}
    return res


def _explain_mode(ctx: Ctx, mode: str, ref, images, masks, targets) -> dict:
    with _precision(mode):
        got = _explain_on(ctx, ctx.accelerator(), "xla", images, masks, targets)
    r = {
        "logits": _diff(got.logits, ref.logits),
        "cam": _diff(got.cam, ref.cam),
        "gradcamo_cell": _diff(got.scores.cell, ref.scores.cell, np.ones(1)),
        "gradcamo_neighbors": _diff(got.scores.neighbors, ref.scores.neighbors, np.ones(1)),
        "gradcamo_background": _diff(got.scores.background, ref.scores.background, np.ones(1)),
        "features": _diff(got.features[ctx.args.layer], ref.features[ctx.args.layer]),
        "same_predictions": bool(np.array_equal(got.logits.argmax(1), ref.logits.argmax(1))),
        "gradcamo": got.scores.cell.tolist(),
    }
    r["within_tolerance"] = bool(
        r["logits"]["max_rel"] <= TOLERANCES["logits_rel"][mode] and r["cam"]["max_rel"] <= TOLERANCES["cam_rel"][mode]
        and r["gradcamo_cell"]["max_abs"] <= TOLERANCES["gradcamo_abs"][mode]
    )
    return r


def torch_scores(cam, mask):
    """Grad-CAMO on the torch side (`gradcamo_jax.metric.scores`): cam, mask ``(N, *S)``
    → cell, neighbour and background fractions ``(N,)``, float32 sums."""
    axes = tuple(range(1, cam.ndim))
    cam = cam.float()
    total = cam.sum(dim=axes)
    return tuple((cam * (mask == code)).sum(dim=axes) / total for code in (1, 2, 0))


def torch_hook_gradcam(twin, layer_name: str, x, targets, mask, autocast=None):
    """Forward hook at `layer_name` + ``torch.autograd.grad`` of the target logits, Grad-CAM
    weights, ReLU, (tri)linear upsampling and Grad-CAMO, all on x's device."""
    import torch

    layer = getattr(twin, layer_name)
    store = {}
    handle = layer.register_forward_hook(lambda mod, inp, o: store.__setitem__("a", o))
    try:
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = twin(x)
            sel = logits[torch.arange(len(targets), device=x.device), targets]
            (g,) = torch.autograd.grad(sel.sum(), store["a"])
    finally:
        handle.remove()
    a = store["a"].detach().float()
    g = g.float()
    w = g.mean(dim=tuple(range(2, g.ndim)), keepdim=True)
    cam = torch.relu((w * a).sum(1, keepdim=True))
    mode = "trilinear" if cam.ndim == 5 else "bilinear"
    cam = torch.nn.functional.interpolate(cam, size=tuple(x.shape[2:]), mode=mode, align_corners=False)[:, 0]
    return logits.detach(), torch_scores(cam, mask)


@contextlib.contextmanager
def _torch_threads(ctx: Ctx):
    """One PyTorch CPU thread under --dry: on 2 shared cores its OpenMP pool spun against
    XLA's and other jobs (a tiny forward took 0.9 s with 2 threads, 6 ms with 1)."""
    import torch

    old = torch.get_num_threads()
    if ctx.args.dry:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def check_twin(ctx: Ctx) -> dict:
    with _torch_threads(ctx):
        return _check_twin(ctx)


def _check_twin(ctx: Ctx) -> dict:
    import torch

    from gradcamo_jax.peers.torch_twin import TorchEfficientNet, load_flax_variables, to_channels_first

    s, images, masks, targets = _explain_inputs(ctx)
    dev = ctx.torch_device()
    twin = TorchEfficientNet(s.config, ctx.args.channels, ctx.crop)
    load_flax_variables(twin, s.variables)
    twin.eval().to(dev)
    x = to_channels_first(images).to(dev)
    m = torch.from_numpy(masks).to(dev)
    t = torch.from_numpy(targets.astype(np.int64)).to(dev)
    res: dict[str, Any] = {"torch_device": str(dev), "jax_device": str(ctx.accelerator())}
    def one(mode):
        with _precision(mode):
            jx = _explain_on(ctx, ctx.accelerator(), "xla", images, masks, targets)
            with torch.no_grad():
                logits = twin(x).float().cpu().numpy()
            _, (cell, _, _) = torch_hook_gradcam(twin, ctx.args.layer, x, t, m)
        r = {"logits": _diff(logits, jx.logits),
             "hook_gradcamo_vs_explain": _diff(cell.cpu().numpy(), jx.scores.cell, np.ones(1)),
             "same_predictions": bool(np.array_equal(logits.argmax(1), jx.logits.argmax(1)))}
        r["within_tolerance"] = bool(r["logits"]["max_rel"] <= TOLERANCES["logits_rel"][mode]
                                     and r["hook_gradcamo_vs_explain"]["max_abs"] <= TOLERANCES["gradcamo_abs"][mode])
        return r

    for mode in ctx.precision_modes():
        _sub(res, mode, functools.partial(one, mode))
    twin.cpu()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def section_correctness(ctx: Ctx) -> dict:
    res: dict[str, Any] = {}
    checks = (("convolutions", check_convolutions), ("explain_accelerator_vs_cpu", check_explain),
              ("torch_twin", check_twin))
    for name, fn in checks:
        if ctx.left() <= 0:
            res[name] = {"status": "skipped", "note": "global deadline reached"}
            continue
        if name == "torch_twin" and ctx.args.skip_torch:
            res[name] = {"status": "skipped", "note": "--skip-torch"}
            continue
        _sub(res, name, functools.partial(fn, ctx))
    return res


# ----------------------------------------------------------------------------- 3. throughput


class _Sweep:
    """One framework × dtype over the batch sizes; a function stops at its first OOM or error."""

    def __init__(self, ctx: Ctx, framework: str, dtype: str, deadline: float, rows: list):
        self.ctx, self.framework, self.dtype, self.deadline, self.rows = ctx, framework, dtype, deadline, rows
        self.stopped: dict[str, str] = {}
        self.last: dict[str, tuple[int, dict]] = {}

    def estimate(self, name: str, batch: int) -> float:
        if name not in self.last:
            return 0.0
        b0, t = self.last[name]
        per_call = t["median_s"] * batch / b0
        return t["first_call_s"] * 1.2 + per_call * (2 + min(self.ctx.args.repeats, 3))

    def run(self, name: str, batch: int, make: Callable[[], tuple[Callable, Callable]], note: str = "",
            trace: Callable[[], Any] | None = None) -> None:
        """Measure ``make()``'s ``(fn, sync)`` (`_timed`) into a new row; with `name` in
        ``--trace-only`` and a `trace` given, only ``trace()`` runs (abstract evaluation, no
        compilation) and the row says "traced"."""
        row: dict[str, Any] = {"framework": self.framework, "function": name, "dtype": self.dtype, "batch": batch,
                               "note": note}
        self.rows.append(row)
        a = self.ctx.args
        if name in HEAVY and (batch not in a.heavy_batch_sizes or self.dtype not in a.heavy_dtypes):
            row.update(status="skipped", note="not in --heavy-batch-sizes / --heavy-dtypes")
            return
        if name in self.stopped:
            row.update(status="skipped", note=f"stopped at a smaller batch: {self.stopped[name]}")
            return
        if trace is not None and name in a.trace_only:
            t0 = _now()
            try:
                out = trace()
            except Exception as exc:  # recorded like a failed measurement
                row.update(status="error", **_err(exc))
                self.stopped[name] = f"error at batch {batch}"
                return
            row.update(status="traced", seconds=_now() - t0, note=f"traced only (--trace-only): {out}"[:300])
            return
        left, est = self.ctx.left(self.deadline), self.estimate(name, batch)
        if left < 1.0 or est > left:
            row.update(status="skipped", note=f"time: {left:.0f} s left of this sweep, estimate {est:.0f} s")
            return
        try:
            fn, sync = make()
            t = _timed(fn, sync, self.ctx.args.repeats, self.ctx.args.max_timed_s)
        except Exception as exc:  # recorded; larger batches of this function are skipped
            oom = _is_oom(exc)
            row.update(status="oom" if oom else "error", **_err(exc))
            if oom:
                row.pop("traceback", None)
            self.stopped[name] = f"{'OOM' if oom else 'error'} at batch {batch}"
            return
        self.last[name] = (batch, t)
        row.update(status="ok", cells_per_s=batch / t["median_s"], **t)


def _jax_sweep(ctx: Ctx, dtype: str, deadline: float, rows: list) -> None:
    from gradcamo_jax import audit, train
    from gradcamo_jax.config import TrainConfig
    from gradcamo_jax.sharding import batch_sharding, make_mesh
    from gradcamo_jax.train import TrainState

    s = ctx.setup()
    a = ctx.args
    acc = ctx.accelerator()
    config = ctx.config(dtype=dtype)
    model = EfficientNet(config)
    variables = jax.device_put(s.variables, acc)
    sweep = _Sweep(ctx, "jax", dtype, deadline, rows)
    fwd = jax.jit(model.apply)
    # Called and fed as `scoring.score_part` does (same cached function, batch sharded over a
    # one-device mesh), so the end-to-end section's scoring reuses this compilation.
    explain_fn = _scoring_explain_fn(model, a.layer)
    data_sharding = batch_sharding(make_mesh([acc]))
    tc = TrainConfig(model=ctx.config(), num_steps=1000, warmup_steps=10, compute_dtype=dtype, progress_bar=False)
    tx = train.make_optimizer(tc)
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=train.learning_rate_schedule(tc),
                                     class_weights=jnp.ones((a.classes,), jnp.float32)),
                   donate_argnums=() if acc.platform == "cpu" else 0)
    init_opt = jax.jit(tx.init)
    settings = audit.RelianceSettings(regions=tuple(a.reliance_regions), fills=tuple(a.reliance_fills),
                                      cri_fill=a.reliance_fills[0])
    n_variants = len(settings.regions) * len(settings.fills)
    shape = (*ctx.crop, a.channels)
    for b in a.batch_sizes:
        key = jax.random.key(b)
        chunk = max(1, b // (n_variants + 1))  # cells per forward, so that a forward holds about b crops
        data: dict[str, Any] = {}

        def inputs(b=b, key=key, data=data):
            if not data:
                data["x"] = jax.random.normal(key, (b, *shape), jnp.float32)
                data["m"] = jax.device_put(_cycle(s.base_masks, b), acc)
                data["t"] = jnp.asarray(np.arange(b) % a.classes, jnp.int32)
            return data["x"], data["m"], data["t"]

        def make_forward(inputs=inputs):
            x, _, _ = inputs()
            return (lambda: fwd(variables, x)), _jax_sync

        def make_explain(inputs=inputs):
            x, m, t = jax.device_put(inputs(), data_sharding)
            return (lambda: jax.device_get(explain_fn(variables, x, m, t))), _jax_sync

        def make_reliance(inputs=inputs, key=key, chunk=chunk):
            x, m, _ = inputs()

            def run():
                return audit.model_reliance(model, variables, x, m, key=key, settings=settings, batch_size=chunk).cri

            return run, _jax_sync

        def train_args(inputs=inputs, b=b, abstract=False):
            x, _, t = inputs()
            # The calibrated weights (train.create_state would init again, its optimiser op by op).
            params = jax.device_put(s.variables["params"], acc)
            opt_state = jax.eval_shape(tx.init, params) if abstract else init_opt(params)
            state = TrainState(step=jnp.int32(0), params=params, batch_stats=jax.device_put(s.variables["batch_stats"], acc),
                               opt_state=opt_state, rng=jax.random.key_data(jax.random.key(1)))
            batch = {"image": x, "label": t, "valid": jnp.ones((b,), bool)}
            if abstract:
                return state, batch
            # Everything committed to the device: the step's outputs come back as its next
            # inputs, and a mix of committed and uncommitted first inputs compiled it twice.
            return jax.device_put((state, batch), acc)

        def make_train(train_args=train_args):
            state, batch = train_args()
            holder = [state]

            def one():
                holder[0], metrics = step(holder[0], batch)
                return metrics["loss"]

            return one, _jax_sync

        def trace_train(train_args=train_args):
            state, batch = train_args(abstract=True)
            _, metrics = jax.eval_shape(step, state, batch)
            return {k: f"{v.dtype}{list(v.shape)}" for k, v in metrics.items()}

        sweep.run("forward", b, make_forward)
        sweep.run("explain", b, make_explain, f"Grad-CAM at {a.layer} + Grad-CAMO, outputs to the host")
        if dtype == "float32" and sweep.rows[-1].get("status") == "ok":
            ctx.shared[f"explain_float32_{b}"] = sweep.rows[-1]
        sweep.run("reliance", b, make_reliance, f"{len(settings.regions)} regions × fills {','.join(settings.fills)}; "
                                                f"{chunk} cells × {n_variants + 1} crops per forward")
        sweep.run("train_step", b, make_train, "gradcamo_jax.train.train_step (AdamW, clip 1.0)", trace=trace_train)
        data.clear()


def _torch_sweep(ctx: Ctx, dtype: str, deadline: float, rows: list) -> None:
    with _torch_threads(ctx):
        _torch_sweep_body(ctx, dtype, deadline, rows)


def _torch_sweep_body(ctx: Ctx, dtype: str, deadline: float, rows: list) -> None:
    import torch

    from gradcamo_jax.metric import scores as gradcamo_scores
    from gradcamo_jax.peers.torch_twin import TorchEfficientNet, import_torchvision_safely, load_flax_variables

    s = ctx.setup()
    a = ctx.args
    dev = ctx.torch_device()
    cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True  # autotuned per shape, as XLA autotunes its convolutions

    def sync(_):
        if cuda:
            torch.cuda.synchronize()

    def autocast():
        if dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)

    twin = TorchEfficientNet(s.config, a.channels, ctx.crop)
    load_flax_variables(twin, s.variables)
    twin.eval().to(dev)
    sweep = _Sweep(ctx, "torch", dtype, deadline, rows)
    pgc: list = []  # (GradCAM, ClassifierOutputTarget) once imported (seconds: torchvision, cv2, ...)

    def pgc_skip(b: int) -> str | None:
        """Why pytorch-grad-cam does not run at batch b, or None."""
        if dtype != "float32":
            return "float32 only (the library turns activations into NumPy)"
        if b > a.pgc_max_batch:
            return f"batch > --pgc-max-batch {a.pgc_max_batch}"
        if not pgc:
            try:
                import_torchvision_safely()
                from pytorch_grad_cam import GradCAM
                from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
            except Exception as exc:  # optional peer
                return f"pytorch-grad-cam not importable: {type(exc).__name__}: {exc}"[:300]
            pgc[:] = [GradCAM, ClassifierOutputTarget]
        return None

    for b in a.batch_sizes:
        data: dict[str, Any] = {}

        def inputs(b=b, data=data):
            if not data:
                gen = torch.Generator(device=dev).manual_seed(b)
                data["x"] = torch.randn((b, a.channels, *ctx.crop), generator=gen, device=dev)
                data["m"] = torch.from_numpy(_cycle(s.base_masks, b)).to(dev)
                data["t"] = torch.as_tensor(np.arange(b) % a.classes, dtype=torch.long, device=dev)
            return data["x"], data["m"], data["t"]

        def make_forward(inputs=inputs):
            x, _, _ = inputs()

            def fwd():
                with torch.no_grad(), autocast():
                    return twin(x)

            return fwd, sync

        def make_hook(inputs=inputs):
            x, m, t = inputs()
            return (lambda: torch_hook_gradcam(twin, a.layer, x, t, m, autocast)), sync

        def make_pgc(inputs=inputs, data=data):
            x, m, t = inputs()
            cam = pgc[0](model=twin, target_layers=[getattr(twin, a.layer)])
            data["pgc"] = cam
            tgts = [pgc[1](int(c)) for c in t.cpu().numpy()]
            m_host = m.cpu().numpy()

            def run():
                maps = cam(input_tensor=x, targets=tgts)  # (N, *S) min-max normalised, on the host
                return np.asarray(gradcamo_scores(jnp.asarray(maps), jnp.asarray(m_host)).cell)

            return run, lambda out: out

        def make_train(inputs=inputs):
            x, _, t = inputs()
            model = copy.deepcopy(twin).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

            def step():
                opt.zero_grad(set_to_none=True)
                with autocast():
                    loss = torch.nn.functional.cross_entropy(model(x).float(), t)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                return loss

            return step, sync

        sweep.run("forward", b, make_forward, "twin, eval, no_grad" + (", autocast bf16" if dtype != "float32" else ""))
        sweep.run("hook_gradcam", b, make_hook, "forward hook + autograd.grad + Grad-CAMO on the device")
        skip = pgc_skip(b)
        if skip is not None:
            rows.append({"framework": "torch", "function": "pytorch_grad_cam", "dtype": dtype, "batch": b,
                         "status": "skipped", "note": skip})
        else:
            sweep.run("pytorch_grad_cam", b, make_pgc, "pytorch_grad_cam.GradCAM, maps min-max normalised on the host")
            if "pgc" in data:
                data["pgc"].activations_and_grads.release()
        sweep.run("train_step", b, make_train, "twin, AdamW, clip 1.0, train mode")
        data.clear()
        if cuda:
            torch.cuda.empty_cache()
    twin.cpu()
    if cuda:
        torch.cuda.empty_cache()


def throughput_ratios(rows: list[dict]) -> list[dict]:
    """Per (dtype, batch): JAX cells/s over PyTorch cells/s (> 1 = gradcamo-jax faster)."""
    ok = {(r["framework"], r["function"], r["dtype"], r["batch"]): r["cells_per_s"] for r in rows if r.get("status") == "ok"}
    pairs = {"forward_vs_torch": ("forward", "forward"), "explain_vs_hook_gradcam": ("explain", "hook_gradcam"),
             "explain_vs_pytorch_grad_cam": ("explain", "pytorch_grad_cam"), "train_vs_torch": ("train_step", "train_step")}
    out = []
    for dtype, batch in sorted({(r["dtype"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[1])):
        rec: dict[str, Any] = {"dtype": dtype, "batch": batch}
        for name, (j, t) in pairs.items():
            a, b = ok.get(("jax", j, dtype, batch)), ok.get(("torch", t, dtype, batch))
            rec[name] = a / b if a and b else None
        f, e = ok.get(("jax", "forward", dtype, batch)), ok.get(("jax", "explain", dtype, batch))
        rec["explain_time_vs_forward"] = f / e if f and e else None
        out.append(rec)
    return out


def section_throughput(ctx: Ctx) -> dict:
    a = ctx.args
    start = _now()
    deadline = ctx.deadline - a.e2e_reserve_s
    if a.throughput_budget_s is not None:
        deadline = min(deadline, start + a.throughput_budget_s)
    ctx.setup()
    rows: list[dict] = []
    sweeps: list[tuple[str, str, float]] = []
    if not a.skip_torch:
        sweeps += [("torch", d, 0.25 / len(a.dtypes)) for d in a.dtypes]
    sweeps += [("jax", d, 0.75 / len(a.dtypes)) for d in a.dtypes]
    notes = {}
    for i, (fw, dtype, weight) in enumerate(sweeps):
        # Each sweep gets its share of what is left; time a sweep does not use rolls over.
        share = weight / sum(w for _, _, w in sweeps[i:])
        sub_deadline = _now() + max(0.0, ctx.left(deadline)) * share
        try:
            (_torch_sweep if fw == "torch" else _jax_sweep)(ctx, dtype, sub_deadline, rows)
        except Exception as exc:  # a sweep that cannot start
            notes[f"{fw}_{dtype}"] = _err(exc)
    acc = ctx.accelerator()
    return {
        "geometry": {"variant": a.variant, "crop": list(ctx.crop), "channels": a.channels, "classes": a.classes,
                     "stem_stride": [1, 2, 2], "layer": a.layer},
        "device": f"{acc.device_kind} ({acc.platform})",
        "deadline_s": deadline - start,
        "rows": rows,
        "ratios": throughput_ratios(rows),
        "sweep_errors": notes,
        "jax_memory_stats": _mem_stats(acc),
        "order": [f"{fw} {d}" for fw, d, _ in sweeps],
        "memory_note": "torch rows run first, then torch.cuda.empty_cache(); JAX without preallocation "
                       "(XLA_PYTHON_CLIENT_PREALLOCATE=false when run as a script)",
    }


# ----------------------------------------------------------------------------- 4. end to end


class GpuSampler:
    """``nvidia-smi --query-gpu=utilization.gpu,memory.used`` every `interval_s` in a thread,
    while the ``with`` block runs; nothing (``available: False``) without the binary."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.exe = shutil.which("nvidia-smi")
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def parse(line: str) -> tuple[float, float] | None:
        parts = [p.strip() for p in line.split(",")]
        try:
            return float(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            return None

    def _loop(self):
        t0 = _now()
        while not self._stop.is_set():
            try:
                q = subprocess.run([self.exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True, timeout=5)
                got = self.parse(q.stdout.splitlines()[0]) if q.stdout else None
                if got is not None:
                    self.samples.append((_now() - t0, *got))
            except Exception:  # a failed sample is just missing
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if self.exe:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def summary(self) -> dict:
        if not self.exe:
            return {"available": False, "note": "no nvidia-smi on PATH"}
        util = [u for _, u, _ in self.samples]
        if not util:
            return {"available": True, "samples": 0}
        return {"available": True, "samples": len(util), "interval_s": self.interval_s,
                "util_mean": float(np.mean(util)), "util_median": float(np.median(util)),
                "util_p10": float(np.percentile(util, 10)), "util_p90": float(np.percentile(util, 90)),
                "mem_used_max_mb": float(max(m for _, _, m in self.samples))}


def write_synthetic_store(data_dir: Path, work: Path, n_cells: int, unique: int, crop, channels: int,
                          base_masks: np.ndarray, seed: int = 0) -> dict:
    """A cell dataset (cells.parquet + crops.zarr) of about `n_cells` cells: `unique` random
    float16 crops (windows of one random pool) with blob masks, written once, then linked
    ``ceil(n_cells / unique)`` times. Returns sizes and times."""
    import pandas as pd

    from gradcamo_jax.data import formats

    unique = max(1, min(unique, n_cells))
    reps = -(-n_cells // unique)
    n = reps * unique
    size = int(np.prod(crop)) * channels
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(size + 4096 * 8, dtype=np.float32).astype(np.float16)
    t0 = _now()
    part = work / "unique.zarr"
    with formats.crop_store_writer(part, unique, crop, channels, "float16") as w:
        for s in range(0, unique, 32):
            e = min(unique, s + 32)
            offs = rng.integers(0, len(pool) - size, e - s)
            imgs = np.stack([pool[o:o + size].reshape(*crop, channels) for o in offs])
            w.write(s, imgs, _cycle(np.roll(base_masks, s, axis=0), e - s))
    write_s = _now() - t0
    t0 = _now()
    data_dir.mkdir(parents=True, exist_ok=True)
    formats.link_crop_stores([part] * reps, data_dir / formats.CROPS_STORE)
    formats.write_cells(pd.DataFrame({
        "Metadata_Plate": "P", "Metadata_Well": [f"W{i % 96:02d}" for i in range(n)], "Metadata_Site": 1,
        "Metadata_ObjectNumber": np.arange(n) + 1, "Metadata_Row": np.arange(n),
    }), data_dir)
    link_s = _now() - t0
    unique_bytes = sum(f.stat().st_size for f in part.rglob("*") if f.is_file())
    return {"n_cells": n, "unique_cells": unique, "repeats": reps, "write_unique_s": write_s, "link_s": link_s,
            "unique_store_mb": unique_bytes / 2**20, "raw_mb_per_cell": size * 2 / 2**20}


def read_alone(store, n: int, batch: int, threads: int) -> dict:
    """The crop store through scoring's own reader (`scoring._batches`: float32 images + masks,
    `threads` reads in flight), nothing else."""
    from gradcamo_jax.scoring import _batches

    t0 = _now()
    count = 0
    for _, imgs, _ in _batches(store, 0, n, batch, threads):
        count += len(imgs)
    dt = _now() - t0
    return {"threads": threads, "cells": count, "seconds": dt, "cells_per_s": count / dt, "reader": "scoring._batches"}


def section_end_to_end(ctx: Ctx) -> dict:
    import pandas as pd

    from gradcamo_jax.data import formats
    from gradcamo_jax.scoring import PART, ScoreConfig, part_bounds, score_dataset
    from gradcamo_jax.sharding import batch_sharding, make_mesh

    a = ctx.args
    s = ctx.setup()
    acc = ctx.accelerator()
    res: dict[str, Any] = {"model": f"{a.variant} float32, conv_impl {s.config.conv_impl}", "score_batch": a.score_batch,
                           "rows_per_shard": a.rows_per_shard, "prefetch": a.prefetch}
    work = Path(tempfile.mkdtemp(prefix="accelerator_check_", dir=a.tmp))
    try:
        data = work / "data"
        res["store"] = write_synthetic_store(data, work, a.cells, a.unique_cells, ctx.crop, a.channels, s.base_masks)
        store = formats.open_crops(data)
        n = len(store)
        n_read = min(n, a.read_cells)
        margin = 10.0 if not a.dry else 1.0
        res["read_alone"] = []
        for threads in [a.prefetch, *sorted(set(a.read_threads) - {a.prefetch})]:
            if res["read_alone"] and ctx.left() < margin + 2 * res["read_alone"][-1]["seconds"]:
                break  # the scoring's own reader setting is always timed; extra settings only with time to spare
            res["read_alone"].append(read_alone(store, n_read, a.score_batch, threads))

        # The model side alone: explain on a resident batch, and the host→device copy of a batch.
        model = s.model
        variables = jax.device_put(s.variables, acc)
        fn = _scoring_explain_fn(model, a.layer)
        host_x = _cycle(store.image[0:a.score_batch].astype(np.float32), a.score_batch)
        host_m = _cycle(store.mask[0:a.score_batch], a.score_batch)
        x, m, t = jax.device_put((host_x, host_m, np.full((a.score_batch,), -1, np.int32)),
                                 batch_sharding(make_mesh([acc])))
        row = ctx.shared.get(f"explain_float32_{a.score_batch}")
        if row is not None:
            res["explain_alone"] = {k: row[k] for k in ("first_call_s", "median_s", "min_s", "n_timed", "cells_per_s")}
            res["explain_alone"]["note"] = "the throughput section's float32 explain row at this batch"
        else:
            tm = _timed(lambda: jax.device_get(fn(variables, x, m, t)), lambda o: o, a.repeats, a.max_timed_s)
            res["explain_alone"] = {**tm, "cells_per_s": a.score_batch / tm["median_s"], "note": "incl. device_get of outputs"}
        tm = _timed(lambda: jax.device_put(host_x, acc), _jax_sync, a.repeats, a.max_timed_s)
        res["host_to_device_alone"] = {**tm, "cells_per_s": a.score_batch / tm["median_s"],
                                       "mb_per_batch": host_x.nbytes / 2**20}

        # Scoring, part by part (resumable runs: each call scores one more part), to the deadline.
        # Dry crops (16×16) leave stage5 a 2×2 map, which scoring refuses unless forced (allow_coarse_layer);
        # the paper geometry's 8×8 passes either way. This section measures speed.
        cfg = ScoreConfig(layer=a.layer, batch_size=a.score_batch, rows_per_shard=a.rows_per_shard, prefetch=a.prefetch,
                          allow_coarse_layer=True)
        bounds = part_bounds(n, a.rows_per_shard)
        out_dir = work / "profiles"
        parts: list[dict] = []
        with GpuSampler() as sampler:
            for k, (lo, hi) in enumerate(bounds):
                est = parts[-1]["seconds"] if parts else 0.0
                if ctx.left() < margin + est:
                    res["stopped"] = f"deadline: {len(parts)} of {len(bounds)} parts scored"
                    break
                t0 = _now()
                stats = score_dataset(model, variables, data, out_dir, cfg, progress=False, max_parts=1)
                parts.append({"part": k, "cells": hi - lo, "seconds": _now() - t0, "scored_parts": stats["scored_parts"]})
        res["gpu_utilisation"] = sampler.summary()
        res["parts"] = parts
        cells = sum(p["cells"] for p in parts)
        secs = sum(p["seconds"] for p in parts)
        res["scored_cells"] = cells
        res["scoring_s"] = secs
        res["scoring_cells_per_s"] = cells / secs if secs else None
        steady = parts[1:]
        if steady:
            res["steady_cells_per_s"] = sum(p["cells"] for p in steady) / sum(p["seconds"] for p in steady)
        # What came out: one row per cell, scores finite where the map is not all zero.
        got = [pd.read_parquet(out_dir / PART.format(p["part"])) for p in parts]
        if got:
            table = pd.concat(got, ignore_index=True)
            res["output"] = {"rows": len(table), "rows_expected": cells,
                             "rows_in_order": bool(np.array_equal(table["Metadata_Row"].to_numpy(), np.arange(len(table)))),
                             "gradcamo_nan_fraction": float(table["Metadata_GradCAMO"].isna().mean()),
                             "undefined_fraction": float(table["Metadata_GradCAMO_Undefined"].mean()),
                             "gradcamo_mean": float(table["Metadata_GradCAMO"].mean())}
        # Which side bounds the run.
        rate = res.get("steady_cells_per_s") or res["scoring_cells_per_s"]
        read_at_prefetch = next(r["cells_per_s"] for r in res["read_alone"] if r["threads"] == a.prefetch)
        sides = {"input_pipeline (store read)": read_at_prefetch, "host_to_device": res["host_to_device_alone"]["cells_per_s"],
                 "model (explain)": res["explain_alone"]["cells_per_s"]}
        slowest = min(sides, key=sides.get)
        res["bottleneck"] = {
            "alone_cells_per_s": sides, "slowest_alone": slowest,
            "scoring_vs_slowest_alone": rate / sides[slowest] if rate else None,
            "verdict": ("input pipeline" if slowest.startswith("input") else slowest.split(" ")[0])
                       + (f" (scoring runs at {rate / sides[slowest]:.0%} of it alone)" if rate else ""),
            "best_read_threads": max(res["read_alone"], key=lambda r: r["cells_per_s"])["threads"],
        }
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- report


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "yes" if v else "NO"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def render_markdown(report: dict) -> str:
    meta = report.get("meta", {})
    lines = [f"# Accelerator check ({'dry, CPU' if meta.get('dry') else 'device run'})", "",
             f"Started {meta.get('started')}; budget {meta.get('budget_s')} s; total {_fmt(report.get('total_s'), '.1f')} s.",
             "", "| section | status | seconds | note |", "|---|---|---:|---|"]
    sections = report.get("sections", {})
    for name in SECTIONS:
        sec = sections.get(name, {"status": "not run"})
        note = sec.get("note") or sec.get("error") or "; ".join(sec.get("result", {}).get("errors", []) if isinstance(
            sec.get("result"), dict) else [])
        note = str(note)[:200].replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {sec.get('status')} | {_fmt(sec.get('seconds'), '.1f')} | {note} |")
    env = sections.get("environment", {}).get("result") or {}
    if env:
        v = env.get("versions", {})
        devs = ", ".join(f"{d['kind']} ({d['platform']})" for d in env.get("devices", []))
        lines += ["", "## Environment", "", f"- backend {env.get('backend')}: {devs}",
                  "- " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
                  f"- torch: {json.dumps(env.get('torch'))[:300]}", f"- nvidia-smi: {env.get('nvidia_smi')}"]
    cor = sections.get("correctness", {}).get("result") or {}
    if cor:
        lines += ["", "## Correctness (max |Δ| / max |ref|)", ""]
        conv = cor.get("convolutions", {})
        if "cases" in conv:
            lines += ["| conv case | path | value | vjp x | vjp w | ok |", "|---|---|---:|---:|---:|---|"]
            for c in conv["cases"]:
                for path in ("cpu_shifted", "accelerator_xla_default", "accelerator_xla_highest"):
                    if path not in c:
                        continue
                    r = c[path]
                    if "value" in r:
                        lines.append(f"| {c['case']} | {path} | {_fmt(r['value']['max_rel'])} | {_fmt(r['vjp_x']['max_rel'])} "
                                     f"| {_fmt(r['vjp_w']['max_rel'])} | {_fmt(r.get('within_tolerance'))} |")
                    else:
                        lines.append(f"| {c['case']} | {path} | error | | | {str(r.get('error'))[:80]} |")
        ex = cor.get("explain_accelerator_vs_cpu", {})
        if "accelerator_default" in ex or "accelerator_highest" in ex:
            lines += ["", "| explain, accelerator vs CPU | logits rel | CAM rel | Grad-CAMO abs | same preds | ok |",
                      "|---|---:|---:|---:|---|---|"]
            for mode in ("default", "highest"):
                r = ex.get(f"accelerator_{mode}")
                if r and "logits" in r:
                    lines.append(f"| {mode} precision | {_fmt(r['logits']['max_rel'])} | {_fmt(r['cam']['max_rel'])} | "
                                 f"{_fmt(r['gradcamo_cell']['max_abs'])} | {_fmt(r['same_predictions'])} | "
                                 f"{_fmt(r['within_tolerance'])} |")
        tw = cor.get("torch_twin", {})
        if "default" in tw or "highest" in tw:
            lines += ["", "| torch twin vs JAX, same device | logits rel | hook Grad-CAMO abs | same preds | ok |",
                      "|---|---:|---:|---|---|"]
            for mode in ("default", "highest"):
                r = tw.get(mode)
                if r and "logits" in r:
                    lines.append(f"| {mode} precision | {_fmt(r['logits']['max_rel'])} | "
                                 f"{_fmt(r['hook_gradcamo_vs_explain']['max_abs'])} | {_fmt(r['same_predictions'])} | "
                                 f"{_fmt(r['within_tolerance'])} |")
    thr = sections.get("throughput", {}).get("result") or {}
    if thr.get("rows"):
        lines += ["", f"## Throughput ({thr.get('device')}; cells/s, median of timed calls; first call incl. compile)", "",
                  "| framework | function | dtype | batch | status | cells/s | median s | first call s | note |",
                  "|---|---|---|---:|---|---:|---:|---:|---|"]
        for r in thr["rows"]:
            note = r.get("note", "") if r.get("status") in ("ok", "skipped", "traced") else str(r.get("error", ""))[:120]
            note = str(note).replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['framework']} | {r['function']} | {r['dtype']} | {r['batch']} | {r['status']} | "
                         f"{_fmt(r.get('cells_per_s'), '.1f')} | {_fmt(r.get('median_s'), '.4f')} | "
                         f"{_fmt(r.get('first_call_s'), '.1f')} | {note} |")
        lines += ["", "| dtype | batch | forward vs torch | explain vs hook Grad-CAM | explain vs pytorch-grad-cam | "
                  "train vs torch | explain / forward time |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in thr.get("ratios", []):
            lines.append(f"| {r['dtype']} | {r['batch']} | {_fmt(r['forward_vs_torch'])} | {_fmt(r['explain_vs_hook_gradcam'])} "
                         f"| {_fmt(r['explain_vs_pytorch_grad_cam'])} | {_fmt(r['train_vs_torch'])} | "
                         f"{_fmt(r['explain_time_vs_forward'])} |")
    e2e = sections.get("end_to_end", {}).get("result") or {}
    if e2e.get("store"):
        st = e2e["store"]
        lines += ["", "## End to end (score_dataset)", "",
                  f"- store: {st['n_cells']} cells ({st['unique_cells']} unique × {st['repeats']}, hard-linked), "
                  f"written in {_fmt(st['write_unique_s'], '.1f')} s + linked in {_fmt(st['link_s'], '.1f')} s",
                  f"- scored {e2e.get('scored_cells')} cells in {_fmt(e2e.get('scoring_s'), '.1f')} s: "
                  f"{_fmt(e2e.get('scoring_cells_per_s'), '.1f')} cells/s overall, "
                  f"{_fmt(e2e.get('steady_cells_per_s'), '.1f')} without the first part",
                  "- alone: " + ", ".join(f"{k} {_fmt(v, '.1f')} cells/s" for k, v in
                                          e2e.get("bottleneck", {}).get("alone_cells_per_s", {}).items()),
                  "- store read by threads: " + ", ".join(f"{r['threads']}: {_fmt(r['cells_per_s'], '.1f')} cells/s"
                                                          for r in e2e.get("read_alone", [])),
                  f"- GPU utilisation while scoring: {json.dumps(e2e.get('gpu_utilisation'))}",
                  f"- verdict: {e2e.get('bottleneck', {}).get('verdict')}",
                  f"- output: {json.dumps(e2e.get('output'))}"]
        if e2e.get("stopped"):
            lines.append(f"- {e2e['stopped']}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def _csv(kind):
    def parse(text: str):
        return tuple(kind(v) for v in str(text).replace(" ", "").split(",") if v)

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="accelerator_check_out", help="folder for accelerator_check.json/.md")
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes, budget 60 s (the test runs this)")
    p.add_argument("--budget-s", type=float, help="global deadline from the start (default 480; dry 60)")
    p.add_argument("--sections", type=_csv(str), default=SECTIONS, help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--variant")
    p.add_argument("--crop", type=int, nargs=3, metavar=("Z", "Y", "X"))
    p.add_argument("--channels", type=int)
    p.add_argument("--classes", type=int)
    p.add_argument("--layer", default="stage5")
    p.add_argument("--batch-sizes", type=_csv(int), help="default 8,32,64,128,256 (dry 2,4)")
    p.add_argument("--dtypes", type=_csv(str), help="default float32,bfloat16")
    p.add_argument("--heavy-batch-sizes", type=_csv(int),
                   help=f"batch sizes of {' and '.join(HEAVY)} (compile-heavy; default: --batch-sizes; dry 2)")
    p.add_argument("--heavy-dtypes", type=_csv(str), help="dtypes of those (default: --dtypes; dry float32)")
    p.add_argument("--reliance-regions", type=_csv(str), help="regions of the reliance rows (default all four)")
    p.add_argument("--reliance-fills", type=_csv(str), help="fills of the reliance rows (default noise,blur,mean)")
    p.add_argument("--trace-only", type=_csv(str), help="JAX functions only traced, not compiled (dry: train_step)")
    p.add_argument("--repeats", type=int, help="timed calls per measurement (at most)")
    p.add_argument("--max-timed-s", type=float, help="stop timing a measurement after this many seconds (>= 2 calls)")
    p.add_argument("--check-batch", type=int, help="cells of the explain/twin correctness checks")
    p.add_argument("--pgc-max-batch", type=int, help="largest batch for pytorch-grad-cam (its maps are made on the host)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--throughput-budget-s", type=float, help="cap of the throughput section (default: none but the e2e reserve)")
    p.add_argument("--e2e-reserve-s", type=float, help="time kept for end_to_end (default a quarter of the budget)")
    p.add_argument("--cells", type=int, help="cells of the end-to-end store (default 20000; dry 64)")
    p.add_argument("--unique-cells", type=int, help="distinct crops written; the store repeats them by hard links")
    p.add_argument("--score-batch", type=int)
    p.add_argument("--rows-per-shard", type=int)
    p.add_argument("--prefetch", type=int, default=2, help="ScoreConfig.prefetch of the scoring run")
    p.add_argument("--read-threads", type=_csv(int), help="reader threads to time the store with (default 2,8)")
    p.add_argument("--read-cells", type=int, help="cells read in the read-alone timing")
    p.add_argument("--tmp", default=None, help="folder for the synthetic store (default: the system temp folder)")
    args = p.parse_args(argv)
    defaults = DRY if args.dry else FULL
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.crop = tuple(args.crop)
    if args.heavy_batch_sizes is None:
        args.heavy_batch_sizes = args.batch_sizes
    if args.heavy_dtypes is None:
        args.heavy_dtypes = args.dtypes
    if args.e2e_reserve_s is None:
        args.e2e_reserve_s = 0.25 * args.budget_s
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = _now()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(args, start)
    report: dict[str, Any] = {
        "meta": {"script": "experiments.accelerator_check", "dry": args.dry, "budget_s": args.budget_s,
                 "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                 "argv": list(sys.argv[1:] if argv is None else argv),
                 "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}},
        "sections": {},
    }

    def save():
        report["total_s"] = _now() - start
        _write(out / JSON_NAME, json.dumps(_clean(report), indent=1, allow_nan=False))
        try:
            md = render_markdown(report)
        except Exception as exc:  # the JSON has it all; the table must not cost the run
            md = f"# Accelerator check\n\nrendering failed: {type(exc).__name__}: {exc}; see {JSON_NAME}\n"
        _write(out / MD_NAME, md)

    module = sys.modules[__name__]
    try:
        device = jax.default_device(ctx.accelerator())
    except Exception as exc:  # no device at all: every section will say so
        report["meta"]["device_error"] = _err(exc)["error"]
        device = contextlib.nullcontext()
    with device:
        _run_sections(ctx, report, save, module)
    save()
    print(f"[accelerator_check] wrote {out / JSON_NAME} and {out / MD_NAME} in {report['total_s']:.0f} s", flush=True)
    return json.loads(json.dumps(_clean(report)))


def _run_sections(ctx: Ctx, report: dict, save: Callable[[], None], module) -> None:
    args, start = ctx.args, ctx.start
    for name in SECTIONS:
        if name not in args.sections:
            report["sections"][name] = {"status": "skipped", "seconds": 0.0, "note": "not in --sections"}
            continue
        if ctx.left() <= 0:
            report["sections"][name] = {"status": "skipped", "seconds": 0.0,
                                        "note": f"global deadline (--budget-s {args.budget_s:g}) passed "
                                                f"{_now() - start:.0f} s into the run"}
            save()
            continue
        print(f"[accelerator_check] {name} ({ctx.left():.0f} s left)", flush=True)
        t0 = _now()
        try:
            result = getattr(module, f"section_{name}")(ctx)
            errors = result.get("errors") if isinstance(result, dict) else None
            rec = {"status": "partial" if errors else "ok", "result": result}
        except Exception as exc:  # recorded; the next section runs
            rec = {"status": "error", **_err(exc)}
            print(f"[accelerator_check] {name} failed: {rec['error']}", flush=True)
        rec["seconds"] = _now() - t0
        report["sections"][name] = rec
        report["meta"]["setup_s"] = ctx.setup_s
        save()


if __name__ == "__main__":
    # Before JAX starts its GPU client: grow on demand (PyTorch shares the card in this
    # process), and let JAX take most of the card once PyTorch has emptied its cache.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    main()
