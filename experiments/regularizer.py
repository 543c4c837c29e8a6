"""Grad-CAMO as a training regulariser: ``loss = CE + λ·(1 − Grad-CAMO)``.

The model is trained on a *mixture* plate (a weak dose signal in the cells beside a strong
one in the background between them, the shortcut), once per λ, and evaluated on

* the mixture plate's own held-out (test) wells: accuracy and mean Grad-CAMO;
* a clean plate of the same cell signal and no background signal (``cell`` mode, a new
  plate seed): accuracy there says whether the model learned the cells' biology or the
  shortcut, which is absent on that plate.

Step time is measured against λ = 0 (the penalty is a gradient through a CAM, i.e. a
second-order pass through the network below the CAM layer).

    python experiments/regularizer.py --quick        # 3 λ × 2 seeds on 2 CPU cores
    python experiments/regularizer.py                # 5 λ × 3 seeds, longer runs (GPU)

Writes ``OUT/regularizer.json`` and ``OUT/regularizer.png``; work files (cached,
resumable) under ``--work``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study  # noqa: E402

MIXTURE = {"cell": 1.0, "background": 1.5}
CLEAN = {"cell": 1.0}


@dataclasses.dataclass(frozen=True)
class Config:
    """Sweep size; `QUICK` is the CPU setting.

    Attributes:
      weights: the λ values.
      seeds: each seed draws new plates, split and initialisation.
      steps: optimiser steps per run.
      layer, method: the CAM inside the penalty and in the evaluation.
      plate: plate geometry (`study.PlateSpec`).
    """

    weights: tuple[float, ...] = (0.0, 0.25, 1.0, 4.0, 16.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 600
    layer: str = "stage2"
    method: str = "layercam"
    plate: study.PlateSpec = study.PlateSpec(wells_per_dose=12, sites_per_well=3)


QUICK = Config(weights=(0.0, 1.0, 4.0), seeds=(0, 1), steps=200, plate=study.PlateSpec(wells_per_dose=8, sites_per_well=2))


def run_one(work: Path, weight: float, seed: int, config: Config, log) -> dict:
    """Train at one λ on the mixture plate of `seed`; evaluate on its test wells and the clean plate."""
    from gradcamo_jax import EfficientNet

    root = work / f"seed{seed}"
    done = root / f"lambda{weight:g}.json"
    if done.exists():
        return json.loads(done.read_text())
    mix = study.make_dataset(root / "mixture", MIXTURE, seed, config.plate)
    clean = study.make_dataset(root / "clean", CLEAN, 1000 + seed, config.plate)
    cfg = study.train_config(config.plate, config.steps, seed, gradcamo_weight=weight, gradcamo_layer=config.layer,
                             gradcamo_method=config.method)
    trained, variables, info = study.train_model(mix, root / f"run_lambda{weight:g}", cfg)
    model = EfficientNet(trained.model)
    out = {"lambda": weight, "seed": seed, "steps_per_second": info["steps_per_second"],
           "train_s": info["seconds"]}
    for name, data in (("mixture_test", mix), ("clean_test", clean)):
        images, masks, cells = study.load_split(data, "test")
        s = study.score_cells(model, variables, images, masks, layer=config.layer,
                              methods=tuple(dict.fromkeys((config.method, "gradcam"))))
        correct = s[config.method]["predicted"].to_numpy() == cells["Metadata_Class"].to_numpy()
        out[name] = {"cells": int(len(cells)), "accuracy": float(correct.mean()),
                     "mean_gradcamo": float(s[config.method]["gradcamo"].mean()),
                     "mean_gradcamo_gradcam": float(s["gradcam"]["gradcamo"].mean()),
                     "attention_background": float(s[config.method]["background"].mean()),
                     "chance": float(s[config.method]["chance"].mean())}
    (root).mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(out, indent=1))
    log(f"λ={weight:g} seed {seed}: mixture acc {out['mixture_test']['accuracy']:.2f} "
        f"Grad-CAMO {out['mixture_test']['mean_gradcamo']:.3f}; clean acc {out['clean_test']['accuracy']:.2f}; "
        f"{out['steps_per_second']:.2f} steps/s")
    return out


def summarize(runs: list[dict]) -> dict:
    rows = []
    for r in runs:
        rows.append({"lambda": r["lambda"], "seed": r["seed"], "steps_per_second": r["steps_per_second"],
                     **{f"{split}_{k}": v for split in ("mixture_test", "clean_test") for k, v in r[split].items()}})
    df = pd.DataFrame(rows)
    base = df[df["lambda"] == 0]["steps_per_second"].mean()
    table = {}
    for lam, g in df.groupby("lambda"):
        table[f"{lam:g}"] = {k: study.mean_sd(g[k]) for k in df.columns if k not in ("lambda", "seed")}
        table[f"{lam:g}"]["step_time_vs_lambda0"] = float(base / g["steps_per_second"].mean())
    return {"by_lambda": table, "runs": rows}


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = list(summary["by_lambda"])
    x = np.arange(len(lams))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "accuracy", "accuracy (test wells)"),
                           (axes[1], "mean_gradcamo", "mean Grad-CAMO (test wells)")):
        for k, (split, colour) in enumerate((("mixture_test", "#cc6677"), ("clean_test", "#4477aa"))):
            m = [summary["by_lambda"][lam][f"{split}_{key}"]["mean"] for lam in lams]
            sd = [summary["by_lambda"][lam][f"{split}_{key}"]["sd"] for lam in lams]
            ax.errorbar(x + 0.05 * (k - 0.5), m, yerr=sd, marker="o", capsize=4, color=colour,
                        label={"mixture_test": "mixture plate (shortcut present)",
                               "clean_test": "clean cell plate (no shortcut)"}[split])
        if key == "mean_gradcamo":
            ch = [summary["by_lambda"][lam]["clean_test_chance"]["mean"] for lam in lams]
            ax.plot(x, ch, "k--", lw=1, label="chance")
        ax.set_xticks(x, [f"λ={lam}" for lam in lams])
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--work", default=None, help="cache folder (default OUT/work/regularizer)")
    p.add_argument("--quick", action="store_true", help="λ ∈ {0, 1, 4}, 2 seeds, 200 steps (CPU)")
    p.add_argument("--weights", type=float, nargs="+")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--steps", type=int)
    args = p.parse_args(argv)
    config = QUICK if args.quick else Config()
    for field in ("weights", "seeds"):
        if getattr(args, field):
            config = dataclasses.replace(config, **{field: tuple(getattr(args, field))})
    if args.steps:
        config = dataclasses.replace(config, steps=args.steps)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work" / "regularizer"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[regularizer {time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    runs = [run_one(work, w, s, config, log) for s in config.seeds for w in config.weights]
    summary = summarize(runs)
    import jax

    summary["setup"] = {"config": dataclasses.asdict(config), "mixture": MIXTURE, "clean": CLEAN,
                        "backend": jax.default_backend(), "wall_s": round(time.perf_counter() - t0, 1),
                        "command": "python experiments/regularizer.py " + " ".join(argv or sys.argv[1:])}
    (out / "regularizer.json").write_text(json.dumps(summary, indent=1, default=float))
    plot(summary, out / "regularizer.png")
    print(f"\nλ sweep on the mixture plate ({config.method} @ {config.layer}), mean ± sd over {len(config.seeds)} seeds")
    print(f"{'λ':>6s} {'mix acc':>14s} {'mix GCO':>14s} {'clean acc':>14s} {'clean GCO':>14s} {'step ×':>7s}")
    for lam, r in summary["by_lambda"].items():
        cells = [r[k] for k in ("mixture_test_accuracy", "mixture_test_mean_gradcamo", "clean_test_accuracy",
                                "clean_test_mean_gradcamo")]
        print(f"{lam:>6s} " + " ".join(f"{c['mean']:6.3f} ± {c['sd']:5.3f}" for c in cells)
              + f" {r['step_time_vs_lambda0']:7.2f}")
    print(f"wrote {out / 'regularizer.json'} and {out / 'regularizer.png'} in {time.perf_counter() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
