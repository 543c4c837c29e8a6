"""Build a small Cellpose model with no network: train an untrained CPnet on synthetic 2D slices.

Why: pretrained Cellpose weights (cyto3, nuclei, cpsam) download from the internet on first use.
Tests, CI and air-gapped users need a model made here. The recipe below trains the default
Cellpose-3 network (CPnet, 6.6 M parameters) from random weights with ``cellpose.train.train_seg``
on two-channel images (channel 0 = cytoplasm, channel 1 = nucleus) of crowded, touching,
ellipsoidal cells with nuclei. It is a stand-in for testing the tooling, not a replacement for
cyto3 on real data.

Cellpose 3.x only: cellpose 4 replaced CPnet with the Cellpose-SAM transformer (cpsam), whose
from-scratch training is out of reach on a CPU; under 4.x :func:`train_offline_model` refuses
with a clear message.

Only tools/ imports torch/cellpose; this module imports them lazily inside functions so that the
synthetic-image helpers stay importable without them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineRecipe:
    """Everything that determines the offline model (its hash names the cached file).

    Attributes:
      n_train: number of synthetic training images.
      n_test: held-out synthetic images for the AP@0.5 check after training.
      size: image side in pixels (square images).
      cells: (min, max) cells per image; crowded so neighbours touch.
      radius: (min, max) semi-axis of a cell ellipse in pixels (diameters ~16-30 px).
      n_epochs: training epochs (each visits every training image once).
      bsize: training tile side; equal to ``size`` so one tile covers an image.
      batch_size: tiles per optimiser step.
      learning_rate, weight_decay: AdamW settings passed to ``train_seg``.
      min_train_masks: images with fewer masks are skipped by cellpose (1 keeps all).
      seed: seeds the synthetic images and torch's weight initialisation.
    """

    n_train: int = 20
    n_test: int = 4
    size: int = 96
    cells: tuple[int, int] = (6, 11)
    radius: tuple[float, float] = (8.0, 15.0)
    n_epochs: int = 60
    bsize: int = 96
    batch_size: int = 8
    learning_rate: float = 0.005
    weight_decay: float = 1e-5
    min_train_masks: int = 1
    seed: int = 0


def synth_slice(rng: np.random.Generator, recipe: OfflineRecipe) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic two-channel slice with its instance labels.

    Cells are ellipses; where two ellipses overlap each pixel goes to the cell whose normalised
    elliptical distance is smallest, so touching neighbours share a boundary (a power-diagram
    split) as in crowded Cell Painting fields. Cytoplasm brightness differs per cell and falls off
    towards the edge, which gives the network a boundary cue between touching cells.

    Returns:
      image: (2, Y, X) float32, channel 0 = cytoplasm, channel 1 = nucleus (arbitrary units).
      labels: (Y, X) int32, 0 = background, 1..n = cells (each one connected component).
    """
    s = recipe.size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    n = int(rng.integers(recipe.cells[0], recipe.cells[1] + 1))
    best = np.full((s, s), np.inf)
    owner = np.zeros((s, s), np.int32)
    nuc = np.zeros((s, s))
    cyto = np.zeros((s, s))
    dist_of_owner = np.zeros((s, s))
    brightness = rng.uniform(0.35, 1.0, n)
    for i in range(n):
        cy, cx = rng.uniform(4, s - 4, 2)
        a, b = rng.uniform(*recipe.radius, 2)
        th = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(th) + dy * np.sin(th)) / a
        v = (-dx * np.sin(th) + dy * np.cos(th)) / b
        d = np.sqrt(u**2 + v**2)
        take = (d <= 1.0) & (d < best)
        best[take] = d[take]
        owner[take] = i + 1
        dist_of_owner[take] = d[take]
        # Nucleus: ~45 % of the cell's axes, slightly off-centre.
        off = rng.normal(0, 0.1, 2)
        dn = np.sqrt((u - off[0]) ** 2 + (v - off[1]) ** 2) / 0.45
        nuc = np.maximum(nuc, np.clip(1.2 - dn, 0, 1) * rng.uniform(0.6, 1.0))
    for i in range(n):
        sel = owner == i + 1
        cyto[sel] = brightness[i] * (1.0 - 0.55 * dist_of_owner[sel] ** 2)
    # A nucleus only shows where its cell is visible (occluded parts belong to the neighbour).
    nuc = nuc * (owner > 0)
    labels = _clean_labels(owner, min_area=30)
    texture = ndi.gaussian_filter(rng.normal(0, 1, (s, s)), 1.5)
    cyto = ndi.gaussian_filter(cyto * (1 + 0.25 * texture), 1.0)
    nuc = ndi.gaussian_filter(nuc, 1.0)
    image = np.stack([cyto, nuc]) * 200.0 + 20.0
    image = rng.poisson(np.clip(image, 0, None)).astype(np.float32) + rng.normal(0, 3, image.shape)
    return image.astype(np.float32), labels


def _clean_labels(owner: np.ndarray, min_area: int) -> np.ndarray:
    """Keep each label's largest connected component, drop those under ``min_area``, renumber."""
    out = np.zeros_like(owner)
    k = 0
    for lab in np.unique(owner[owner > 0]):
        comp, ncomp = ndi.label(owner == lab)
        if ncomp == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        if sizes.max() < min_area:
            continue
        k += 1
        out[comp == 1 + int(np.argmax(sizes))] = k
    return out


def synth_set(recipe: OfflineRecipe, n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` synthetic slices from :func:`synth_slice` with a fixed seed (deterministic)."""
    rng = np.random.default_rng(seed)
    pairs = [synth_slice(rng, recipe) for _ in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def cellpose_version() -> str:
    """Installed cellpose version string, e.g. '3.1.1.3' (without importing cellpose)."""
    return metadata.version("cellpose")


def recipe_key(recipe: OfflineRecipe) -> str:
    """Short hash of the recipe plus cellpose/torch versions: names the cached model file."""
    payload = json.dumps(
        {"recipe": asdict(recipe), "cellpose": cellpose_version(), "torch": metadata.version("torch"),
         "generator": _GENERATOR_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


# Bump when synth_slice changes in a way that changes the images (invalidates cached models).
_GENERATOR_VERSION = 1


def _require_cellpose3() -> None:
    major = int(cellpose_version().split(".")[0])
    if major != 3:
        raise RuntimeError(
            f"the offline model recipe needs cellpose 3.x (CPnet); found cellpose {cellpose_version()}. "
            "Cellpose 4 uses the Cellpose-SAM transformer, which cannot be trained from scratch here: "
            "install 'cellpose>=3.1,<3.2' for the offline model, or use a cellpose-4 model file."
        )


def average_precision(model, images: list[np.ndarray], labels: list[np.ndarray], threshold: float = 0.5) -> float:
    """Mean over images of TP / (TP + FP + FN) at IoU ``threshold`` (cellpose's 'AP' convention)."""
    from _segment_metrics import match_f1

    vals = []
    for img, lab in zip(images, labels):
        pred = model.eval(img, channels=[1, 2], channel_axis=0)[0]
        s = match_f1(lab, pred, threshold)
        denom = s.tp + s.fp + s.fn
        vals.append(s.tp / denom if denom else 1.0)
    return float(np.mean(vals))


def train_offline_model(out_path: str | os.PathLike, recipe: OfflineRecipe = OfflineRecipe(),
                        threads: int | None = None, gpu: bool = False) -> Path:
    """Train the offline Cellpose model and write it atomically to ``out_path``.

    A JSON sidecar ``<out_path>.json`` records the recipe, versions, training time, file size and
    the AP@0.5 measured on ``recipe.n_test`` held-out synthetic images.

    Args:
      out_path: destination file of the model weights (a torch state dict, cellpose 3 format).
      recipe: the training recipe.
      threads: torch CPU threads (None keeps torch's default).
      gpu: train on CUDA when available.

    Returns:
      ``out_path`` as a Path.
    """
    _require_cellpose3()
    import torch
    from cellpose import models, train

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(recipe.seed)
    train_x, train_y = synth_set(recipe, recipe.n_train, recipe.seed)
    test_x, test_y = synth_set(recipe, recipe.n_test, recipe.seed + 10_000)
    use_gpu = bool(gpu and torch.cuda.is_available())
    # pretrained_model=False: an untrained CPnet; nothing is looked up or downloaded.
    model = models.CellposeModel(gpu=use_gpu, pretrained_model=False, model_type=None)
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".train-") as tmp:
        path, _, _ = train.train_seg(
            model.net, train_data=train_x, train_labels=train_y, channels=[1, 2], channel_axis=0,
            n_epochs=recipe.n_epochs, bsize=recipe.bsize, batch_size=recipe.batch_size,
            learning_rate=recipe.learning_rate, weight_decay=recipe.weight_decay,
            min_train_masks=recipe.min_train_masks, save_path=tmp, save_every=10**9,
            model_name="offline",
        )
        seconds = time.perf_counter() - tic
        # Reload through the public API, as segment.py will, and check it on held-out images.
        trained = models.CellposeModel(gpu=use_gpu, pretrained_model=str(path))
        ap = average_precision(trained, test_x, test_y)
        meta = {
            "recipe": asdict(recipe), "key": recipe_key(recipe), "cellpose": cellpose_version(),
            "torch": metadata.version("torch"), "train_seconds": round(seconds, 1),
            "bytes": Path(path).stat().st_size, "ap50_heldout": ap,
            "diam_labels": float(trained.diam_labels),
        }
        sidecar = Path(tmp) / "meta.json"
        sidecar.write_text(json.dumps(meta, indent=2))
        # Weights first, then the sidecar: a sidecar present means a complete model.
        os.replace(path, out_path)
        os.replace(sidecar, out_path.with_name(out_path.name + ".json"))
    log.info("offline model %s: trained in %.0f s, AP@0.5 %.3f on held-out synthetic images", out_path, seconds, ap)
    return out_path


def cached_offline_model(cache_dir: str | os.PathLike, recipe: OfflineRecipe = OfflineRecipe(),
                         threads: int | None = None) -> Path:
    """Path of the offline model for ``recipe`` under ``cache_dir``, training it once if absent.

    The file is ``cellpose_offline_<key>`` with ``key = recipe_key(recipe)``, so a changed recipe
    or cellpose/torch version trains a new one instead of reusing a stale one.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / f"cellpose_offline_{recipe_key(recipe)}"
    if path.exists() and path.with_name(path.name + ".json").exists():
        return path
    return train_offline_model(path, recipe, threads=threads)


def read_offline_meta(model_path: str | os.PathLike) -> dict:
    """The JSON sidecar written next to an offline model."""
    p = Path(model_path)
    return json.loads(p.with_name(p.name + ".json").read_text())
