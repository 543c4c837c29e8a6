"""Remedies study (issue 20): which training remedy makes a cheating model learn the cell, and does auditing cells help?

**Remedies compared** (`REMEDIES`), each a model of the study recipe (`study.train_config`,
same seed, same steps) trained on a confounded plate:

* ``none``: the recipe as it is (the cached model of the audit and confounder studies);
* ``penalty``: the Grad-CAMO penalty (``TrainConfig.gradcamo_weight``) at stage2 with
  LayerCAM, audited at the stem as well;
* ``randomize``: ``DataConfig.context_remedy="randomize"``: during training, the context
  (background + neighbours) of half the crops replaced by the audit's fills (noise matched
  to the crop's context, or a control cell's context);
* ``mask``: ``context_remedy="mask"``: the input multiplied by the central-cell mask, in
  training and at inference (DeepProfiler's ``mask_objects``);
* ``attenuate``: ``context_remedy="attenuate"``: the context multiplied by 0.25, also at
  inference.

Plates (`confounders.MODES`): ``mixture`` (a weak in-cell dose signal beside a strong
background shortcut) and ``site`` (a per-site imaging artefact, which also changes the
cell's own voxels: no region remedy can remove it; a negative control). Each model is
measured by

* accuracy on a **clean** plate (the mixture's cell signal alone, ``CLEAN``, another seed),
  every cell of it, with the model's own inference transform;
* copairs phenotypic-activity mAP (`gradcamo_jax.evaluate.evaluate_profiles`: well medians,
  sphered on control wells) of its ``top`` features on that clean plate;
* on the training plate's test wells: counterfactual reliance (`audit.reliance` through
  `scoring.remedy_logits`, so the fills act before the model's input transform; regions
  background, neighbours, cell, context; fills noise and swap with control donors), the
  context-reliance index, and Grad-CAMO (LayerCAM and Grad-CAM) at the stem and stage2;
* step cost: seconds per training step relative to ``none``, timed back to back in one
  process (`time_steps`, data pipeline included) because the machine's load changes
  between training runs.

**Does auditing cells help?** (`filter_study`): on each confounded plate, the ``none``
model's per-cell ``top`` profiles of every cell; copairs mAP of all cells, against the mAP
after dropping the cells the audit flags (context-reliance index > 0.5 with the noise fill,
or LayerCAM Grad-CAMO at the stem corrected for a random-weight model < 0), each flag alone,
and dropping the same number of random cells (`Config.random_draws` draws).

    python -m experiments.remedies --quick --out DIR                      # CPU, 1 seed, 200 steps, mixture plate, ≤ 20 min
    python -m experiments.remedies --out DIR                              # full: 3 seeds, 600 steps (GPU)

Writes ``OUT/remedies.json``, ``OUT/remedies.png`` and ``OUT/remedies_table.csv`` (one
row per model); plates, trained models and per-model results are cached under ``WORK``
(default ``OUT/work``; the ``none`` models are those of the audit and confounder studies
when the settings match). Results are written after every model, so an interrupted run
leaves what it finished.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from experiments import study
from experiments.confounders import MODES

REMEDIES: dict[str, dict] = {
    "none": {},
    "penalty": {"gradcamo_weight": 4.0, "gradcamo_layer": "stage2", "gradcamo_method": "layercam"},
    "randomize": {"data": {"context_remedy": "randomize", "randomize_prob": 0.5, "randomize_fill": "both"}},
    "mask": {"data": {"context_remedy": "mask"}},
    "attenuate": {"data": {"context_remedy": "attenuate", "context_factor": 0.25}},
}
"""Remedy name → overrides of `study.train_config` (``data``: overrides of its `DataConfig`)."""

PLATES = {"mixture": MODES["mixture"], "site": MODES["site"]}
CLEAN = {"cell": MODES["mixture"]["cell"]}
"""The clean plate: the mixture's in-cell signal at the same strength, nothing else."""
CLEAN_SEED_OFFSET = 1000
LAYERS = ("stem", "stage2")
METHODS = ("layercam", "gradcam")
REGIONS = ("background", "neighbors", "cell", "context")
FILLS = ("noise", "swap")
CRI_FLAG = 0.5
CGC_FLAG = 0.0


@dataclasses.dataclass(frozen=True)
class Config:
    """Study size; `QUICK` is the CPU setting.

    Attributes:
      plates: names of `PLATES`, in the order they run.
      remedies: names of `REMEDIES`, in the order they run.
      seeds: each seed draws new plates, split and initialisation (clean plate: seed + 1000).
      steps: optimiser steps per model.
      plate: plate geometry (`study.PlateSpec`).
      batch: cells per forward of the measures.
      null_size: copairs null rankings per configuration.
      random_draws: random drops per filter comparison.
      time_steps: training steps timed per remedy for the step cost (0 skips the timing).
    """

    plates: tuple[str, ...] = ("mixture", "site")
    remedies: tuple[str, ...] = tuple(REMEDIES)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 600
    plate: study.PlateSpec = study.PlateSpec(wells_per_dose=8, sites_per_well=2)
    batch: int = 64
    null_size: int = 20_000
    random_draws: int = 10
    time_steps: int = 20


QUICK = Config(seeds=(0,), steps=200, random_draws=10, time_steps=12, plates=("mixture",),
               remedies=("none", "mask", "randomize", "attenuate"))
"""The CPU setting, ≤ 20 min on 2 cores: the mixture plate (the one with biology to recover)
and the four data remedies. ``--plates mixture site --remedies none mask randomize attenuate
penalty`` adds the site plate (a negative control) and the Grad-CAMO penalty (its step costs
~3×, a second-order pass; the regulariser study measured it on a similar plate): the
committed results (experiments/README.md), ≈ 1 h."""


def train_cfg(remedy: str, config: Config, seed: int):
    """The study recipe with `remedy`'s overrides."""
    over = dict(REMEDIES[remedy])
    data_over = over.pop("data", {})
    cfg = study.train_config(config.plate, config.steps, seed, **over)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data_over))


def run_dir(root: Path, remedy: str, config: Config) -> Path:
    # "none" is the audit and confounder studies' run (same recipe, plate and steps).
    return root / (f"run_{config.steps}steps" if remedy == "none" else f"run_{remedy}_{config.steps}steps")


def load_all(data: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Every cell of a plate (all splits): images, masks, cell rows (with ``split``)."""
    parts = [study.load_split(data, s) for s in ("train", "val", "test")]
    cells = pd.concat([p[2].assign(split=s) for p, s in zip(parts, ("train", "val", "test"))], ignore_index=True)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), cells


class Model:
    """A trained model with its inference transform (`pipeline.context_transform`)."""

    def __init__(self, trained, variables, info):
        import jax

        from gradcamo_jax import EfficientNet

        self.config, self.variables, self.info = trained, variables, info
        self.model = EfficientNet(dataclasses.replace(trained.model, dtype="float32"))
        self.remedy, self.factor = trained.data.context_remedy, trained.data.context_factor
        def forward(v, x):  # logits and the spatially pooled "top" activation (the profile)
            top = self.model.apply(v, x, method="features")["top"]
            return self.model.apply(v, top, method="head"), top.mean(axis=tuple(range(1, top.ndim - 1)))

        self._apply = jax.jit(forward)

    def inputs(self, images, masks):
        from gradcamo_jax.data.pipeline import context_transform

        return context_transform(images, masks, self.remedy, self.factor)

    def features(self, images, masks, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(logits (N, K), top features (N, F))`` of the transformed crops."""
        logits, feats = [], []
        x_all = self.inputs(images, masks)
        for s in range(0, len(images), batch):
            x = x_all[s:s + batch]
            n = len(x)
            if n < batch:
                x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
            lg, f = self._apply(self.variables, x)
            logits.append(np.asarray(lg)[:n])
            feats.append(np.asarray(f)[:n])
        return np.concatenate(logits), np.concatenate(feats)


def map_of(cells: pd.DataFrame, feats: np.ndarray, null_size: int, seed: int = 0) -> dict:
    """copairs phenotypic-activity mAP (`evaluate.evaluate_profiles`) of per-cell profiles."""
    from gradcamo_jax.evaluate import EvaluateConfig, evaluate_profiles

    meta = cells[[c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Treatment", "Metadata_Dose")]]
    prof = pd.concat([meta.reset_index(drop=True),
                      pd.DataFrame(feats.astype(np.float64), columns=[f"f{i:03d}" for i in range(feats.shape[1])])],
                     axis=1)
    ev = evaluate_profiles(prof, EvaluateConfig(null_size=null_size, seed=seed))
    act = ev.activity
    return {"mean_map": float(ev.summary["mean_map"]), "fraction_retrieved": float(ev.summary["fraction_retrieved"]),
            "per_dose": {f"{d:g}": {"map": float(m), "corrected_p": float(p)} for d, m, p in
                         zip(act["Metadata_Dose"], act["mean_average_precision"], act["corrected_p_value"])}}


def null_map(work: Path, seed: int, config: Config) -> dict:
    """What mAP random profiles get on the clean plate (same wells, cells and copairs settings;
    standard-normal features of the "top" width, 5 draws: mean, sd): the level a model's mAP
    must beat (high with 8 replicate wells against 8 controls)."""
    from gradcamo_jax.data import formats

    data = study.plate_dir(work, CLEAN, CLEAN_SEED_OFFSET + seed, config.plate) / "data"
    cells = formats.read_cells(data)
    rng = np.random.default_rng([seed, 7])
    draws = [map_of(cells, rng.normal(size=(len(cells), 64)), config.null_size) for _ in range(5)]
    return {"mean_map": study.mean_sd([d["mean_map"] for d in draws])["mean"],
            "mean_map_sd": study.mean_sd([d["mean_map"] for d in draws])["sd"],
            "fraction_retrieved": float(np.mean([d["fraction_retrieved"] for d in draws])), "draws": 5}


def reliance_and_gradcamo(m: Model, images, masks, donors, key, batch: int) -> pd.DataFrame:
    """Per cell: counterfactual drops (`REGIONS` × `FILLS`), CRI (noise), and Grad-CAMO at
    `LAYERS` × `METHODS` on the transformed crops."""
    from gradcamo_jax import audit
    from gradcamo_jax.scoring import remedy_logits

    settings = audit.RelianceSettings(regions=REGIONS, fills=FILLS, cri_fill="noise")
    rel = audit.reliance(remedy_logits(m.model, m.variables, m.remedy, m.factor), images, masks, key=key,
                         donors=donors, settings=settings, batch_size=batch)
    cols = {"p_pred": np.exp(np.asarray(rel.logp0, np.float64)), "predicted": np.asarray(rel.predicted)}
    empty = np.asarray(rel.empty)
    for i, region in enumerate(REGIONS):
        for fill in FILLS:
            cols[f"drop_{region}_{fill}"] = np.where(empty[:, i], np.nan, np.asarray(rel.drop(region, fill), np.float64))
    cols["cri_noise"] = np.asarray(rel.cri, np.float64)
    x = np.asarray(m.inputs(images, masks))
    for layer in LAYERS:
        s = study.score_cells(m.model, m.variables, x, masks, layer=layer, methods=METHODS, batch=batch)
        for method in METHODS:
            cols[f"gc_{layer}_{method}"] = s[method]["gradcamo"].to_numpy()
    return pd.DataFrame(cols)


def _chunks(arrays, batch: int):
    """``((chunk arrays), valid rows)`` with the last chunk padded (one compiled shape)."""
    n = len(arrays[0])
    for s in range(0, n, batch):
        part = tuple(a[s:s + batch] for a in arrays)
        k = len(part[0])
        if k < batch:
            part = tuple(np.concatenate([a, np.repeat(a[-1:], batch - k, axis=0)]) for a in part)
        yield part, k


def donor_crops(data: Path, n: int, seed: int, limit: int = 128) -> np.ndarray:
    """``(n, ...)`` control crops of the plate's training wells for the swap fill (cell i takes donor i mod)."""
    images, _, cells = study.load_split(data, "train")
    ctrl = images[cells["Metadata_Class"].to_numpy() == 0][:limit]
    perm = np.random.default_rng([seed, 23]).permutation(len(ctrl))
    return ctrl[perm[np.arange(n) % len(ctrl)]]


def run_model(work: Path, plate: str, remedy: str, seed: int, config: Config, log) -> dict:
    """Train (or reuse) one model and measure it (cached as ``remedy_<name>_<steps>steps.json``)."""
    import jax

    from gradcamo_jax.data import formats

    root = study.plate_dir(work, PLATES[plate], seed, config.plate)
    done = root / f"remedy_{remedy}_{config.steps}steps.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    data = study.make_dataset(root, PLATES[plate], seed, config.plate)
    clean_seed = CLEAN_SEED_OFFSET + seed
    clean = study.make_dataset(study.plate_dir(work, CLEAN, clean_seed, config.plate), CLEAN, clean_seed, config.plate)
    cfg = train_cfg(remedy, config, seed)
    m = Model(*study.train_model(data, run_dir(root, remedy, config), cfg))
    t1 = time.perf_counter()
    out = {"plate": plate, "remedy": remedy, "seed": seed, "train_s": m.info["seconds"],
           "steps_per_second_in_run": m.info["steps_per_second"], "fit_s": t1 - t0}
    # Clean plate: every cell (the model never saw the plate).
    images, masks, cells = load_all(clean)
    logits, feats = m.features(images, masks, config.batch)
    out["clean_accuracy"] = float((logits.argmax(1) == cells["Metadata_Class"].to_numpy()).mean())
    out["clean_cells"] = int(len(cells))
    out["clean_map"] = map_of(cells, feats, config.null_size)
    # Training plate, test wells.
    images, masks, cells = study.load_split(data, "test")
    logits, _ = m.features(images, masks, config.batch)
    out["test_accuracy"] = float((logits.argmax(1) == cells["Metadata_Class"].to_numpy()).mean())
    donors = donor_crops(data, len(images), seed)
    per_cell = reliance_and_gradcamo(m, images, masks, donors, jax.random.fold_in(jax.random.key(seed), 2),
                                     config.batch)
    out["test"] = {c: float(np.nanmean(per_cell[c])) for c in per_cell.columns if c not in ("predicted",)}
    out["test"]["cri_noise_undefined_fraction"] = float(per_cell["cri_noise"].isna().mean())
    out["measure_s"] = time.perf_counter() - t1
    formats.write_json(out, done)
    log(f"{plate} {remedy}: clean acc {out['clean_accuracy']:.2f} mAP {out['clean_map']['mean_map']:.2f}; "
        f"test acc {out['test_accuracy']:.2f} CRI {out['test']['cri_noise']:.2f} "
        f"drop ctx/noise {out['test']['drop_context_noise']:.3f} GC stem {out['test']['gc_stem_layercam']:.3f}; "
        f"train {out['train_s']:.0f} s, measures {out['measure_s']:.0f} s")
    return out


def filter_study(work: Path, plate: str, seed: int, config: Config, log) -> dict:
    """Item 3: mAP of the ``none`` model's profiles of every cell of a confounded plate, all
    cells vs dropping audit-flagged cells vs dropping as many random cells."""
    import jax

    from gradcamo_jax import audit
    from gradcamo_jax.data import formats

    root = study.plate_dir(work, PLATES[plate], seed, config.plate)
    done = root / f"remedy_filter_{config.steps}steps.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    data = study.make_dataset(root, PLATES[plate], seed, config.plate)
    m = Model(*study.train_model(data, run_dir(root, "none", config), train_cfg("none", config, seed)))
    images, masks, cells = load_all(data)
    _, feats = m.features(images, masks, config.batch)
    calib = study.load_split(data, "train")[0][:64]
    rv = audit.randomized_variables(m.model.config, jax.random.fold_in(jax.random.key(seed), 1), calib)
    settings = audit.RelianceSettings(regions=("cell", "context"), fills=("noise",), cri_fill="noise")
    rel = audit.reliance(audit.efficientnet_logits(m.model, m.variables), images, masks,
                         key=jax.random.fold_in(jax.random.key(seed), 2), settings=settings, batch_size=config.batch)
    cri = np.asarray(rel.cri, np.float64)
    # The random model explains the trained model's class (audit.random_baseline), chunked.
    cgc = np.concatenate([
        np.asarray(audit.random_baseline(m.model, m.variables, x, k, random_variables=rv, layer="stem",
                                         method="layercam").corrected, np.float64)[:n]
        for (x, k), n in _chunks((images, masks), config.batch)])
    flags = {"cri": cri > CRI_FLAG, "cgc": cgc < CGC_FLAG}
    flags["either"] = flags["cri"] | flags["cgc"]
    out = {"plate": plate, "seed": seed, "cells": int(len(cells)), "all": map_of(cells, feats, config.null_size),
           "flag_rule": f"CRI(noise) > {CRI_FLAG} or corrected LayerCAM Grad-CAMO at the stem < {CGC_FLAG}",
           "cri_undefined_fraction": float(np.isnan(cri).mean()), "filters": {}}
    rng = np.random.default_rng([seed, 20])
    for name, flag in flags.items():
        keep = ~flag
        res = {"dropped": int(flag.sum()), "dropped_fraction": float(flag.mean()),
               "dropped_by_class": {int(k): int(v) for k, v in
                                    pd.Series(flag).groupby(cells["Metadata_Class"].to_numpy()).sum().items()}}
        try:
            res["audit"] = map_of(cells[keep].reset_index(drop=True), feats[keep], config.null_size)
        except ValueError as e:  # a well or group emptied
            res["audit"] = {"error": str(e)}
        draws = []
        for _ in range(config.random_draws):
            drop = rng.choice(len(cells), size=int(flag.sum()), replace=False)
            k = np.ones(len(cells), bool)
            k[drop] = False
            try:
                draws.append(map_of(cells[k].reset_index(drop=True), feats[k], config.null_size)["mean_map"])
            except ValueError:
                draws.append(float("nan"))
        res["random_mean_map"] = study.mean_sd(draws)
        res["random_draws"] = draws
        out["filters"][name] = res
    out["seconds"] = time.perf_counter() - t0
    formats.write_json(out, done)
    f = out["filters"]["either"]
    log(f"{plate} filter: mAP all {out['all']['mean_map']:.3f}; audit-filtered ({f['dropped']} cells) "
        f"{f['audit'].get('mean_map', float('nan')):.3f}; random {f['random_mean_map']['mean']:.3f} "
        f"± {f['random_mean_map']['sd']:.3f} ({out['seconds']:.0f} s)")
    return out


def time_steps(work: Path, plate: str, seed: int, config: Config, log) -> dict:
    """Seconds per training step of each remedy, data pipeline included, timed back to back in
    this process (after one compiling step; two rounds, the faster kept) on `plate`."""
    import jax

    from gradcamo_jax import sharding, train
    from gradcamo_jax.data import formats, pipeline

    root = study.plate_dir(work, PLATES[plate], seed, config.plate)
    cache = root / f"remedy_step_cost_{config.steps}steps_{config.time_steps}.json"
    if cache.exists() and set(json.loads(cache.read_text())) >= set(config.remedies):
        return json.loads(cache.read_text())
    data = study.make_dataset(root, PLATES[plate], seed, config.plate)
    out = {}
    runs = {}
    for remedy in config.remedies:
        cfg = train_cfg(remedy, config, seed)
        ds = pipeline.open_dataset(str(data), cfg.data)
        mesh = sharding.make_mesh()
        runner = train.make_runner(cfg, mesh, train.class_weight_vector(cfg, ds.class_counts("train")))
        state = runner.put_state(train.create_state(cfg, train.training_model_config(cfg), ds.input_shape))
        it = pipeline.make_iterator(pipeline.train_dataset(ds.sources["train"], cfg.data, cfg.seed), cfg.data)
        state, metrics = runner.step(state, runner.put_batch(next(it)))  # compile
        jax.block_until_ready(metrics)
        runs[remedy] = (runner, state, it)
    for _ in range(2):
        for remedy, (runner, state, it) in runs.items():
            t = time.perf_counter()
            for _ in range(config.time_steps):
                state, metrics = runner.step(state, runner.put_batch(next(it)))
            jax.block_until_ready(metrics)
            dt = (time.perf_counter() - t) / config.time_steps
            runs[remedy] = (runner, state, it)
            out[remedy] = min(out.get(remedy, np.inf), dt)
    base = out.get("none", float("nan"))
    res = {r: {"s_per_step": v, "x_none": v / base} for r, v in out.items()}
    log("step cost: " + ", ".join(f"{r} {v['s_per_step']:.3f} s ({v['x_none']:.2f}×)" for r, v in res.items()))
    formats.write_json(res, cache)
    return res


def table(models: list[dict], cost: dict) -> pd.DataFrame:
    rows = []
    for r in models:
        row = {"plate": r["plate"], "remedy": r["remedy"], "seed": r["seed"], "clean_accuracy": r["clean_accuracy"],
               "clean_mAP": r["clean_map"]["mean_map"], "clean_retrieved": r["clean_map"]["fraction_retrieved"],
               "test_accuracy": r["test_accuracy"]}
        for k in ("cri_noise", "drop_context_noise", "drop_context_swap", "drop_cell_noise", "drop_background_noise",
                  "gc_stem_layercam", "gc_stage2_layercam", "gc_stem_gradcam", "gc_stage2_gradcam"):
            row[k] = r["test"][k]
        row["step_x_none"] = cost.get(r["remedy"], {}).get("x_none", float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, filters: list[dict], path: Path, null: dict | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    colours = {"mixture": "#cc6677", "site": "#4477aa"}
    for ax, key, title in ((axes[0], "clean_accuracy", "accuracy: clean cell plate (●), own test wells (○)"),
                           (axes[1], "clean_mAP", "copairs mAP, clean plate"),
                           (axes[2], "cri_noise", "context-reliance index (test wells)")):
        for k, (plate, g) in enumerate(df.groupby("plate", sort=False)):
            x = np.arange(len(g))
            ax.plot(x + 0.1 * k, g[key], "o", color=colours.get(plate, "k"), label=f"trained on {plate}")
            if key == "clean_accuracy":
                ax.plot(x + 0.1 * k, g["test_accuracy"], "o", mfc="none", color=colours.get(plate, "k"))
            ax.set_xticks(x, g["remedy"], fontsize=8, rotation=20)
        if key == "clean_accuracy":
            ax.axhline(1 / 3, color="k", ls=":", lw=1, label="chance")
        if key == "clean_mAP" and null:
            nm = [v["mean_map"] for v in null.values()]
            ax.axhline(float(np.mean(nm)), color="k", ls=":", lw=1, label="random profiles (null)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[3]
    for k, f in enumerate(filters):
        names = list(f["filters"])
        x = np.arange(len(names) + 1) + 0.15 * k
        audit_m = [f["all"]["mean_map"]] + [f["filters"][n]["audit"].get("mean_map", np.nan) for n in names]
        rand = [np.nan] + [f["filters"][n]["random_mean_map"]["mean"] for n in names]
        rsd = [0] + [f["filters"][n]["random_mean_map"]["sd"] for n in names]
        ax.plot(x, audit_m, "o", color=colours.get(f["plate"], "k"), label=f"{f['plate']}: audit drop")
        ax.errorbar(x, rand, yerr=rsd, fmt="x", color=colours.get(f["plate"], "k"), alpha=0.6,
                    label=f"{f['plate']}: random drop (sd)")
        ax.set_xticks(np.arange(len(names) + 1), ["all cells"] + [f"drop {n}" for n in names], fontsize=8)
    ax.set_title("mAP, none model, confounded plate", fontsize=10)
    if filters:
        ax.legend(fontsize=7)
    return study.save_figure(fig, path)


def write(out: Path, models, filters, cost, config: Config, t0: float, argv, null=None) -> dict:
    import jax

    df = table(models, cost)
    summary = {"models": models, "filters": filters, "step_cost": cost, "table": df.to_dict(orient="records"),
               "clean_null_map": null,
               "setup": {"config": dataclasses.asdict(config), "remedies": REMEDIES, "plates": PLATES, "clean": CLEAN,
                         "clean_seed": f"seed + {CLEAN_SEED_OFFSET}", "backend": jax.default_backend(),
                         "wall_s": round(time.perf_counter() - t0, 1),
                         "command": "python -m experiments.remedies " + " ".join(argv)}}
    (out / "remedies.json").write_text(json.dumps(summary, indent=1, default=float))
    df.to_csv(out / "remedies_table.csv", index=False, float_format="%.4f")
    if len(df):
        plot(df, filters, out / "remedies.png", null)
    return summary


def main(argv=None) -> dict:
    p = study.arg_parser(__doc__, "CPU, <= 20 min on 2 cores: 1 seed, 200 steps, the mixture plate, remedies none, mask, "
                                  "randomize, attenuate (--plates/--remedies add the site plate and the penalty)")
    p.add_argument("--plates", nargs="+", choices=list(PLATES))
    p.add_argument("--remedies", nargs="+", choices=list(REMEDIES))
    p.add_argument("--no-timing", action="store_true", help="skip the back-to-back step timing")
    p.add_argument("--summarize", action="store_true",
                   help="only the cached results (no training, no timing unless cached; step cost else from "
                        "OUT/remedies.json), rewritten with the null mAP")
    p.add_argument("--timing-only", action="store_true", help="only the step-cost timing (cached), then --summarize")
    args = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    config = QUICK if args.quick else Config()
    for name in ("plates", "remedies", "seeds"):
        if getattr(args, name):
            config = dataclasses.replace(config, **{name: tuple(getattr(args, name))})
    if args.steps:
        config = dataclasses.replace(config, steps=args.steps)
    if args.no_timing:
        config = dataclasses.replace(config, time_steps=0)
    out, work, log = study.start(args, "remedies")
    t0 = time.perf_counter()
    if args.timing_only:
        time_steps(work, config.plates[0], config.seeds[0], config, log)
    if args.summarize or args.timing_only:
        return summarize_cached(out, work, config, t0, argv, log)
    models, filters, cost = [], [], {}
    for seed in config.seeds:
        for plate in config.plates:
            for remedy in config.remedies:
                models.append(run_model(work, plate, remedy, seed, config, log))
                write(out, models, filters, cost, config, t0, argv)
                if remedy == "none":  # the filter study needs only the none model: run it early
                    filters.append(filter_study(work, plate, seed, config, log))
                    write(out, models, filters, cost, config, t0, argv)
    if config.time_steps:
        cost = time_steps(work, config.plates[0], config.seeds[0], config, log)
    null = {str(s): null_map(work, s, config) for s in config.seeds}
    summary = write(out, models, filters, cost, config, t0, argv, null)
    print(table(models, cost).to_string(float_format=lambda v: f"{v:.3f}"))
    log(f"wrote {out / 'remedies.json'}, remedies.png, remedies_table.csv")
    return summary


def summarize_cached(out: Path, work: Path, config: Config, t0: float, argv, log) -> dict:
    """`write` from the per-model JSONs already under `work` (what a run has finished)."""
    models, filters = [], []
    for seed in config.seeds:
        for plate in config.plates:
            root = study.plate_dir(work, PLATES[plate], seed, config.plate)
            for remedy in config.remedies:
                f = root / f"remedy_{remedy}_{config.steps}steps.json"
                if f.exists():
                    models.append(json.loads(f.read_text()))
            f = root / f"remedy_filter_{config.steps}steps.json"
            if f.exists():
                filters.append(json.loads(f.read_text()))
    root = study.plate_dir(work, PLATES[config.plates[0]], config.seeds[0], config.plate)
    cache = root / f"remedy_step_cost_{config.steps}steps_{config.time_steps}.json"
    cost = {}
    if cache.exists():
        cost = json.loads(cache.read_text())
    elif (out / "remedies.json").exists():
        cost = json.loads((out / "remedies.json").read_text()).get("step_cost") or {}
    null = {str(s): null_map(work, s, config) for s in config.seeds}
    summary = write(out, models, filters, cost, config, t0, argv, null)
    print(table(models, cost).to_string(float_format=lambda v: f"{v:.3f}"))
    log(f"summarized {len(models)} models, {len(filters)} filter studies; clean-plate null mAP "
        + ", ".join(f"seed {s}: {v['mean_map']:.3f}" for s, v in null.items()))
    return summary


if __name__ == "__main__":
    main()
