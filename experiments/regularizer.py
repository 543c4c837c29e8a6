"""Grad-CAMO as a training regulariser: ``loss = CE + λ·(1 − Grad-CAMO)``.

The model is trained on a *mixture* plate (a weak dose signal in the cells beside a strong
one in the background between them, the shortcut), once per λ, and evaluated on

* the mixture plate's own held-out (test) wells: accuracy and mean Grad-CAMO;
* a clean plate of the same cell signal and no background signal (``cell`` mode, a new
  plate seed): accuracy there says whether the model learned the cells' biology or the
  shortcut, which is absent on that plate.

Step time is measured against λ = 0 (the penalty is a gradient through a CAM, i.e. a
second-order pass through the network below the CAM layer).

    python -m experiments.regularizer --quick        # λ = 0; 1, 4 at stage2; 4 at the stem; 2 seeds (CPU)
    python -m experiments.regularizer                # 5 λ at stage2, 2 at the stem, 3 seeds, 600 steps (GPU)

Writes ``OUT/regularizer.json`` and ``OUT/regularizer.png``; work files (cached,
resumable) under ``--work`` (default ``OUT/work``, which `confounders.py` may share).
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

MIXTURE = {"cell": 1.0, "background": 1.5}
CLEAN = {"cell": 1.0}


@dataclasses.dataclass(frozen=True)
class Config:
    """Sweep size; `QUICK` is the CPU setting.

    Attributes:
      runs: ``(penalty layer, λ)`` pairs, each trained once per seed; λ = 0 is the
        unregularised baseline (its layer is ignored). Every model is evaluated at every
        penalty layer of the list.
      seeds: each seed draws new plates, split and initialisation.
      steps: optimiser steps per run.
      method: the CAM method of the penalty and the evaluation (Grad-CAM is also scored).
      plate: plate geometry (`study.PlateSpec`).
    """

    runs: tuple[tuple[str, float], ...] = (("stage2", 0.0), ("stage2", 0.25), ("stage2", 1.0), ("stage2", 4.0),
                                           ("stage2", 16.0), ("stem", 1.0), ("stem", 4.0))
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 600
    method: str = "layercam"
    plate: study.PlateSpec = study.PlateSpec(wells_per_dose=12, sites_per_well=3)


    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(layer for layer, _ in self.runs))


QUICK = Config(runs=(("stage2", 0.0), ("stage2", 1.0), ("stage2", 4.0), ("stem", 4.0)), seeds=(0, 1), steps=200,
               plate=study.PlateSpec(wells_per_dose=8, sites_per_well=2))


def run_one(work: Path, weight: float, layer: str, seed: int, config: Config, log) -> dict:
    """Train at one λ (penalty CAM at `layer`) on the mixture plate of `seed`; evaluate on its
    test wells and on the clean plate, at every layer of `config.layers`."""
    from gradcamo_jax import EfficientNet
    from gradcamo_jax.data import formats

    root = study.plate_dir(work, MIXTURE, seed, config.plate)
    tag = f"lambda{weight:g}_{layer}_{config.method}_{config.steps}steps" if weight else f"lambda0_{config.steps}steps"
    done = root / f"{tag}.json"
    if done.exists():
        return json.loads(done.read_text())
    mix = study.make_dataset(root, MIXTURE, seed, config.plate)
    clean = study.make_dataset(study.plate_dir(work, CLEAN, 1000 + seed, config.plate), CLEAN, 1000 + seed,
                               config.plate)
    cfg = study.train_config(config.plate, config.steps, seed, gradcamo_weight=weight, gradcamo_layer=layer,
                             gradcamo_method=config.method)
    trained, variables, info = study.train_model(mix, root / f"run_{tag}", cfg)
    model = EfficientNet(trained.model)
    out = {"lambda": weight, "penalty_layer": layer if weight else "none", "seed": seed,
           "steps_per_second": info["steps_per_second"], "train_s": info["seconds"]}
    for name, data in (("mixture_test", mix), ("clean_test", clean)):
        images, masks, cells = study.load_split(data, "test")
        by_layer = {lay: study.score_cells(model, variables, images, masks, layer=lay,
                                           methods=tuple(dict.fromkeys((config.method, "gradcam"))))
                    for lay in config.layers}
        # Prediction and chance level do not depend on the CAM layer: read them from the first.
        first = by_layer[config.layers[0]][config.method]
        out[name] = {"cells": int(len(cells)),
                     "accuracy": float((first["predicted"].to_numpy() == cells["Metadata_Class"].to_numpy()).mean()),
                     "chance": float(first["chance"].mean())}
        for lay, s in by_layer.items():
            out[name][f"mean_gradcamo_{lay}"] = float(s[config.method]["gradcamo"].mean())
            out[name][f"mean_gradcamo_gradcam_{lay}"] = float(s["gradcam"]["gradcamo"].mean())
            out[name][f"attention_background_{lay}"] = float(s[config.method]["background"].mean())
    formats.write_json(out, done)
    log(f"λ={weight:g} @ {out['penalty_layer']} seed {seed}: mixture acc {out['mixture_test']['accuracy']:.2f} "
        f"Grad-CAMO {out['mixture_test'][f'mean_gradcamo_{config.layers[0]}']:.3f}; "
        f"clean acc {out['clean_test']['accuracy']:.2f}; {out['steps_per_second']:.2f} steps/s")
    return out


def summarize(runs: list[dict]) -> dict:
    rows = []
    for r in runs:
        rows.append({"run": r["penalty_layer"] + f" λ={r['lambda']:g}" if r["lambda"] else "λ=0",
                     "seed": r["seed"], "steps_per_second": r["steps_per_second"],
                     **{f"{split}_{k}": v for split in ("mixture_test", "clean_test") for k, v in r[split].items()}})
    df = pd.DataFrame(rows)
    base = df[df["run"] == "λ=0"]["steps_per_second"].mean()
    table = {}
    for run, g in df.groupby("run", sort=False):
        table[run] = {k: study.mean_sd(g[k]) for k in df.columns if k not in ("run", "seed")}
        table[run]["step_time_vs_lambda0"] = float(base / g["steps_per_second"].mean())
    return {"by_run": table, "runs": rows}


def plot(summary: dict, path: Path, layer: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(summary["by_run"])
    x = np.arange(len(runs))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, title in ((axes[0], "accuracy", "accuracy (test wells)"),
                           (axes[1], f"mean_gradcamo_{layer}", f"mean Grad-CAMO at {layer} (test wells)")):
        for k, (split, colour) in enumerate((("mixture_test", "#cc6677"), ("clean_test", "#4477aa"))):
            m = [summary["by_run"][r][f"{split}_{key}"]["mean"] for r in runs]
            sd = [summary["by_run"][r][f"{split}_{key}"]["sd"] for r in runs]
            ax.errorbar(x + 0.05 * (k - 0.5), m, yerr=sd, marker="o", capsize=4, color=colour, ls="none",
                        label={"mixture_test": "mixture plate (shortcut present)",
                               "clean_test": "clean cell plate (no shortcut)"}[split])
        if key == "accuracy":
            ax.axhline(1 / 3, color="k", ls=":", lw=1, label="chance (3 classes)")
        else:
            ch = [summary["by_run"][r]["clean_test_chance"]["mean"] for r in runs]
            ax.plot(x, ch, "k--", lw=1, label="chance (volume fraction)")
        ax.set_xticks(x, runs, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    return study.save_figure(fig, path)


def main(argv=None) -> dict:
    p = study.arg_parser(__doc__, "4 runs (λ = 0; 1, 4 at stage2; 4 at the stem) × 2 seeds, 200 steps (CPU)")
    p.add_argument("--runs", nargs="+", metavar="LAYER=LAMBDA",
                   help="penalty runs, e.g. stage2=0 stage2=1 stem=4 (default: see Config)")
    args = p.parse_args(argv)
    config = QUICK if args.quick else Config()
    if args.runs:
        config = dataclasses.replace(config, runs=tuple((r.split("=")[0], float(r.split("=")[1])) for r in args.runs))
    if args.seeds:
        config = dataclasses.replace(config, seeds=tuple(args.seeds))
    if args.steps:
        config = dataclasses.replace(config, steps=args.steps)
    out, work, log = study.start(args, "regularizer")
    t0 = time.perf_counter()

    runs = [run_one(work, w, lay, s, config, log) for s in config.seeds for lay, w in config.runs]
    summary = summarize(runs)
    import jax

    summary["setup"] = {"config": dataclasses.asdict(config), "mixture": MIXTURE, "clean": CLEAN,
                        "backend": jax.default_backend(), "wall_s": round(time.perf_counter() - t0, 1),
                        "command": "python -m experiments.regularizer " + " ".join(argv or sys.argv[1:])}
    (out / "regularizer.json").write_text(json.dumps(summary, indent=1, default=float))
    plot(summary, out / "regularizer.png", config.layers[0])
    print(f"\nλ sweep on the mixture plate ({config.method}), mean ± sd over {len(config.seeds)} seeds; "
          f"Grad-CAMO columns: {config.method} at each layer, then Grad-CAM")
    cols = ["mixture_test_accuracy", "clean_test_accuracy"]
    cols += [f"{sp}_mean_gradcamo_{lay}" for sp in ("mixture_test", "clean_test") for lay in config.layers]
    cols += [f"clean_test_mean_gradcamo_gradcam_{lay}" for lay in config.layers]
    print(f"{'run':>14s} " + " ".join(f"{c.replace('_test', '').replace('mean_gradcamo', 'GCO'):>22s}" for c in cols)
          + "  step time ×")
    for run, r in summary["by_run"].items():
        print(f"{run:>14s} " + " ".join(f"{r[c]['mean']:13.3f} ± {r[c]['sd']:5.3f}" for c in cols)
              + f" {r['step_time_vs_lambda0']:8.2f}")
    print(f"wrote {out / 'regularizer.json'} and {out / 'regularizer.png'} in {time.perf_counter() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
