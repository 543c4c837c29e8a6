"""Shared steps of the synthetic studies (`confounders.py`, `regularizer.py`).

A study plate is the `demo` synthetic preset with three classes (control and two doses),
cropped tightly around each cell (5×32×32 voxels, of which the cell fills a measured
share: experiments/README.md, 'Measurements behind default settings') so that attention
on the cell of interest and attention elsewhere can be told apart at the resolution of an
intermediate CAM layer. Every step caches its output under the study folder, so an
interrupted study rerun with the same arguments continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from gradcamo_jax.config import DataConfig, TrainConfig
from gradcamo_jax.configs import smoke


@dataclasses.dataclass(frozen=True)
class PlateSpec:
    """A study plate (see `gradcamo_jax.data.synthetic.make_config`).

    Attributes:
      preset: synthetic preset.
      doses: treated doses; classes are control + these.
      wells_per_dose, sites_per_well: plate size.
      crop_size: stored crop (Z, Y, X); the model sees it whole.
      split_fractions: (train, val, test) fractions of each class's wells.
      cell_gain: `SynthConfig.cell_gain`. 0 here: a dose-dependent in-cell *gain* does not
        stay in the cell. Per-site percentile normalisation maps the brightest voxels (cells)
        to 1, so a brighter cell plate gets a relatively darker background with dose, which
        a "cell" model reads, putting much of its attention on background
        (experiments/README.md, 'Measurements behind default settings'). The cell signal is
        then the ER spread, Mito puncta and nucleus size. These still move a site's 99.8th
        percentile: on the neighbor plate, unmarked cells' own ER and Mito intensities fall
        with dose after normalisation (experiments/README.md, audit study), which
        `intensity_range` avoids.
      background_level: `SynthConfig.background_level`. The default 0.6 makes the
        background speckles the brightest voxels of the RNA channel, so normalisation
        dims the cells with dose (same section) and a "background" model can read the dose
        from the cells; at 0.25 the cells' percentiles are unmoved.
      intensity_range: `CropConfig.intensity_range`: a fixed raw (low, high) for every site
        instead of per-site percentiles; None = percentiles. The synthetic camera's offset
        is ~100 and its brightest voxels stay below ~1000.
    """

    preset: str = "demo"
    doses: tuple[float, ...] = (8.0, 40.0)
    wells_per_dose: int = 8
    sites_per_well: int = 2
    crop_size: tuple[int, int, int] = (5, 32, 32)
    split_fractions: tuple[float, float, float] = (0.6, 0.1, 0.3)
    cell_gain: float = 0.0
    background_level: float = 0.25
    intensity_range: tuple[float, float] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.doses) + 1


def train_config(plate: PlateSpec, steps: int, seed: int, **overrides) -> TrainConfig:
    """The study's model and optimiser: the package's smoke recipe on the whole crop."""
    base = smoke.get_config()
    cfg = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, num_classes=plate.num_classes),
        data=dataclasses.replace(base.data, eval_batch_size=64, crop_shape=None, downsample=(1, 1, 1)),
        seed=seed,
        num_steps=steps,
        warmup_steps=min(20, steps // 5),
        log_every=25,
        checkpoint_every=max(steps // 2, 1),
        keep_checkpoints=1,
        progress_bar=False,
    )
    return dataclasses.replace(cfg, **overrides)


def enable_compile_cache(path: Path) -> None:
    """Persist XLA compilations under `path`: every run of a study compiles the same train
    step, so all runs after the first load it instead of compiling again (saving per run:
    BENCHMARKS.md, 'Measurements behind code choices', experiments/study.py)."""
    import jax

    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def plate_dir(work: Path, signal: dict[str, float], seed: int, plate: PlateSpec) -> Path:
    """Cache folder of one plate: its name says what shapes it (signal, seed, size, e.g.
    ``background1.5+cell0.5/seed0_8w2s``), so a rerun with other settings never reuses a
    stale plate and the two studies can share a work folder."""
    name = "+".join(f"{k}{v:g}" for k, v in sorted(signal.items()))
    fixed = "" if plate.intensity_range is None else "_range{:g}-{:g}".format(*plate.intensity_range)
    return work / name / f"seed{seed}_{plate.wells_per_dose}w{plate.sites_per_well}s{fixed}"


def make_dataset(root: Path, signal, seed: int, plate: PlateSpec, synth: dict | None = None) -> Path:
    """Synthesise and crop one plate under ``root`` (cached); returns the cell dataset folder.
    `synth`: extra `synthetic.make_config` overrides (field size, cell radii, PSF); the cache
    folder is ``root`` whatever they are, so the caller names it after them."""
    from gradcamo_jax.data import crop, synthetic

    data = root / "data"
    if not (data / "cells.parquet").exists():
        plate_map = root / "plate" / synthetic.PLATE_MAP_NAME
        if not plate_map.exists():
            cfg = synthetic.make_config(plate.preset, signal=signal, seed=seed, doses=plate.doses,
                                        wells_per_dose=plate.wells_per_dose, sites_per_well=plate.sites_per_well,
                                        cell_gain=plate.cell_gain, background_level=plate.background_level,
                                        **(synth or {}))
            plate_map = synthetic.write_plate(cfg, root / "plate")
        crop.crop_plate(plate_map, data, crop.CropConfig(crop_size=plate.crop_size, min_volume=20, workers=0,
                                                         split_fractions=plate.split_fractions, split_seed=seed,
                                                         intensity_range=plate.intensity_range))
    return data


def train_model(data: Path, workdir: Path, config: TrainConfig) -> tuple[TrainConfig, dict, dict]:
    """Train (or resume/reuse) a run; returns ``(config, variables of the last step, timings)``."""
    from gradcamo_jax.config import config_from_dict, config_to_dict
    from gradcamo_jax.data import formats
    from gradcamo_jax.train import load_checkpoint, train_and_evaluate

    done = workdir / "trained.json"
    # Compared as configs, not as dicts: a run cached before a config gained a field (at its
    # default) is the same run.
    if done.exists() and config_from_dict(TrainConfig, json.loads(done.read_text()).get("config") or {}) != config:
        raise ValueError(f"{workdir} holds a run of another configuration; use a new --work folder")
    if not done.exists():
        t = time.perf_counter()
        out = train_and_evaluate(config, workdir, data)
        formats.write_json({"seconds": time.perf_counter() - t, "steps_per_second": out["steps_per_second"],
                            "val": out["val"], "config": config_to_dict(config)}, done)
    info = json.loads(done.read_text())
    trained, variables = load_checkpoint(workdir, "latest")
    return trained, variables, info


def load_split(data: Path, split: str = "test") -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """All crops of one split in memory: images ``(N, Z, Y, X, C)`` float32, masks ``(N, Z, Y, X)``
    uint8, and their rows of the cell table joined with the plate's ground truth."""
    from gradcamo_jax.data import formats, pipeline, synthetic

    # open_dataset maps cells to store rows and takes the stored split (checked by well).
    ds = pipeline.open_dataset(str(data), DataConfig())
    source = ds.sources[split]
    cells = ds.cells[ds.cells["split"] == split].drop(columns="split").reset_index(drop=True)
    items = [source[i] for i in range(len(source))]
    images = np.stack([it["image"] for it in items])
    masks = np.stack([it["mask"] for it in items])
    truth_path = data.parent / "plate" / synthetic.GROUND_TRUTH_TABLE
    if truth_path.exists():
        truth = formats.read_table(truth_path)
        keys = [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber")
                if c in truth.columns]
        cells = cells.merge(truth[keys + ["Marked"]], on=keys, how="left", validate="one_to_one")
    return images, masks, cells


@functools.lru_cache(maxsize=32)
def _maps_fn(model, layer: str, methods: tuple[str, ...]):
    """Jitted per-batch scores of every method at one layer: the activation and its gradient
    are method-independent, so the trunk is traced (and compiled) once per layer, not once per
    (layer, method) as separate `explain` calls would be. The steps are `explain`'s own:
    `layer_gradient`, `batch_cams`, `gradcamo.scores`."""
    import jax

    from gradcamo_jax.cam import batch_cams, layer_gradient
    from gradcamo_jax.metric import scores

    def batch(variables, x, mask):
        _, target, _, _, a, g = layer_gradient(model, variables, x, None, layer)
        out = {"predicted": target}
        for m in methods:
            r = scores(batch_cams(a, g, m, x.shape[1:-1]), mask)
            out[m] = {"gradcamo": r.cell, "neighbors": r.neighbors, "background": r.background,
                      "chance": r.chance}
        return out

    return jax.jit(batch)


def score_cells(model, variables, images, masks, *, layer: str, methods: tuple[str, ...],
                batch: int = 64) -> dict[str, pd.DataFrame]:
    """Per-cell prediction and Grad-CAMO split (predicted-class CAM) for each method at `layer`.

    images ``(N, Z, Y, X, C)``, masks ``(N, Z, Y, X)``; returns method → DataFrame of N rows
    (predicted, gradcamo, neighbors, background, chance). Agrees with `gradcamo_jax.explain`
    (tests/test_regularizer.py checks it)."""
    fn = _maps_fn(model, layer, tuple(methods))
    parts = {m: [] for m in methods}
    for s in range(0, len(images), batch):
        x, m_ = images[s:s + batch], masks[s:s + batch]
        n = len(x)
        if n < batch:  # one compiled shape: pad the last batch
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
            m_ = np.concatenate([m_, np.zeros((batch - n, *m_.shape[1:]), m_.dtype)])
        out = fn(variables, x, m_)
        pred = np.asarray(out["predicted"])[:n]
        for m in methods:
            parts[m].append(pd.DataFrame({"predicted": pred, **{k: np.asarray(v, np.float64)[:n]
                                                                 for k, v in out[m].items()}}))
    return {m: pd.concat(p, ignore_index=True) for m, p in parts.items()}


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of a score telling `positive` from `negative` (NaNs dropped),
    by scikit-learn; NaN when either side is empty."""
    from sklearn.metrics import roc_auc_score

    p, n = np.asarray(positive, float), np.asarray(negative, float)
    p, n = p[np.isfinite(p)], n[np.isfinite(n)]
    if not len(p) or not len(n):
        return float("nan")
    return float(roc_auc_score(np.r_[np.ones(len(p)), np.zeros(len(n))], np.r_[p, n]))


def mean_sd(values) -> dict:
    """``{"mean", "sd", "n"}`` of finite values (sample s.d., ddof = 1)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    return {"mean": float(v.mean()) if len(v) else float("nan"),
            "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"), "n": int(len(v))}


def arg_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The options both studies share: --out, --work, --quick, --seeds, --steps."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--work", default=None, help="cache folder (default OUT/work; the two studies may share it)")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--steps", type=int)
    return p


def start(args: argparse.Namespace, name: str):
    """Output and cache folders of a study run (created, XLA compile cache on) and its logger
    (elapsed seconds in front of every line). Returns ``(out, work, log)``."""
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    enable_compile_cache(work / "jax_cache")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{name} {time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    return out, work, log


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
