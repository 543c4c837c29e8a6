"""Planted-confounder study: does Grad-CAMO tell a model that reads the cell from one that cheats?

For each signal mode, synthetic plates whose dose signal sits in a known place (the cells,
the background between them, only some neighbours, a site-wide batch effect, or a weak
cell signal beside a strong background shortcut) are cropped, the same small model is
trained on each, and its held-out (test) wells are explained with every CAM method at
several layers. Reported per mode, as mean ± sd over seeds (each seed draws a new plate,
split and initialisation): test accuracy, mean Grad-CAMO, fraction of cells above 0.5,
chance level, attention split; and the per-cell AUROC of Grad-CAMO for telling the cells
of the cell-signal model from those of each shortcut model. In ``neighbor`` mode the
ground truth says which cells carry the signal, so the AUROC of marked vs unmarked cells
within that one model is reported too. The same architecture with untrained random weights
("untrained", BatchNorm calibrated) is scored on the cell plate as a model-randomisation
baseline: what Grad-CAMO reaches from image structure alone.

    python -m experiments.confounders --quick            # ≈ 12 min on 2 CPU cores
    python -m experiments.confounders --out DIR          # full: more steps, bigger plates, 5 seeds

Writes ``OUT/confounders.json``, ``OUT/confounders.png`` and ``OUT/cells.parquet`` (every
test cell × layer × method); work files under ``OUT/work/`` (cached, resumable).
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

MODES: dict[str, dict[str, float]] = {
    "cell": {"cell": 2.0},
    "background": {"background": 1.5},
    "neighbor": {"neighbor": 2.0},
    "site": {"site": 1.0},
    "mixture": {"cell": 0.5, "background": 1.5},
}
SHORTCUTS = ("background", "neighbor", "site", "mixture")
LAYERS = ("stem", "stage1", "stage2", "stage3", "stage4")
METHODS = ("gradcam", "gradcam++", "hirescam", "layercam", "xgradcam")
PRIMARY = ("stage2", "gradcam")


@dataclasses.dataclass(frozen=True)
class Config:
    """Study size. `quick` is the CPU setting; the default is meant for a GPU."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 600
    plate: study.PlateSpec = study.PlateSpec(wells_per_dose=12, sites_per_well=3)
    modes: tuple[str, ...] = tuple(MODES)
    layers: tuple[str, ...] = LAYERS
    methods: tuple[str, ...] = METHODS


QUICK = Config(seeds=(0, 1, 2), steps=200, plate=study.PlateSpec(wells_per_dose=8, sites_per_well=2))


def score_all(model, variables, images, masks, cells: pd.DataFrame, config: Config) -> pd.DataFrame:
    """Every test cell × layer × method: the cell's keys, class and ``Marked`` beside its
    prediction, Grad-CAMO split and ``correct``."""
    keep = [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber",
                        "Metadata_Class", "Marked") if c in cells]
    parts = []
    for layer in config.layers:
        for method, sc in study.score_cells(model, variables, images, masks, layer=layer,
                                            methods=config.methods).items():
            parts.append(pd.concat([cells[keep], sc], axis=1).assign(layer=layer, method=method))
    out = pd.concat(parts, ignore_index=True)
    out["correct"] = out["predicted"] == out["Metadata_Class"]
    return out


def run_one(work: Path, mode: str, seed: int, config: Config, log) -> pd.DataFrame:
    """One plate + model: per test cell × layer × method scores (cached in ``cells.parquet``)."""
    from gradcamo_jax import EfficientNet
    from gradcamo_jax.data import formats

    root = study.plate_dir(work, MODES[mode], seed, config.plate)
    done = root / f"cells_{config.steps}steps.parquet"
    if done.exists():
        return pd.read_parquet(done)
    t0 = time.perf_counter()
    data = study.make_dataset(root, MODES[mode], seed, config.plate)
    t1 = time.perf_counter()
    train_cfg = study.train_config(config.plate, config.steps, seed)
    trained, variables, info = study.train_model(data, root / f"run_{config.steps}steps", train_cfg)
    t2 = time.perf_counter()
    images, masks, cells = study.load_split(data, "test")
    out = score_all(EfficientNet(trained.model), variables, images, masks, cells, config).assign(mode=mode, seed=seed)
    t3 = time.perf_counter()
    formats.write_table(out, done)
    formats.write_json({"data_s": t1 - t0, "train_s": t2 - t1, "score_s": t3 - t2, "train": info},
                      root / f"timing_{config.steps}steps.json")
    log(f"{mode} seed {seed}: {len(cells)} test cells, accuracy {out['correct'].mean():.2f}, "
        f"data {t1 - t0:.0f} s, train {t2 - t1:.0f} s, score {t3 - t2:.0f} s")
    return out


def run_untrained(work: Path, seed: int, config: Config) -> pd.DataFrame:
    """The model-randomisation baseline (Adebayo et al. 2018): the same architecture with its
    initial random weights (BatchNorm statistics calibrated on 64 training crops, so
    inference-mode activations do not vanish) scored on the ``cell`` plate's test cells.
    A score that a model which learned nothing also reaches is not evidence of looking at
    the cell; this, not only the volume fraction, is the level to beat."""
    import jax

    from gradcamo_jax import EfficientNet, audit
    from gradcamo_jax.data import formats

    root = study.plate_dir(work, MODES["cell"], seed, config.plate)
    done = root / "untrained.parquet"
    if done.exists():
        return pd.read_parquet(done)
    data = study.make_dataset(root, MODES["cell"], seed, config.plate)
    cfg = study.train_config(config.plate, config.steps, seed)
    train_images, _, _ = study.load_split(data, "train")
    variables = audit.randomized_variables(cfg.model, jax.random.key(seed), train_images[:64])
    images, masks, cells = study.load_split(data, "test")
    out = score_all(EfficientNet(cfg.model), variables, images, masks, cells, config).assign(mode="untrained", seed=seed)
    formats.write_table(out, done)
    return out


def marked_aurocs(sub: pd.DataFrame) -> list[float]:
    """Per seed, AUROC of Grad-CAMO for marked vs unmarked cells of the neighbor model."""
    nb = sub[sub["mode"] == "neighbor"]
    return [study.auroc(g[g["Marked"].astype(bool)]["gradcamo"], g[~g["Marked"].astype(bool)]["gradcamo"])
            for _, g in nb.groupby("seed")]


def summarize(cells: pd.DataFrame, config: Config) -> dict:
    """The numbers of confounders.json from the per-cell table."""
    layer, method = PRIMARY
    prim = cells[(cells["layer"] == layer) & (cells["method"] == method)]
    per_seed = prim.groupby(["mode", "seed"]).agg(
        accuracy=("correct", "mean"), mean_gradcamo=("gradcamo", "mean"),
        frac_above_half=("gradcamo", lambda s: float((s.dropna() > 0.5).mean())),
        chance=("chance", "mean"), attention_neighbors=("neighbors", "mean"),
        attention_background=("background", "mean"), undefined=("gradcamo", lambda s: int(s.isna().sum())),
        cells=("gradcamo", "size"),
    ).reset_index()
    modes = {}
    for mode, g in per_seed.groupby("mode", sort=False):
        modes[mode] = {k: study.mean_sd(g[k]) for k in per_seed.columns if k not in ("mode", "seed")}
        by_class = prim[prim["mode"] == mode].groupby("Metadata_Class")["gradcamo"].mean()
        modes[mode]["mean_gradcamo_by_class"] = {int(k): float(v) for k, v in by_class.items()}

    def aurocs(sub: pd.DataFrame, shortcut: str) -> list[float]:
        out = []
        for seed in config.seeds:
            pos = sub[(sub["mode"] == "cell") & (sub["seed"] == seed)]["gradcamo"]
            neg = sub[(sub["mode"] == shortcut) & (sub["seed"] == seed)]["gradcamo"]
            if len(pos) and len(neg):
                out.append(study.auroc(pos, neg))
        return out

    shortcuts = [m for m in SHORTCUTS if m in config.modes]
    compared = shortcuts + (["untrained"] if "untrained" in set(cells["mode"]) else [])
    auroc = {m: {**study.mean_sd(aurocs(prim, m)), "per_seed": aurocs(prim, m)} for m in compared} \
        if "cell" in config.modes else {}

    grid = []
    for (lay, meth), sub in cells.groupby(["layer", "method"]):
        row = {"layer": lay, "method": meth}
        for m in compared if "cell" in config.modes else []:
            row[f"auroc_cell_vs_{m}"] = study.mean_sd(aurocs(sub, m))["mean"]
        row["mean_gradcamo_cell_model"] = float(sub[sub["mode"] == "cell"]["gradcamo"].mean())
        if "neighbor" in config.modes:
            row["auroc_marked_vs_unmarked"] = study.mean_sd(marked_aurocs(sub))["mean"]
        grid.append(row)
    grid = pd.DataFrame(grid)
    # The ranking averages over the shortcut models only (the untrained model is a baseline).
    auroc_cols = [f"auroc_cell_vs_{m}" for m in shortcuts if f"auroc_cell_vs_{m}" in grid.columns]
    if auroc_cols:
        grid["auroc_mean"] = grid[auroc_cols].mean(axis=1)
        grid = grid.sort_values("auroc_mean", ascending=False)

    neighbor = {}
    if "neighbor" in config.modes:
        nb = prim[prim["mode"] == "neighbor"]
        marked = nb["Marked"].astype(bool)
        per = marked_aurocs(prim)
        neighbor = {
            "auroc_marked_vs_unmarked": {**study.mean_sd(per), "per_seed": per},
            "mean_gradcamo_marked": float(nb[marked]["gradcamo"].mean()),
            "mean_gradcamo_unmarked": float(nb[~marked]["gradcamo"].mean()),
            "accuracy_marked": float(nb[marked]["correct"].mean()),
            "accuracy_unmarked": float(nb[~marked]["correct"].mean()),
        }
    return {
        "primary": {"layer": layer, "method": method},
        "modes": modes,
        "auroc_cell_model_vs_shortcut": auroc,
        "neighbor_mode": neighbor,
        "layer_method_grid": grid.to_dict(orient="records"),
        "per_seed": per_seed.to_dict(orient="records"),
    }


def plot(summary: dict, path: Path, config: Config) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in (*config.modes, "untrained") if m in summary["modes"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    x = np.arange(len(modes))
    mean = [summary["modes"][m]["mean_gradcamo"]["mean"] for m in modes]
    sd = [summary["modes"][m]["mean_gradcamo"]["sd"] for m in modes]
    chance = [summary["modes"][m]["chance"]["mean"] for m in modes]
    acc = [summary["modes"][m]["accuracy"]["mean"] for m in modes]
    ax.bar(x, mean, yerr=sd, color="#4477aa", capsize=4, label="mean Grad-CAMO")
    ax.scatter(x, chance, color="k", marker="_", s=600, zorder=3, label="chance (cell volume fraction)")
    for i, a in enumerate(acc):
        ax.text(i, mean[i] + (sd[i] if np.isfinite(sd[i]) else 0) + 0.01, f"acc {a:.2f}", ha="center", fontsize=8)
    ax.set_xticks(x, modes)
    ax.set_ylabel("Grad-CAMO (test wells)")
    ax.set_title(f"Grad-CAMO by planted signal ({summary['primary']['method']} @ {summary['primary']['layer']})")
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[1]
    cell = np.array(mean)
    neigh = np.array([summary["modes"][m]["attention_neighbors"]["mean"] for m in modes])
    back = np.array([summary["modes"][m]["attention_background"]["mean"] for m in modes])
    ax.bar(x, cell, color="#4477aa", label="central cell")
    ax.bar(x, neigh, bottom=cell, color="#ccbb44", label="neighbours")
    ax.bar(x, back, bottom=cell + neigh, color="#aaaaaa", label="background")
    ax.set_xticks(x, modes)
    ax.set_ylim(0, 1)
    ax.set_title("attention split")
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[2]
    grid = pd.DataFrame(summary["layer_method_grid"])
    if "auroc_mean" in grid:
        table = grid.pivot(index="method", columns="layer", values="auroc_mean")
        table = table[[c for c in config.layers if c in table.columns]]
        im = ax.imshow(table.to_numpy(), vmin=0, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(table.shape[1]), table.columns)
        ax.set_yticks(range(table.shape[0]), table.index)
        for i in range(table.shape[0]):
            for j in range(table.shape[1]):
                ax.text(j, i, f"{table.iat[i, j]:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title("AUROC cell model vs shortcut models (mean)")
    return study.save_figure(fig, path)


def main(argv=None) -> dict:
    p = study.arg_parser(__doc__, "3 seeds, 200 steps, 8 wells per dose (CPU)")
    p.add_argument("--modes", nargs="+", choices=list(MODES))
    args = p.parse_args(argv)
    config = QUICK if args.quick else Config()
    if args.seeds:
        config = dataclasses.replace(config, seeds=tuple(args.seeds))
    if args.steps:
        config = dataclasses.replace(config, steps=args.steps)
    if args.modes:
        config = dataclasses.replace(config, modes=tuple(args.modes))
    out, work, log = study.start(args, "confounders")
    t0 = time.perf_counter()

    parts = [run_one(work, m, s, config, log) for s in config.seeds for m in config.modes]
    if "cell" in config.modes:
        parts += [run_untrained(work, s, config) for s in config.seeds]
    cells = pd.concat(parts, ignore_index=True)
    summary = summarize(cells, config)
    import jax

    summary["setup"] = {"config": dataclasses.asdict(config), "modes": {m: MODES[m] for m in config.modes},
                        "backend": jax.default_backend(), "devices": jax.device_count(),
                        "wall_s": round(time.perf_counter() - t0, 1),
                        "command": "python -m experiments.confounders " + " ".join(argv or sys.argv[1:])}
    cells.to_parquet(out / "confounders_cells.parquet", index=False)
    (out / "confounders.json").write_text(json.dumps(summary, indent=1, default=float))
    plot(summary, out / "confounders.png", config)
    layer, method = PRIMARY
    print(f"\nGrad-CAMO ({method} @ {layer}), test wells, mean ± sd over {len(config.seeds)} seeds")
    print(f"{'mode':12s} {'accuracy':>14s} {'Grad-CAMO':>14s} {'>0.5':>6s} {'chance':>7s} {'neigh':>6s} {'backgr':>6s}")
    for m, r in summary["modes"].items():
        print(f"{m:12s} {r['accuracy']['mean']:6.3f} ± {r['accuracy']['sd']:5.3f} "
              f"{r['mean_gradcamo']['mean']:6.3f} ± {r['mean_gradcamo']['sd']:5.3f} {r['frac_above_half']['mean']:6.3f} "
              f"{r['chance']['mean']:7.3f} {r['attention_neighbors']['mean']:6.3f} {r['attention_background']['mean']:6.3f}")
    for m, r in summary["auroc_cell_model_vs_shortcut"].items():
        print(f"AUROC cell model vs {m:10s}: {r['mean']:.3f} ± {r['sd']:.3f}")
    if summary["neighbor_mode"]:
        r = summary["neighbor_mode"]["auroc_marked_vs_unmarked"]
        print(f"AUROC marked vs unmarked cells (neighbor model): {r['mean']:.3f} ± {r['sd']:.3f}")
    print(pd.DataFrame(summary["layer_method_grid"]).head(8).to_string(index=False, float_format="%.3f"))
    print(f"wrote {out / 'confounders.json'} and {out / 'confounders.png'} in {time.perf_counter() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
