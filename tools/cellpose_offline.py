"""Build a small Cellpose model with no network: train an untrained CPnet on synthetic 2D slices.

Why: pretrained Cellpose weights (cyto3, nuclei, cpsam) download from the internet on first use.
Tests, CI and air-gapped users need a model made here. The recipe below trains the default
Cellpose-3 network (CPnet, 6.6 M parameters) from random weights with ``cellpose.train.train_seg``
on two-channel z-slices (AGP = cell body, DNA = nucleus) of the project's own synthetic plates
(crowded, touching cells; ``gradcamo_jax.data.synthetic``). It is a stand-in for testing the
tooling and for the synthetic demo, not a replacement for cyto3 on real data: it has only ever
seen synthetic cells.

Cellpose 3.x only: cellpose 4 replaced CPnet with the Cellpose-SAM transformer (cpsam), whose
from-scratch training is out of reach on a CPU; under 4.x :func:`train_offline_model` refuses
with a clear message.

Only tools/ imports torch/cellpose; this module imports them lazily inside functions so that the
synthetic-image helpers stay importable without them.
"""

from __future__ import annotations

import functools
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

    Training images are z-slices of synthetic Cell Painting sites from
    ``gradcamo_jax.data.synthetic`` (the "demo" preset geometry, with its own seed so test plates
    are unseen): channel 0 = AGP (membrane rim + actin, the cell body), channel 1 = DNA.

    Attributes:
      n_train: number of training slices (taken from ``n_train // slices_per_site`` sites).
      n_test: held-out slices (other sites) for the AP@0.5 check after training.
      slices_per_site: slices drawn per synthetic site, spread over its middle z range.
      field: (Z, Y, X) of the synthetic sites the slices come from.
      cell_radius: (z, y, x) mean semi-axes of the synthetic cells (diameter ~22 px in XY).
      diam_mean: the diameter the network rescales cells to (Cellpose's default is 30). 15 lets
        a 32-pixel tile hold as many cells as a 64-pixel one at 30, for a quarter of the compute;
        it is stored in the model file and eval rescales by it.
      n_epochs: training epochs. ``train_seg`` warms the learning rate up over the first 10
        and, above 100 epochs, halves it every 5 epochs over the last 50 (the annealing is
        what lifts AP@0.5 from ~0.8 to ~0.9 here, so keep ``n_epochs`` above 100).
      nimg_per_epoch: slices drawn (at random, with replacement) per epoch; None = every
        training slice once. Equal to ``batch_size``, an epoch is one optimiser step, so the
        warm-up and annealing count in steps.
      bsize: training tile side.
      batch_size: tiles per optimiser step.
      learning_rate, weight_decay: AdamW settings passed to ``train_seg``.
      min_train_masks: slices with fewer masks are skipped by cellpose (1 keeps all).
      seed: seeds the synthetic sites and torch's weight initialisation.
    """

    n_train: int = 20
    n_test: int = 4
    slices_per_site: int = 2
    field: tuple[int, int, int] = (9, 96, 96)
    cell_radius: tuple[float, float, float] = (2.5, 11.0, 11.0)
    diam_mean: float = 15.0
    n_epochs: int = 120
    nimg_per_epoch: int | None = 4
    bsize: int = 32
    batch_size: int = 4
    learning_rate: float = 0.005
    weight_decay: float = 1e-5
    min_train_masks: int = 1
    seed: int = 0


def synth_slices(recipe: OfflineRecipe, n: int, first_site: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` training slices from synthetic sites ``first_site, first_site + 1, ...`` (deterministic).

    Returns:
      images: list of (2, Y, X) float32, channel 0 = AGP, channel 1 = DNA.
      labels: list of (Y, X) int32 true labels of the same slices (0 = background).
    """
    from gradcamo_jax.data import formats, synthetic

    config = synthetic.SynthConfig(
        field_shape=recipe.field, cell_radius=recipe.cell_radius, cells_per_site=20,
        psf_sigma=(0.8, 0.7, 0.7), seed=10_000 + recipe.seed,
    )
    agp, dna = formats.CHANNELS.index("AGP"), formats.CHANNELS.index("DNA")
    z_mid = recipe.field[0] // 2
    offsets = np.linspace(-1, 1, recipe.slices_per_site).round().astype(int) if recipe.slices_per_site > 1 else [0]
    images, labels = [], []
    site = first_site
    while len(images) < n:
        # Classes cycle so the training set sees every dose's appearance.
        stack, lab, _, _ = synthetic.synth_site(config, site % (len(config.doses) + 1), site)
        for dz in offsets:
            if len(images) < n:
                z = int(np.clip(z_mid + dz, 0, recipe.field[0] - 1))
                images.append(stack[z][[agp, dna]].astype(np.float32))
                labels.append(_clean_labels(lab[z], min_area=10))
        site += 1
    return images, labels


def _clean_labels(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Keep each label's largest connected component, drop those under ``min_area``, renumber."""
    out = np.zeros(labels.shape, np.int32)
    k = 0
    for lab in np.unique(labels[labels > 0]):
        comp, ncomp = ndi.label(labels == lab)
        if ncomp == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        if sizes.max() < min_area:
            continue
        k += 1
        out[comp == 1 + int(np.argmax(sizes))] = k
    return out


def cellpose_version() -> str:
    """Installed cellpose version string, e.g. '3.1.1.3' (without importing cellpose)."""
    return metadata.version("cellpose")


def recipe_key(recipe: OfflineRecipe) -> str:
    """Short hash naming the cached model: the recipe, cellpose/torch versions and the bytes of
    the training and held-out slices themselves (so an edit of the synthetic generator that
    changes them trains a new model, and one that does not keeps the cache)."""
    payload = json.dumps(
        {"recipe": asdict(recipe), "cellpose": cellpose_version(), "torch": metadata.version("torch"),
         "data": training_data_hash(recipe)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=4)
def training_data_hash(recipe: OfflineRecipe) -> str:
    """SHA-256 (12 hex digits) of the recipe's training and held-out slices and labels."""
    h = hashlib.sha256()
    for first, n in ((0, recipe.n_train), (_TEST_FIRST_SITE, recipe.n_test)):
        images, labels = synth_slices(recipe, n, first)
        for a in (*images, *labels):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:12]


# Held-out slices come from sites far after the training ones.
_TEST_FIRST_SITE = 1000


def _require_cellpose3() -> None:
    major = int(cellpose_version().split(".")[0])
    if major != 3:
        raise RuntimeError(
            f"the offline model recipe needs cellpose 3.x (CPnet); found cellpose {cellpose_version()}. "
            "Cellpose 4 uses the Cellpose-SAM transformer, which cannot be trained from scratch here: "
            "install 'cellpose>=3.1,<3.2' for the offline model, or use a cellpose-4 model file."
        )


def average_precision(model, images: list[np.ndarray], labels: list[np.ndarray], threshold: float = 0.5,
                      tile: int = 224) -> float:
    """Mean over images of TP / (TP + FP + FN) at IoU ``threshold`` (cellpose's 'AP' convention)."""
    from gradcamo_jax.data.seg_metrics import match_f1

    vals = []
    for img, lab in zip(images, labels):
        pred = model.eval(img, channels=[1, 2], channel_axis=0, bsize=tile)[0]
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
    train_x, train_y = synth_slices(recipe, recipe.n_train, 0)
    test_x, test_y = synth_slices(recipe, recipe.n_test, _TEST_FIRST_SITE)
    use_gpu = bool(gpu and torch.cuda.is_available())
    # pretrained_model=False: an untrained CPnet; nothing is looked up or downloaded.
    model = models.CellposeModel(gpu=use_gpu, pretrained_model=False, model_type=None, diam_mean=recipe.diam_mean)
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".train-") as tmp:
        path, _, _ = train.train_seg(
            model.net, train_data=train_x, train_labels=train_y, channels=[1, 2], channel_axis=0,
            n_epochs=recipe.n_epochs, bsize=recipe.bsize, batch_size=recipe.batch_size,
            learning_rate=recipe.learning_rate, weight_decay=recipe.weight_decay,
            min_train_masks=recipe.min_train_masks, nimg_per_epoch=recipe.nimg_per_epoch, save_path=tmp, save_every=10**9,
            model_name="offline",
        )
        seconds = time.perf_counter() - tic
        # Reload through the public API, as segment.py will, and check it on held-out images.
        trained = models.CellposeModel(gpu=use_gpu, pretrained_model=str(path))
        ap = average_precision(trained, test_x, test_y)
        meta = {
            "recipe": asdict(recipe), "key": recipe_key(recipe), "cellpose": cellpose_version(),
            "torch": metadata.version("torch"), "train_seconds": round(seconds, 1),
            "bytes": Path(path).stat().st_size, "data": training_data_hash(recipe), "ap50_heldout": ap,
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
