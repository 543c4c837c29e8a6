"""Audit study (issue 19): which per-cell audit measures tell a model that reads the cell from one that cheats?

The confounder study (``confounders.py``) found Grad-CAMO weak per cell. This study
validates the audit of `gradcamo_jax.audit` against the planted ground truth, per cell:

* **models**: the tiny EfficientNet trained on synthetic plates whose dose signal sits in a
  known place (`PLATES`: cell, background, neighbor, site, mixture, and neighbor_only = the
  neighbor plate's unmarked cells only, whose dose is in their neighbours alone), per seed
  (a seed draws a new plate, split and initialisation), plus two controls scored on the
  cell plate: ``untrained`` (random initial weights, BatchNorm calibrated) and
  ``permuted`` (trained on the cell plate with its class labels permuted across wells, so
  it can only memorise wells);
* **measures** per test cell: raw Grad-CAMO on a grid of layers × CAM methods
  (``gc_<layer>_<method>``); the same corrected for a random-weight model of the same
  architecture (``cgc_…``, `audit.random_baseline`; one random model per seed and
  geometry); counterfactual reliance, the drop of the predicted class's log-probability
  when a region is replaced by a fill (``drop_<region>_<fill>``, `audit.model_reliance`;
  "swap" donors are control cells of the same plate's training wells) and the
  context-reliance index per fill (``cri_<fill>``); the interchange test (`audit.interchange`:
  the cell's context, then its cell, swapped with those of `Config.swap_donors` training-well
  cells of every class; ``swap_context`` / ``swap_cell`` = how far the prediction follows
  each, ``xri`` = their index); and per model the fill sanity check (`audit.fill_sanity` on
  the control test cells);
* **statistics**: per-cell AUROC of the cell model's cells vs each other model's cells;
  marked vs unmarked cells inside the neighbor model (all, treated, confident, correct);
  a model-level verdict whose threshold is set on the first seed and tested on the
  others; Spearman correlation of Grad-CAMO with context reliance inside each model; and
  the cost of each measure in cells/s next to plain `explain`.

Orientation: every AUROC is P(a cell-model cell looks *more cell-reliant* than the other
model's cell); measures marked −1 (context drops, CRI: "higher context reliance =
shortcut") are negated before ranking, so 0.5 is no separation and 1 perfect for all.

    python -m experiments.audit --smoke --work /tmp/auditwork --out /tmp/auditout   # ≈ 4-5 min, 2 cores, cold
    python -m experiments.audit --quick --out DIR                                   # CPU study (fine_fixed, 1 seed), ≤ 20 min
    python -m experiments.audit --out DIR                                           # full: meant for a GPU

Writes ``OUT/audit.json``, ``OUT/audit_cells.parquet`` (one row per test cell per model)
and ``OUT/audit.png``; plates, trained models and per-model score tables are cached under
``WORK`` (resumable; the tiny-geometry plates and models are shared with confounders.py
when both use the same work folder and settings).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from experiments import study
from experiments.confounders import MODES, SHORTCUTS

CONTROLS = ("untrained", "permuted")
"""Control models, scored on the cell plate."""
PLATES: dict[str, dict[str, float]] = {**MODES, "neighbor_only": MODES["neighbor"]}
"""Study mode → the signal of its plate. ``neighbor_only`` is the neighbor plate with only its
unmarked cells as the cells of interest (trained and tested on): the central cell never
carries the dose, only its marked neighbours do, so the model's evidence is all context."""
SHORTCUT_MODES = (*SHORTCUTS, "neighbor_only")
REGIONS = ("background", "neighbors", "cell", "context")
FILLS = ("noise", "blur", "mean", "swap")
ORIENTATION_TEXT = ("+1: higher = more reliant on the central cell (expected higher in the cell model and in "
                    "marked cells); -1: higher = more reliant on context (a shortcut), negated before the AUROC")
CONFIDENT = 0.8
"""p(predicted class) above which a cell counts as confidently predicted."""


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Geometry:
    """One crop geometry of the study.

    Attributes:
      name: "tiny" (the confounder study's plates, cached in the same folders) or another
        name (its plates live under ``WORK/<name>/``).
      plate: `study.PlateSpec` (crop size, wells, sites).
      synth: extra `SynthConfig` overrides (field size, cell radii, PSF) as pairs.
      modes, seeds: plates trained here.
      controls: `CONTROLS` run on the cell plate of every seed (when "cell" is among modes).
      blur_sigma: the "blur" fill's SD per axis (Z, Y, X), voxels.
      batch: cells per chunk of explain / reliance (reliance forwards 17× as many crops).
      time_cells: test cells of the first seed's cell model timed for the cost table.
    """

    name: str
    plate: study.PlateSpec
    synth: tuple[tuple[str, object], ...] = ()
    modes: tuple[str, ...] = tuple(MODES)
    seeds: tuple[int, ...] = (0, 1, 2)
    controls: tuple[str, ...] = CONTROLS
    blur_sigma: tuple[float, float, float] = (0.5, 2.0, 2.0)
    batch: int = 32
    time_cells: int = 128


FINE_SYNTH = (("field_shape", (9, 192, 192)), ("cell_radius", (3.5, 22.0, 22.0)),
              ("psf_sigma", (0.8, 1.4, 1.4)), ("cells_per_site", 20))
"""The demo preset scaled 2× in X and Y (and cells 1.4× deeper): 9×64×64 crops hold a cell
and its neighbours as 5×32×32 crops do on the demo preset, at twice the resolution, so the
stem's map is 9×32×32 and stage2's 5×16×16 (tiny: 5×16×16 and 3×8×8)."""


FIXED_RANGE = (100.0, 1000.0)
"""The fine_fixed geometry's `PlateSpec.intensity_range` (the synthetic camera's offset, and a
level above its brightest voxels)."""


def tiny(plate: study.PlateSpec, **kw) -> Geometry:
    return Geometry("tiny", plate, **kw)


def fine(plate: study.PlateSpec, name: str = "fine", **kw) -> Geometry:
    return Geometry(name, dataclasses.replace(plate, crop_size=(9, 64, 64)), FINE_SYNTH,
                    blur_sigma=(1.0, 4.0, 4.0), **{"batch": 8, "time_cells": 64, **kw})


def fine_fixed(plate: study.PlateSpec, **kw) -> Geometry:
    """The fine geometry cropped with a fixed intensity range instead of per-site percentiles,
    so no cell's intensities depend on the rest of its site (the neighbor plate's unmarked
    cells carry no dose in their own voxels)."""
    return fine(dataclasses.replace(plate, intensity_range=FIXED_RANGE), name="fine_fixed", **kw)


@dataclasses.dataclass(frozen=True)
class Config:
    """Study size. `QUICK` is the CPU setting, `SMOKE` a ≤ 4-minute check; the default is meant for a GPU."""

    geometries: tuple[Geometry, ...] = (
        tiny(study.PlateSpec(wells_per_dose=12, sites_per_well=3), seeds=(0, 1, 2, 3, 4), modes=tuple(PLATES)),
        fine(study.PlateSpec(wells_per_dose=12, sites_per_well=3), seeds=(0, 1, 2, 3, 4), modes=tuple(PLATES),
             batch=32, time_cells=128),
        fine_fixed(study.PlateSpec(wells_per_dose=12, sites_per_well=3), seeds=(0, 1, 2, 3, 4), modes=tuple(PLATES),
                   batch=32, time_cells=128),
    )
    steps: int = 600
    layers: tuple[str, ...] = ("stem", "stage1", "stage2")
    methods: tuple[str, ...] = ("gradcam", "layercam")
    regions: tuple[str, ...] = REGIONS
    fills: tuple[str, ...] = FILLS
    donors: int = 128
    swap_donors: int = 2
    """Interchange donors per class and test cell (training-well cells of each class)."""


QUICK = Config(
    geometries=(
        tiny(study.PlateSpec(wells_per_dose=8, sites_per_well=2), seeds=(0, 1, 2), modes=tuple(PLATES)),
        # ≈ 3 min per trained model on 2 idle cores (plate, training, every measure): one seed, the
        # cell model, the two spatially separable shortcuts (background; neighbours only) and the
        # untrained control, one site per well. More with --modes/--seeds/--controls.
        fine(study.PlateSpec(wells_per_dose=8, sites_per_well=1), seeds=(0,), modes=("cell", "background", "neighbor_only"),
             controls=("untrained",)),
        fine_fixed(study.PlateSpec(wells_per_dose=8, sites_per_well=1), seeds=(0,),
                   modes=("cell", "background", "neighbor_only"), controls=("untrained",)),
    ),
    steps=200,
)
QUICK_GEOMETRIES = ("fine_fixed",)
"""--quick runs the fine geometry cropped with a fixed intensity range (no normalisation leak
between a cell and its site) unless --geometries names others: the tiny geometry's 24 models
(3 seeds) take ≈ 30 min more, and its measures separate little (experiments/README.md)."""
SMOKE = Config(
    geometries=(
        tiny(study.PlateSpec(wells_per_dose=4, sites_per_well=2), seeds=(0,), modes=("cell", "neighbor"), time_cells=32),
        fine(study.PlateSpec(wells_per_dose=4, sites_per_well=1), seeds=(0,), modes=("cell", "neighbor"), time_cells=16),
    ),
    steps=40,
    layers=("stem", "stage2"),
)
"""Smoke: by default only the tiny geometry runs (``--geometries`` picks); most of its time is
compilation (train step, the Grad-CAMO grid, reliance, fill sanity), paid once per work folder."""
SMOKE_GEOMETRIES = ("tiny",)


# ----------------------------------------------------------------------------- data and models


def plate_root(work: Path, geometry: Geometry, signal: dict[str, float], seed: int) -> Path:
    base = work if geometry.name == "tiny" else work / geometry.name
    return study.plate_dir(base, signal, seed, geometry.plate)


def make_plate(root: Path, signal: dict[str, float], seed: int, geometry: Geometry) -> Path:
    """`study.make_dataset` with the geometry's extra synthetic settings (cached under `root`)."""
    return study.make_dataset(root, signal, seed, geometry.plate, dict(geometry.synth))


def balanced_permutation(well_class: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """New labels for wells of true classes `well_class`: each class's wells are dealt the
    labels in turn (from a random offset, in random order within the class), so every
    label gets its wells as evenly as possible from every true class and the label counts
    stay balanced. A plain shuffle of a few wells leaves labels correlated with the truth."""
    well_class = np.asarray(well_class)
    order = np.lexsort((rng.permutation(len(well_class)), well_class))
    labels = np.empty(len(well_class), np.int64)
    labels[order] = (int(rng.integers(num_classes)) + np.arange(len(well_class))) % num_classes
    return labels


def permuted_dataset(root: Path, data: Path, seed: int, num_classes: int) -> Path:
    """A copy of the cell dataset `data` whose ``Metadata_Class`` is permuted across wells
    (`balanced_permutation`, within each split so the stored split stays valid); the crops
    are shared through a symlink to ``data/crops.zarr``."""
    from gradcamo_jax.data import formats
    from gradcamo_jax.data.splits import WELL_KEYS

    out = root / "permuted" / "data"
    if (out / formats.CELLS_FILE).exists():
        return out
    cells = formats.read_cells(data)
    keys = list(WELL_KEYS)
    wells = cells.groupby(keys, sort=True).agg(cls=("Metadata_Class", "first"), split=("Metadata_Split", "first"))
    rng = np.random.default_rng([seed, 19])
    wells["label"] = -1
    for _, g in wells.groupby("split", sort=True):
        wells.loc[g.index, "label"] = balanced_permutation(g["cls"].to_numpy(), num_classes, rng)
    new = cells.merge(wells["label"].reset_index(), on=keys, how="left", validate="many_to_one")
    cells = cells.assign(Metadata_Class=new["label"].to_numpy(cells["Metadata_Class"].dtype))
    out.mkdir(parents=True, exist_ok=True)
    link = out / "crops.zarr"
    if not link.exists():
        os.symlink(os.path.relpath(data / "crops.zarr", out), link)
    formats.write_cells(cells, out)
    return out


def unmarked_dataset(root: Path, data: Path) -> Path:
    """A copy of the neighbor plate's cell dataset `data` holding only its unmarked cells (the
    ground truth's ``Marked`` False); the crops and the plate folder are shared through symlinks."""
    from gradcamo_jax.data import formats, synthetic

    out = root / "unmarked" / "data"
    if (out / formats.CELLS_FILE).exists():
        return out
    cells = formats.read_cells(data)
    truth = formats.read_table(data.parent / "plate" / synthetic.GROUND_TRUTH_TABLE)
    keys = [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber") if c in truth]
    marked = cells[keys].merge(truth[keys + ["Marked"]], on=keys, how="left", validate="one_to_one")["Marked"]
    if marked.isna().any():
        raise RuntimeError(f"{data}: {int(marked.isna().sum())} cells have no ground-truth row")
    out.mkdir(parents=True, exist_ok=True)
    for name, target in (("crops.zarr", data / "crops.zarr"), ("plate", data.parent / "plate")):
        link = (out / name) if name == "crops.zarr" else out.parent / name
        if not link.exists():
            os.symlink(os.path.relpath(target, link.parent), link)
    formats.write_cells(cells[~marked.to_numpy(bool)].reset_index(drop=True), out)
    return out


def kind_of(mode: str) -> str:
    """How the model of a study mode is made: a control's name, "unmarked" (trained on the
    neighbor plate's unmarked cells) or "trained"."""
    return mode if mode in CONTROLS else "unmarked" if mode == "neighbor_only" else "trained"


def signal_of(mode: str) -> dict[str, float]:
    """The plate a mode's model is trained on (controls: the cell plate)."""
    return MODES["cell"] if mode in CONTROLS else PLATES[mode]


def cells_of_interest(root: Path, data: Path, mode: str) -> Path:
    """The dataset whose test cells a mode's model is scored on."""
    return unmarked_dataset(root, data) if kind_of(mode) == "unmarked" else data


def load_rows_masks(data: Path, split: str, limit: int | None = None, classes: tuple[int, ...] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(n, Z, Y, X, C)`` and masks ``(n, Z, Y, X)`` of the first `limit` cells of `split`
    (of `classes` only)."""
    from gradcamo_jax.config import DataConfig
    from gradcamo_jax.data import pipeline

    source = pipeline.open_dataset(str(data), DataConfig()).sources[split]
    idx = np.arange(len(source)) if classes is None else np.flatnonzero(np.isin(source.labels, classes))
    items = [source[int(i)] for i in idx[:limit]]
    return np.stack([it["image"] for it in items]), np.stack([it["mask"] for it in items])


def load_rows(data: Path, split: str, limit: int | None = None, classes: tuple[int, ...] | None = None) -> np.ndarray:
    """Images ``(n, Z, Y, X, C)`` of `load_rows_masks`."""
    return load_rows_masks(data, split, limit, classes)[0]


def swap_donors(data: Path, n: int, config: Config, num_classes: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The interchange donors of `n` test cells: the pool ``(P, Z, Y, X, C)`` images and masks,
    `Config.donors` training cells of each class, and ``(n, num_classes · Config.swap_donors)``
    pool rows per test cell (`swap_donor_index`)."""
    pools = [load_rows_masks(data, "train", config.donors, (k,)) for k in range(num_classes)]
    index = swap_donor_index(n, [len(p[0]) for p in pools], config.swap_donors, seed)
    return np.concatenate([p[0] for p in pools]), np.concatenate([p[1] for p in pools]), index


def swap_donor_index(n: int, pools: list[int], per_class: int, seed: int) -> np.ndarray:
    """``(n, len(pools) · per_class)`` donor rows: for test cell i, `per_class` cells of each
    class's pool (``pools[k]`` cells, rows offset by the earlier pools), dealt from one
    permutation per class so consecutive cells get different donors."""
    rng = np.random.default_rng([seed, 29])
    cols, offset = [], 0
    for size in pools:
        perm = rng.permutation(size)
        slots = np.arange(n)[:, None] * per_class + np.arange(per_class)[None, :]
        cols.append(offset + perm[slots % size])
        offset += size
    return np.concatenate(cols, axis=1)


@dataclasses.dataclass
class Fitted:
    model: object
    variables: dict
    info: dict


def fit(kind: str, mode: str, root: Path, data: Path, seed: int, geometry: Geometry, config: Config) -> Fitted:
    """The model of one row of the study: trained on `mode`'s plate, or a control."""
    import jax

    from gradcamo_jax import EfficientNet, audit

    cfg = study.train_config(geometry.plate, config.steps, seed)
    if kind in ("trained", "permuted", "unmarked"):
        train_data, workdir = data, root
        if kind == "permuted":  # the cell plate with its labels permuted across wells, in its own run folder
            train_data, workdir = permuted_dataset(root, data, seed, geometry.plate.num_classes), root / "permuted"
        if kind == "unmarked":  # the neighbor plate's unmarked cells only, in its own run folder
            train_data, workdir = unmarked_dataset(root, data), root / "unmarked"
        trained, variables, info = study.train_model(train_data, workdir / f"run_{config.steps}steps", cfg)
        return Fitted(EfficientNet(trained.model), variables, info)
    # untrained: as confounders.run_untrained (initial weights of this seed, BatchNorm calibrated)
    variables = audit.randomized_variables(cfg.model, jax.random.key(seed), load_rows(data, "train", 64))
    return Fitted(EfficientNet(cfg.model), variables, {})


# ----------------------------------------------------------------------------- measures


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    """`x` with its last row repeated up to `size` rows (one compiled shape per chunk)."""
    return x if len(x) == size else np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def chunked(fn, arrays: tuple[np.ndarray, ...], batch: int):
    """``fn(*chunk)`` over chunks of `batch` rows (the last padded); yields ``(out, valid)``."""
    n = len(arrays[0])
    for s in range(0, n, batch):
        part = tuple(a[s:s + batch] for a in arrays)
        k = len(part[0])
        yield fn(*(_pad(a, batch) for a in part)), k


def reliance_settings(config: Config, geometry: Geometry, regions=None, fills=None):
    from gradcamo_jax import audit

    regions, fills = tuple(regions or config.regions), tuple(fills or config.fills)
    return audit.RelianceSettings(regions=regions, fills=fills, fill=audit.FillSettings(blur_sigma=geometry.blur_sigma),
                                  cri_fill="noise" if {"cell", "context"} <= set(regions) and "noise" in fills else None)


def donor_crops(donors: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``(n, ...)``: test cell i takes control crop ``donors[perm[i mod len]]``."""
    perm = np.random.default_rng([seed, 23]).permutation(len(donors))
    return donors[perm[np.arange(n) % len(donors)]]


@functools.lru_cache(maxsize=16)
def grid_fn(model, layer: str, methods: tuple[str, ...]):
    """Jitted ``(variables, images, masks, targets) -> {"target", method: GradCAMOResult}``: the
    steps of `gradcamo_jax.explain` (`layer_gradient`, `batch_cams`, `scores`) for every method
    at one layer, targets -1 = predicted. One compilation serves the trained model (-1) and the
    random model (the trained model's classes), as `audit.random_baseline` pairs them; that
    runs `explain` once per (layer, method, model) and compiled 2× as often here
    (`Study.cost` checks the two agree)."""
    import jax

    from gradcamo_jax.cam import batch_cams, layer_gradient
    from gradcamo_jax.metric import scores

    def batch(variables, x, mask, targets):
        _, target, _, _, a, g = layer_gradient(model, variables, x, targets, layer)
        return {"target": target, **{m: scores(batch_cams(a, g, m, x.shape[1:-1]), mask) for m in methods}}

    return jax.jit(batch)


def score_model(fitted: Fitted, images, masks, donors, random_variables, key, geometry: Geometry,
                config: Config) -> pd.DataFrame:
    """Every measure of every test cell of one model: one row per cell."""
    from gradcamo_jax import audit

    model, variables = fitted.model, fitted.variables
    cols: dict[str, np.ndarray] = {}
    n = len(images)
    for layer in config.layers:
        fn = grid_fn(model, layer, tuple(config.methods))
        parts: dict[str, list] = {}
        for s0 in range(0, n, geometry.batch):
            x, m = _pad(images[s0:s0 + geometry.batch], geometry.batch), _pad(masks[s0:s0 + geometry.batch], geometry.batch)
            k = min(geometry.batch, n - s0)
            trained = fn(variables, x, m, np.full(len(x), -1, np.int32))
            rand = fn(random_variables, x, m, trained["target"])
            parts.setdefault("predicted", []).append(np.asarray(trained["target"])[:k])
            parts.setdefault("chance", []).append(np.asarray(trained[config.methods[0]].chance, np.float64)[:k])
            for method in config.methods:
                g, r = trained[method].cell, rand[method].cell
                corrected, _ = audit.corrected_gradcamo(g, r)
                for name, v in ((f"gc_{layer}_{method}", g), (f"rgc_{layer}_{method}", r),
                                (f"cgc_{layer}_{method}", corrected)):
                    parts.setdefault(name, []).append(np.asarray(v, np.float64)[:k])
        for name, v in parts.items():
            cols.setdefault(name, np.concatenate(v))
    settings = reliance_settings(config, geometry)
    rel = audit.model_reliance(model, variables, images, masks, key=key, donors=donors, settings=settings,
                               batch_size=geometry.batch)
    cols["p_pred"] = np.exp(np.asarray(rel.logp0, np.float64))
    if not np.array_equal(np.asarray(rel.predicted), cols["predicted"]):
        raise RuntimeError("reliance and the Grad-CAMO grid disagree on the predicted class")
    empty = np.asarray(rel.empty)
    for region in settings.regions:
        for fill in settings.fills:
            d = np.asarray(rel.drop(region, fill), np.float64)
            cols[f"drop_{region}_{fill}"] = np.where(empty[:, settings.regions.index(region)], np.nan, d)
    if {"cell", "context"} <= set(settings.regions):
        for fill in settings.fills:
            cri, undefined = audit.context_reliance_index(rel.drop("context", fill), rel.drop("cell", fill), settings.eps)
            bad = np.asarray(undefined) | empty[:, settings.regions.index("cell")] | empty[:, settings.regions.index("context")]
            cols[f"cri_{fill}"] = np.where(bad, np.nan, np.asarray(cri, np.float64))
    return pd.DataFrame(cols)


def sanity_rows(fitted: Fitted, images, masks, classes, key, geometry: Geometry, config: Config) -> list[dict]:
    """`audit.fill_sanity` on the model's control test cells, one row per fill."""
    from gradcamo_jax import audit

    ctrl = np.flatnonzero(np.asarray(classes) == 0)
    if len(ctrl) < 2:
        return []
    s = audit.fill_sanity(audit.efficientnet_logits(fitted.model, fitted.variables), images[ctrl], masks[ctrl], 0,
                          key=key, fills=config.fills, fill_settings=audit.FillSettings(blur_sigma=geometry.blur_sigma),
                          batch_size=geometry.batch)
    too = set(s.too_strong())
    return [{"fill": f, "mean_abs_change": float(a), "frac_changed": float(c), "n_cells": s.n_cells,
             "too_strong": f in too} for f, a, c in zip(s.fills, s.mean_abs_change, s.frac_changed)]


def spec(config: Config, geometry: Geometry) -> dict:
    """What a cached score table depends on besides the model (a mismatch recomputes it)."""
    return json.loads(json.dumps({"layers": config.layers, "methods": config.methods, "regions": config.regions,
                                  "fills": config.fills, "blur_sigma": geometry.blur_sigma, "donors": config.donors,
                                  "random_key": "fold_in(key(seed), 1)", "noise_key": "fold_in(key(seed), 2)"}))


class Study:
    """Runs (or reloads) one model's table at a time; keeps the random model per seed and geometry."""

    def __init__(self, work: Path, config: Config, log):
        self.work, self.config, self.log = work, config, log
        self._random: dict[tuple[str, int], dict] = {}

    def random_variables(self, geometry: Geometry, seed: int) -> dict:
        """The random-weight baseline model of one seed and geometry (calibrated on the cell plate's training crops)."""
        import jax

        from gradcamo_jax import audit

        key = (geometry.name, seed)
        if key not in self._random:
            root = plate_root(self.work, geometry, MODES["cell"], seed)
            data = make_plate(root, MODES["cell"], seed, geometry)
            cfg = study.train_config(geometry.plate, self.config.steps, seed)
            self._random[key] = audit.randomized_variables(cfg.model, jax.random.fold_in(jax.random.key(seed), 1),
                                                           load_rows(data, "train", 64))
        return self._random[key]

    def run(self, geometry: Geometry, mode: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(cells, sanity)`` of one model (cached under the plate folder)."""
        import jax

        from gradcamo_jax.data import formats

        kind, signal = kind_of(mode), signal_of(mode)
        root = plate_root(self.work, geometry, signal, seed)
        tag = f"audit_{kind}_{self.config.steps}steps"
        table, meta = root / f"{tag}.parquet", root / f"{tag}.json"
        want = spec(self.config, geometry)
        if table.exists() and meta.exists() and json.loads(meta.read_text()).get("spec") == want:
            out = pd.read_parquet(table)
            return self.with_interchange(out, geometry, mode, seed, None), pd.DataFrame(json.loads(meta.read_text())["sanity"])
        t0 = time.perf_counter()
        data = make_plate(root, signal, seed, geometry)
        t1 = time.perf_counter()
        fitted = fit(kind, mode, root, data, seed, geometry, self.config)
        t2 = time.perf_counter()
        data = cells_of_interest(root, data, mode)
        images, masks, cells = study.load_split(data, "test")
        donors = donor_crops(load_rows(data, "train", self.config.donors, classes=(0,)), len(images), seed)
        noise = jax.random.fold_in(jax.random.key(seed), 2)
        scores = score_model(fitted, images, masks, donors, self.random_variables(geometry, seed), noise,
                             geometry, self.config)
        sanity = sanity_rows(fitted, images, masks, cells["Metadata_Class"], noise, geometry, self.config)
        t3 = time.perf_counter()
        keep = [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber",
                            "Metadata_Class", "Marked") if c in cells]
        out = pd.concat([cells[keep].reset_index(drop=True), scores], axis=1)
        out["correct"] = out["predicted"] == out["Metadata_Class"]
        out = out.assign(geometry=geometry.name, mode=mode, seed=seed, kind=kind)
        sanity = pd.DataFrame(sanity).assign(geometry=geometry.name, mode=mode, seed=seed)
        formats.write_table(out, table)
        formats.write_json({"spec": want, "sanity": sanity.to_dict(orient="list"), "train": fitted.info,
                            "data_s": t1 - t0, "fit_s": t2 - t1, "score_s": t3 - t2}, meta)
        self.log(f"{geometry.name} {mode} seed {seed}: {len(out)} test cells, accuracy {out['correct'].mean():.2f}, "
                 f"data {t1 - t0:.0f} s, fit {t2 - t1:.0f} s, score {t3 - t2:.0f} s")
        return self.with_interchange(out, geometry, mode, seed, fitted), sanity

    def with_interchange(self, cells: pd.DataFrame, geometry: Geometry, mode: str, seed: int,
                         fitted: Fitted | None) -> pd.DataFrame:
        """`cells` with the interchange columns (`audit.interchange`; cached beside the model's
        table, computed when missing): ``swap_context`` / ``swap_cell`` = how far the prediction
        follows a donor's context / cell, ``xri`` their index, ``swap_valid`` donors of another
        predicted class. Donors: `Config.swap_donors` training-well cells of every class."""
        import jax

        from gradcamo_jax import audit
        from gradcamo_jax.data import formats

        kind, signal = kind_of(mode), signal_of(mode)
        root = plate_root(self.work, geometry, signal, seed)
        per_class = self.config.swap_donors
        path = root / f"interchange_{kind}_{self.config.steps}steps_{per_class}d.parquet"
        if not path.exists():
            t0 = time.perf_counter()
            data = make_plate(root, signal, seed, geometry)
            fitted = fitted or fit(kind, mode, root, data, seed, geometry, self.config)
            data = cells_of_interest(root, data, mode)
            images, masks, test = study.load_split(data, "test")
            keys = ["Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber"]
            if not test[keys].reset_index(drop=True).equals(cells[keys].reset_index(drop=True)):
                raise RuntimeError(f"{root}: the test cells changed since the audit table was written")
            pool_x, pool_m, index = swap_donors(data, len(images), self.config, geometry.plate.num_classes, seed)
            fn = audit.efficientnet_logits(fitted.model, fitted.variables)
            cols: dict[str, list] = {"swap_context": [], "swap_cell": [], "xri": [], "swap_valid": [], "predicted": []}
            for (r, k) in chunked(lambda x, m, i: audit.interchange(fn, x, m, pool_x[i], pool_m[i]),
                                  (images, masks, index), geometry.batch):
                r = jax.device_get(r)
                cols["swap_context"].append(np.asarray(r.follow_context, np.float64)[:k])
                cols["swap_cell"].append(np.asarray(r.follow_cell, np.float64)[:k])
                cols["xri"].append(np.asarray(r.index, np.float64)[:k])
                cols["swap_valid"].append(np.asarray(r.valid).sum(axis=1)[:k])
                cols["predicted"].append(np.asarray(r.predicted)[:k])
            table = pd.DataFrame({c: np.concatenate(v) for c, v in cols.items()})
            if not np.array_equal(table.pop("predicted").to_numpy(), cells["predicted"].to_numpy()):
                raise RuntimeError(f"{root}: the interchange and the audit table disagree on the predicted class")
            formats.write_table(table, path)
            self.log(f"{geometry.name} {mode} seed {seed}: interchange of {len(table)} cells x {index.shape[1]} donors "
                     f"in {time.perf_counter() - t0:.0f} s")
        table = pd.read_parquet(path)
        return pd.concat([cells.reset_index(drop=True), table], axis=1)

    def cost(self, geometry: Geometry, seed: int, table: pd.DataFrame) -> dict:
        """Cells/s of each measure on the cell model's first test cells, after compilation (cached),
        and a check that the study's Grad-CAMO grid (`grid_fn`) equals `explain` and
        `audit.random_baseline` on them (`table`: that model's cached per-cell table)."""
        import jax

        from gradcamo_jax import audit, explain

        root = plate_root(self.work, geometry, MODES["cell"], seed)
        path = root / f"audit_cost_{self.config.steps}steps.json"
        if path.exists():
            out = json.loads(path.read_text())
            if "interchange" not in out:
                out["interchange"] = self.interchange_cost(geometry, seed)
                path.write_text(json.dumps(out, indent=1))
            return out
        data = make_plate(root, MODES["cell"], seed, geometry)
        fitted = fit("trained", "cell", root, data, seed, geometry, self.config)
        images, masks, _ = study.load_split(data, "test")
        n = min(len(images), geometry.time_cells)
        images, masks = images[:n], masks[:n]
        donors = donor_crops(load_rows(data, "train", self.config.donors, classes=(0,)), n, seed)
        rv = self.random_variables(geometry, seed)
        m, v, b, key = fitted.model, fitted.variables, geometry.batch, jax.random.key(0)
        layers, methods = self.config.layers, tuple(self.config.methods)
        full, cri_only = reliance_settings(self.config, geometry), reliance_settings(self.config, geometry,
                                                                                     ("cell", "context"), ("noise",))
        minus = np.full(b, -1, np.int32)

        def over_chunks(f):
            return lambda: [jax.block_until_ready(o) for o, _ in chunked(f, (images, masks, donors), b)]

        def grid(x, k, d, random=False):
            outs = []
            for la in layers:
                t = grid_fn(m, la, methods)(v, x, k, minus)
                outs.append(grid_fn(m, la, methods)(rv, x, k, t["target"]) if random else t)
            return outs

        grid_name = f"{len(layers)} layers x {len(methods)} methods"
        jobs = {
            "explain (layercam @ stem)": over_chunks(lambda x, k, d: explain(m, v, x, k, layer="stem", method="layercam").scores.cell),
            f"raw Grad-CAMO grid ({grid_name}, one pass per layer)": over_chunks(grid),
            f"raw + corrected Grad-CAMO grid ({grid_name})": over_chunks(functools.partial(grid, random=True)),
            "corrected Grad-CAMO by audit.random_baseline (layercam @ stem)": over_chunks(
                lambda x, k, d: audit.random_baseline(m, v, x, k, random_variables=rv, layer="stem", method="layercam").corrected),
            f"reliance, {len(full.regions)} regions x {len(full.fills)} fills": over_chunks(
                lambda x, k, d: audit.model_reliance(m, v, x, k, key=key, donors=d, settings=full).drops),
            "CRI only (cell + context, noise)": over_chunks(
                lambda x, k, d: audit.model_reliance(m, v, x, k, key=key, settings=cri_only).cri),
        }
        out = {"cells": n, "batch": b, "crop": list(images.shape[1:]), "backend": jax.default_backend(),
               "model": "cell", "seed": seed, "measures": {}, "checks": {}}
        for name, job in jobs.items():
            job()  # compile
            best = min(_timed(job) for _ in range(2))
            out["measures"][name] = {"seconds": best, "cells_per_s": n / best}
        base = out["measures"]["explain (layercam @ stem)"]["seconds"]
        for r in out["measures"].values():
            r["x_explain"] = r["seconds"] / base
        if "stem" in layers and "layercam" in methods:
            refs = [(o, k) for o, k in chunked(lambda x, k: audit.random_baseline(
                m, v, x, k, random_variables=rv, layer="stem", method="layercam"), (images, masks), b)]
            for name, col in (("gradcamo", "gc_stem_layercam"), ("corrected", "cgc_stem_layercam")):
                val = np.concatenate([np.asarray(getattr(o, name), np.float64)[:k] for o, k in refs])
                diff = np.abs(val - table[col].to_numpy(float)[:n])
                out["checks"][f"max_abs_diff_{name}_vs_random_baseline"] = float(np.nanmax(diff)) if np.isfinite(diff).any() else 0.0
        out["interchange"] = self.interchange_cost(geometry, seed)
        path.write_text(json.dumps(out, indent=1))
        return out

    def interchange_cost(self, geometry: Geometry, seed: int) -> dict:
        """Cells/s of `audit.interchange` (`Config.swap_donors` per class) beside plain `explain`
        (LayerCAM at the stem), both timed in this call on the cell model's first test cells."""
        import jax

        from gradcamo_jax import audit, explain

        root = plate_root(self.work, geometry, MODES["cell"], seed)
        data = make_plate(root, MODES["cell"], seed, geometry)
        fitted = fit("trained", "cell", root, data, seed, geometry, self.config)
        images, masks, _ = study.load_split(data, "test")
        n = min(len(images), geometry.time_cells)
        images, masks = images[:n], masks[:n]
        pool_x, pool_m, index = swap_donors(data, n, self.config, geometry.plate.num_classes, seed)
        m, v, b = fitted.model, fitted.variables, geometry.batch
        fn = audit.efficientnet_logits(m, v)
        jobs = {
            "explain": lambda: [jax.block_until_ready(o) for o, _ in chunked(
                lambda x, k: explain(m, v, x, k, layer="stem", method="layercam").scores.cell, (images, masks), b)],
            "interchange": lambda: [jax.block_until_ready(o) for o, _ in chunked(
                lambda x, k, i: audit.interchange(fn, x, k, pool_x[i], pool_m[i]).index, (images, masks, index), b)],
        }
        out = {"cells": n, "batch": b, "donors_per_cell": int(index.shape[1])}
        for name, job in jobs.items():
            job()  # compile
            best = min(_timed(job) for _ in range(2))
            out[name] = {"seconds": best, "cells_per_s": n / best}
        out["x_explain"] = out["interchange"]["seconds"] / out["explain"]["seconds"]
        return out


def _timed(job) -> float:
    t = time.perf_counter()
    job()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- statistics


MEASURE_PREFIXES: dict[str, int] = {
    "gc_": 1, "cgc_": 1, "drop_cell_": 1, "drop_background_": -1, "drop_neighbors_": -1, "drop_context_": -1,
    "cri_": -1, "swap_context": -1, "swap_cell": 1, "xri": -1,
}
"""Measure column prefix → orientation (see `ORIENTATION_TEXT`)."""


def orientation(measure: str) -> int:
    for prefix, sign in MEASURE_PREFIXES.items():
        if measure.startswith(prefix):
            return sign
    raise KeyError(f"{measure} is not a measure column")


def measure_columns(cells: pd.DataFrame) -> list[str]:
    """Measure columns of a per-cell table, grouped by kind in `MEASURE_PREFIXES` order."""
    return [c for p in MEASURE_PREFIXES for c in cells.columns if c.startswith(p)]


def fill_of(measure: str) -> str | None:
    return measure.rsplit("_", 1)[1] if measure.startswith(("drop_", "cri_")) else None


def _oriented(df: pd.DataFrame, measure: str) -> np.ndarray:
    return orientation(measure) * df[measure].to_numpy(float)


def _per_seed(values: dict[int, float]) -> dict:
    seeds = sorted(values)
    return {**study.mean_sd([values[s] for s in seeds]), "per_seed": [values[s] for s in seeds], "seeds": seeds}


def _split(cells: pd.DataFrame, by: list[str], measures: list[str]) -> dict:
    """group key → measure → oriented values (NumPy), grouping the table once."""
    return {k: {m: _oriented(g, m) for m in measures} for k, g in cells.groupby(by, sort=False)}


def auroc_vs_cell_model(cells: pd.DataFrame, measures: list[str]) -> dict:
    """measure → other model → per-seed AUROC of the cell model's cells vs that model's cells."""
    others = [m for m in dict.fromkeys(cells["mode"]) if m != "cell"]
    groups = _split(cells, ["seed", "mode"], measures)
    seeds = sorted({int(s) for s, _ in groups})
    out = {}
    for measure in measures:
        out[measure] = {}
        for other in others:
            vals = {s: study.auroc(groups[(s, "cell")][measure], groups[(s, other)][measure])
                    for s in seeds if (s, "cell") in groups and (s, other) in groups}
            if vals:
                out[measure][other] = _per_seed(vals)
        shortcuts = [out[measure][m]["mean"] for m in SHORTCUT_MODES if m in out[measure]]
        out[measure]["mean_over_shortcuts"] = float(np.mean(shortcuts)) if shortcuts else float("nan")
    return out


NEIGHBOR_SUBSETS = ("all", "treated", "confident", "correct", "treated_confident", "treated_correct")


def neighbor_subset(g: pd.DataFrame, subset: str, confident: float = CONFIDENT) -> np.ndarray:
    """Boolean row selection of one of `NEIGHBOR_SUBSETS` in table `g`."""
    keep = np.ones(len(g), bool)
    if "treated" in subset:
        keep &= g["Metadata_Class"].to_numpy() > 0
    if "confident" in subset:
        keep &= g["p_pred"].to_numpy(float) > confident
    if "correct" in subset:
        keep &= g["correct"].to_numpy(bool)
    return keep


def marked_vs_unmarked(cells: pd.DataFrame, measures: list[str], confident: float = CONFIDENT) -> dict:
    """Inside the neighbor model: per-seed AUROC of marked (the dose is in the cell's own
    morphology) vs unmarked cells (only in neighbours), per measure and subset of cells.
    Control cells carry no dose whether marked or not, hence the "treated" subsets."""
    nb = cells[cells["mode"] == "neighbor"]
    if nb.empty:
        return {}
    out: dict = {"cells": {sub: {} for sub in NEIGHBOR_SUBSETS}, **{m: {} for m in measures}}
    vals: dict = {(m, sub): {} for m in measures for sub in NEIGHBOR_SUBSETS}
    for seed, g in nb.groupby("seed"):
        marked = g["Marked"].astype(bool).to_numpy()
        oriented = {m: _oriented(g, m) for m in measures}
        for sub in NEIGHBOR_SUBSETS:
            keep = neighbor_subset(g, sub, confident)
            pos, neg = keep & marked, keep & ~marked
            out["cells"][sub][int(seed)] = {"marked": int(pos.sum()), "unmarked": int(neg.sum())}
            for m in measures:
                vals[(m, sub)][int(seed)] = study.auroc(oriented[m][pos], oriented[m][neg])
    for (m, sub), v in vals.items():
        out[m][sub] = _per_seed(v)
    return out


def model_means(cells: pd.DataFrame, measures: list[str]) -> pd.DataFrame:
    """One row per (mode, seed): the oriented per-cell measures' means (NaN skipped) and accuracy."""
    rows = []
    for (mode, seed), g in cells.groupby(["mode", "seed"], sort=False):
        row = {"mode": mode, "seed": int(seed), "accuracy": float(g["correct"].mean())}
        for m in measures:
            row[m] = float(np.nanmean(_oriented(g, m))) if np.isfinite(g[m].to_numpy(float)).any() else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def verdicts(means: pd.DataFrame, measures: list[str]) -> dict:
    """Model-level verdict per measure: "reads the cell" iff the model's mean oriented measure
    exceeds a threshold set on the first seed only, halfway between the cell model and the
    highest of all other models (shortcuts and controls) of that seed; NaN (no rule) when the
    cell model is not the highest there. Right = "reads the cell" for the cell model and
    "does not" for every other model; judged on the other (held-out) seeds."""
    if means.empty:
        return {}
    rule_seed = int(means["seed"].min())
    first, held = means[means["seed"] == rule_seed], means[means["seed"] != rule_seed]
    first_cell = (first["mode"] == "cell").to_numpy()
    held_is_cell = (held["mode"] == "cell").to_numpy()
    held_names = [f"{m} seed {s}" for m, s in zip(held["mode"], held["seed"])]
    by_mode = [(m, [int(s) for s in g["seed"]], g) for m, g in means.groupby("mode", sort=False)]
    out = {}
    for measure in measures:
        cell = first.loc[first_cell, measure]
        rest = first.loc[~first_cell, measure].dropna()
        threshold = float("nan")
        if len(cell) and len(rest) and np.isfinite(cell.iloc[0]) and cell.iloc[0] > rest.max():
            threshold = float((cell.iloc[0] + rest.max()) / 2)
        right, wrong = 0, []
        for name, is_cell, value in zip(held_names, held_is_cell, held[measure]):
            says_cell = bool(np.isfinite(threshold) and value > threshold)
            if says_cell == is_cell:
                right += 1
            else:
                wrong.append(name)
        out[measure] = {
            "rule_seed": rule_seed, "threshold": threshold, "separable_on_rule_seed": bool(np.isfinite(threshold)),
            "heldout_models": int(len(held)), "heldout_right": right,
            "heldout_all_right": bool(len(held) and right == len(held)), "wrong": wrong,
            "values": {m: {s: float(v) for s, v in zip(seeds, g[measure])} for m, seeds, g in by_mode},
        }
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    return float(spearmanr(x[ok], y[ok]).statistic)


def correlations(cells: pd.DataFrame, xs: list[str], ys: list[str]) -> dict:
    """mode → "x vs y" → per-seed Spearman ρ of the raw (not oriented) columns inside each model."""
    out = {}
    for mode, gm in cells.groupby("mode", sort=False):
        out[mode] = {}
        for x in xs:
            for y in ys:
                if x in gm and y in gm:
                    out[mode][f"{x} vs {y}"] = _per_seed({int(s): spearman(g[x], g[y]) for s, g in gm.groupby("seed")})
    return out


def sanity_summary(sanity: pd.DataFrame) -> dict:
    """fill → mean ± sd over models of the sanity numbers, and which models flag the fill too strong."""
    if sanity is None or sanity.empty:
        return {}
    out = {}
    for fill, g in sanity.groupby("fill", sort=False):
        out[fill] = {"mean_abs_change": study.mean_sd(g["mean_abs_change"]), "frac_changed": study.mean_sd(g["frac_changed"]),
                     "too_strong_in": [f"{m} seed {s}" for m, s in zip(g[g["too_strong"]]["mode"], g[g["too_strong"]]["seed"])],
                     "models": int(len(g)),
                     "per_model": {f"{m} seed {s}": {"mean_abs_change": float(a), "frac_changed": float(c)}
                                   for m, s, a, c in zip(g["mode"], g["seed"], g["mean_abs_change"], g["frac_changed"])}}
    return out


def summarize_geometry(cells: pd.DataFrame, sanity: pd.DataFrame | None = None, confident: float = CONFIDENT) -> dict:
    """The statistics of one geometry from its per-cell table (and fill-sanity rows)."""
    measures = measure_columns(cells)
    means = model_means(cells, measures)
    models = {}
    for mode, g in means.groupby("mode", sort=False):
        sub = cells[cells["mode"] == mode]
        models[mode] = {"accuracy": study.mean_sd(g["accuracy"]), "cells": int(len(sub)),
                        "seeds": sorted(int(s) for s in g["seed"]),
                        "mean_p_pred": float(sub["p_pred"].mean()) if "p_pred" in sub else float("nan"),
                        "mean": {m: study.mean_sd(g[m]) for m in measures}}  # model_means: oriented already
        for c in [c for c in measures if c.startswith("cri_")]:
            models[mode][f"{c}_undefined"] = float(sub[c].isna().mean())
    gcs = [m for m in measures if m.startswith("gc_")]
    cgcs = [m for m in measures if m.startswith("cgc_")]
    primary = [m for m in ("gc_stem_layercam", "cgc_stem_layercam", "gc_stage2_gradcam") if m in measures] or gcs[:1] + cgcs[:1]
    ys = [m for m in measures if m.startswith(("cri_", "drop_context_"))]
    auc = auroc_vs_cell_model(cells, measures)
    sane = sanity_summary(sanity)
    for m in measures:
        f = fill_of(m)
        if f is not None and f in sane:
            auc[m]["fill_too_strong_in"] = sane[f]["too_strong_in"]
    ranking = sorted(((auc[m]["mean_over_shortcuts"], m) for m in measures), key=lambda t: -np.nan_to_num(t[0], nan=-1))
    best_on_rule_seed = {}
    rule_seed = int(cells["seed"].min())

    def rule_seed_mean_over_shortcuts(m: str) -> float:
        """`auroc_vs_cell_model`'s ``mean_over_shortcuts`` of the rule seed alone, from `auc`'s per-seed values."""
        vals = [auc[m][o]["per_seed"][auc[m][o]["seeds"].index(rule_seed)]
                for o in SHORTCUT_MODES if o in auc[m] and rule_seed in auc[m][o]["seeds"]]
        return float(np.mean(vals)) if vals else float("nan")

    for prefix, group in (("raw", gcs), ("corrected", cgcs)):
        if group:
            best_on_rule_seed[prefix] = max(group, key=lambda m: np.nan_to_num(rule_seed_mean_over_shortcuts(m), nan=-1))
    return {
        "measures": {m: {"orientation": orientation(m), "fill": fill_of(m)} for m in measures},
        "models": models,
        "auroc_cell_model_vs": auc,
        "ranking_mean_auroc_over_shortcuts": [{"measure": m, "auroc": a} for a, m in ranking],
        "best_gradcamo_on_rule_seed": best_on_rule_seed,
        "marked_vs_unmarked": marked_vs_unmarked(cells, measures, confident),
        "verdict": verdicts(means, measures),
        "spearman": correlations(cells, primary, ys),
        "fill_sanity": sane,
        "model_means": means.to_dict(orient="records"),
    }


def summarize(cells: pd.DataFrame, sanity: pd.DataFrame | None = None, cost: dict | None = None,
              confident: float = CONFIDENT) -> dict:
    """The numbers of audit.json: per geometry, `summarize_geometry`, and the cost table."""
    out = {"orientation": ORIENTATION_TEXT, "confident": confident, "geometries": {}}
    for geom, g in cells.groupby("geometry", sort=False):
        s = None if sanity is None or sanity.empty else sanity[sanity["geometry"] == geom]
        out["geometries"][geom] = summarize_geometry(g, s, confident)
        if cost and geom in cost:
            out["geometries"][geom]["cost"] = cost[geom]
    return out


# ----------------------------------------------------------------------------- figure and report


def display_order(measures: list[str]) -> list[str]:
    return measure_columns(pd.DataFrame(columns=measures))


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    geoms = list(summary["geometries"])
    n_meas = max(len(summary["geometries"][g]["measures"]) for g in geoms)
    fig, axes = plt.subplots(len(geoms), 2, figsize=(15, 0.26 * n_meas * len(geoms) + 2.2), squeeze=False,
                             gridspec_kw={"width_ratios": [1.3, 1]})
    for row, geom in enumerate(geoms):
        s = summary["geometries"][geom]
        measures = display_order(list(s["measures"]))
        sane = s["fill_sanity"]
        labels = []
        for m in measures:
            f = s["measures"][m]["fill"]
            flag = ""
            if f in sane:
                flag = f" [ctrl Δ {sane[f]['mean_abs_change']['mean']:.2f}{', too strong' if sane[f]['too_strong_in'] else ''}]"
            labels.append(f"{m} ({'+' if s['measures'][m]['orientation'] > 0 else '−'}){flag}")
        ax = axes[row, 0]
        others = [m for m in (*SHORTCUT_MODES, *CONTROLS) if any(m in s["auroc_cell_model_vs"][x] for x in measures)]
        table = np.array([[s["auroc_cell_model_vs"][x].get(o, {}).get("mean", np.nan) for o in others] for x in measures])
        im = ax.imshow(table, vmin=0, vmax=1, cmap="RdBu_r", aspect="auto")
        ax.set_xticks(range(len(others)), others)
        ax.set_yticks(range(len(measures)), labels, fontsize=7)
        for i in range(table.shape[0]):
            for j in range(table.shape[1]):
                if np.isfinite(table[i, j]):
                    ax.text(j, i, f"{table[i, j]:.2f}", ha="center", va="center", fontsize=6.5)
        ax.set_xlabel("model compared with the cell model (per-cell AUROC, mean over seeds)")
        ax.set_title(f"{geom}: AUROC cell model vs other model, oriented (0.5 = no separation)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03, label="AUROC")
        ax = axes[row, 1]
        mv = s["marked_vs_unmarked"]
        if mv:
            y = np.arange(len(measures))
            subsets = ("treated", "treated_confident", "treated_correct")
            for k, sub in enumerate(subsets):
                vals = [mv[m][sub]["mean"] for m in measures]
                err = [mv[m][sub]["sd"] for m in measures]
                n = sum(c["marked"] + c["unmarked"] for c in mv["cells"][sub].values())
                ax.barh(y + (k - 1) * 0.27, vals, height=0.27, xerr=np.nan_to_num(err), label=f"{sub} ({n} cells)")
            ax.axvline(0.5, color="k", lw=0.8, ls="--")
            ax.set_yticks(y, measures, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlim(0, 1)
            ax.set_xlabel("AUROC marked vs unmarked cells (neighbor model)")
            ax.legend(fontsize=7, loc="lower right")
            ax.set_title(f"{geom}: does the measure tell cells that carry the dose?", fontsize=9)
        else:
            ax.axis("off")
    fig.text(0.01, 0.002, "(+)/(−): orientation; [ctrl Δ x]: mean |Δ log p(control)| of control test cells with their context "
             "replaced by that fill (audit.fill_sanity), mean over models; 'too strong': > 0.1 nats or > 5 % re-classified "
             "in at least one model", fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return study.save_figure(fig, path)


def report(summary: dict) -> None:
    for geom, s in summary["geometries"].items():
        print(f"\n== {geom}: models (accuracy mean ± sd over seeds)")
        for mode, r in s["models"].items():
            print(f"  {mode:11s} acc {r['accuracy']['mean']:.3f} ± {r['accuracy']['sd']:.3f}  cells {r['cells']}")
        auc = s["auroc_cell_model_vs"]
        others = [m for m in (*SHORTCUT_MODES, *CONTROLS) if any(m in auc[x] for x in auc)]
        mv = s["marked_vs_unmarked"]
        print(f"  {'measure':24s} {'sgn':>3s} " + " ".join(f"{o[:10]:>10s}" for o in others)
              + f" {'mean sc':>8s} {'marked':>7s} {'verdict':>8s}")
        for m in display_order(list(auc)):
            row = " ".join(f"{auc[m].get(o, {}).get('mean', np.nan):10.3f}" for o in others)
            v = s["verdict"][m]
            verdict = f"{v['heldout_right']}/{v['heldout_models']}" if v["separable_on_rule_seed"] else "no rule"
            mark = mv[m]["treated"]["mean"] if mv else float("nan")
            print(f"  {m:24s} {s['measures'][m]['orientation']:+3d} {row} {auc[m]['mean_over_shortcuts']:8.3f} "
                  f"{mark:7.3f} {verdict:>8s}")
        if s["fill_sanity"]:
            print("  fill sanity (control cells, context replaced): "
                  + "; ".join(f"{f} |Δlogp| {r['mean_abs_change']['mean']:.3f}, changed {r['frac_changed']['mean']:.2f}, "
                              f"too strong in {len(r['too_strong_in'])}/{r['models']}" for f, r in s["fill_sanity"].items()))
        if "cost" in s:
            print(f"  cost ({s['cost']['cells']} cells, crop {s['cost']['crop']}):")
            for name, r in s["cost"]["measures"].items():
                print(f"    {name:55s} {r['cells_per_s']:9.1f} cells/s  {r['x_explain']:6.1f}× explain")
            ic = s["cost"].get("interchange")
            if ic:
                print(f"    {'interchange, ' + str(ic['donors_per_cell']) + ' donors (timed beside explain: ':55s}"
                      f"{ic['interchange']['cells_per_s']:9.1f} cells/s  {ic['x_explain']:6.1f}× explain "
                      f"at {ic['explain']['cells_per_s']:.1f} cells/s)")


# ----------------------------------------------------------------------------- main


def build_config(args) -> Config:
    base = SMOKE if args.smoke else QUICK if args.quick else Config()
    geoms = base.geometries
    names = args.geometries or (SMOKE_GEOMETRIES if args.smoke else QUICK_GEOMETRIES if args.quick
                                else tuple(g.name for g in geoms))
    geoms = tuple(g for g in geoms if g.name in names)
    if args.seeds:
        geoms = tuple(dataclasses.replace(g, seeds=tuple(args.seeds)) for g in geoms)
    if args.modes:
        geoms = tuple(dataclasses.replace(g, modes=tuple(args.modes)) for g in geoms)
    if args.controls is not None:
        geoms = tuple(dataclasses.replace(g, controls=tuple(args.controls)) for g in geoms)
    config = dataclasses.replace(base, geometries=geoms)
    if args.steps:
        config = dataclasses.replace(config, steps=args.steps)
    return config


def main(argv=None) -> dict:
    p = study.arg_parser(__doc__, "CPU setting (<= 20 min on 2 cores): fine_fixed geometry (9x64x64 crops, fixed "
                                  "intensity range), seed 0, the cell, background and neighbor_only models + the untrained "
                                  "control, 200 steps; --geometries names others (tiny: 6 modes x 3 seeds + 2 controls)")
    p.add_argument("--smoke", action="store_true",
                   help="pipeline check: 1 seed, cell + neighbor + controls, 40 steps, small plates, 2 layers, tiny geometry")
    p.add_argument("--modes", nargs="+", choices=list(PLATES))
    p.add_argument("--geometries", nargs="+", choices=["tiny", "fine", "fine_fixed"])
    p.add_argument("--controls", nargs="*", choices=list(CONTROLS),
                   help="control models scored on the cell plate (default: the setting's; none with no names)")
    args = p.parse_args(argv)
    config = build_config(args)
    out, work, log = study.start(args, "audit")
    t0 = time.perf_counter()
    runner = Study(work, config, log)
    parts, sanity, cost = [], [], {}
    for geom in config.geometries:
        for seed in geom.seeds:
            for mode in (*geom.modes, *(geom.controls if "cell" in geom.modes else ())):
                c, s = runner.run(geom, mode, seed)
                parts.append(c)
                sanity.append(s)
        if "cell" in geom.modes:
            first = next(c for c in parts if c["geometry"].iat[0] == geom.name and c["mode"].iat[0] == "cell")
            cost[geom.name] = runner.cost(geom, geom.seeds[0], first)
    cells = pd.concat(parts, ignore_index=True)
    sanity = pd.concat(sanity, ignore_index=True)
    summary = summarize(cells, sanity, cost)
    import jax

    summary["setup"] = {"config": dataclasses.asdict(config), "modes": PLATES, "shortcuts": SHORTCUT_MODES,
                        "backend": jax.default_backend(), "devices": jax.device_count(),
                        "wall_s": round(time.perf_counter() - t0, 1),
                        "command": "python -m experiments.audit " + " ".join(argv if argv is not None else sys.argv[1:])}
    cells.to_parquet(out / "audit_cells.parquet", index=False)
    (out / "audit.json").write_text(json.dumps(summary, indent=1, default=float))
    plot(summary, out / "audit.png")
    report(summary)
    print(f"wrote {out / 'audit.json'}, {out / 'audit_cells.parquet'} and {out / 'audit.png'} "
          f"in {time.perf_counter() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
