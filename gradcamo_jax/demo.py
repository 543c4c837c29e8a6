"""`gradcamo demo`: synth → crop → train → score → report on built-in synthetic plates.

The story it tells: two plates that differ only in *where* the dose shows. On the
``cell`` plate, dose changes the cells' own morphology and texture; on the ``site``
plate, it changes only the imaging of each field (illumination tilt, bleed-through,
defocus growing with dose: a batch effect confounded with treatment, as when doses are
imaged on different days or microscopes). The same model is trained on each; both can
predict the dose on held-out wells, but only the first has to look at the cells, and
Grad-CAMO (LayerCAM at the stem, the most discriminative setting of
experiments/confounders.py) is meant to tell them apart without ground truth. How well
it does, and where it does not, is measured in experiments/README.md.

Output (``out_dir``)::

    cell/plate/…, cell/data/…, cell/run/…, cell/profiles/…, cell/report/index.html
    site/…                                                (the same for the other plate)
    index.html                                            side-by-side headline numbers + links
    demo.json                                             the numbers and stage timings

Every stage reads only the previous stage's files and resumes from them, so an
interrupted demo rerun with the same arguments continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import time
from pathlib import Path

from gradcamo_jax.config import TrainConfig
from gradcamo_jax.configs import smoke


def _demo_train() -> TrainConfig:
    """The smoke recipe on the demo's whole 5×32×32 crops, 3 classes."""
    base = smoke.get_config()
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, num_classes=3),
        data=dataclasses.replace(base.data, crop_shape=None, downsample=(1, 1, 1)),
    )


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo.

    Attributes:
      preset: synthetic plate preset (`gradcamo_jax.data.synthetic.PRESETS`).
      plates: ``(signal mode, strength)`` of each plate (`synthetic.parse_signal`): the clean
        plate (dose in the cells' morphology) and the confounded one (dose in a per-site
        imaging artefact: illumination tilt, DNA → ER bleed-through and defocus that grow
        with dose). The site confounder is the one Grad-CAMO exposed most clearly in
        experiments/confounders.py (LayerCAM at the stem); a background-texture plate was
        not told apart reliably (AUROCs: experiments/README.md, 'Measurements behind default
        settings', demo.py).
      doses: treated doses (control added); None keeps the preset's. Two doses (three
        classes) let the tiny model learn the cell plate in 300 steps; with the preset's six
        classes its held-out accuracy was much lower (both accuracies: same section).
      cell_gain, background_level: `synthetic.SynthConfig` fields of every plate. With the
        synthetic defaults (gain 1, level 0.6) per-site percentile normalisation moves a
        signal from where it was planted: brighter treated cells make the normalised
        background darker, and bright background speckles dim the normalised cells
        (measured for experiments/study.py on a background plate; same section). At gain 0
        the cell signal is morphology and texture (ER spread, Mito puncta, nucleus size),
        which normalisation leaves in the cell.
      wells_per_dose: wells per dose (3 gives one train, one validation and one test well).
      crop_size: stored crop (Z, Y, X); 5×32×32 is tight around the cell (the cell's measured
        share of the crop, Grad-CAMO's chance level: same section).
      train: the training run (model, input transform, steps).
      layer: the layer the CAM explains: "stem" (5×16×16 on the 5×32×32 input) was the most
        discriminative layer in experiments/confounders.py; "stage4" and later are 2×2×2,
        whose upsampled maps are nearly uniform (Grad-CAMO at the chance level whatever the
        model does).
      method: the CAM method; LayerCAM told cell-signal from shortcut models best in
        experiments/confounders.py (Grad-CAM at stage2 barely did).
      cam_sample: cells whose CAM volumes are kept for the report's overlays.
      seed: seed of plates and training.
    """

    preset: str = "demo"
    plates: tuple[tuple[str, float], ...] = (("cell", 2.0), ("site", 1.0))
    doses: tuple[float, ...] | None = (8.0, 40.0)
    cell_gain: float = 0.0
    background_level: float = 0.25
    wells_per_dose: int = 8
    crop_size: tuple[int, int, int] = (5, 32, 32)
    train: TrainConfig = _demo_train()
    layer: str = "stem"
    method: str = "layercam"
    cam_sample: int = 64
    seed: int = 0


def tiny_config() -> DemoConfig:
    """The smallest end-to-end run (tests): a 3-class tiny plate, a few training steps."""
    base = DemoConfig()
    return dataclasses.replace(
        base,
        preset="tiny",
        wells_per_dose=3,
        crop_size=(5, 32, 32),
        train=dataclasses.replace(
            base.train,
            model=dataclasses.replace(base.train.model, num_classes=3),
            data=dataclasses.replace(base.train.data, batch_size=8, eval_batch_size=16, crop_shape=None,
                                     downsample=(1, 2, 2)),
            num_steps=12, warmup_steps=2, log_every=4, checkpoint_every=6,
        ),
        cam_sample=8,
    )


def run_plate(signal: str, strength: float, out_dir: Path, config: DemoConfig, progress: bool = True) -> dict:
    """One plate through every stage; returns its headline numbers and stage timings."""
    from gradcamo_jax import EfficientNet
    from gradcamo_jax.data import crop, synthetic
    from gradcamo_jax.report import headline, make_report
    from gradcamo_jax.scoring import ScoreConfig, score_dataset
    from gradcamo_jax.train import load_checkpoint, train_and_evaluate

    times = {}
    t = time.perf_counter()
    plate_map = out_dir / "plate" / "platemap.csv"
    if not plate_map.exists():
        synth = synthetic.make_config(config.preset, signal={signal: strength}, seed=config.seed,
                                      wells_per_dose=config.wells_per_dose, cell_gain=config.cell_gain,
                                      background_level=config.background_level, doses=config.doses)
        plate_map = synthetic.write_plate(synth, out_dir / "plate")
    times["synth_s"] = time.perf_counter() - t

    t = time.perf_counter()
    data = out_dir / "data"
    if not (data / "cells.parquet").exists():
        crop.crop_plate(plate_map, data, crop.CropConfig(crop_size=config.crop_size, min_volume=20, workers=0))
    times["crop_s"] = time.perf_counter() - t

    t = time.perf_counter()
    train_cfg = dataclasses.replace(config.train, seed=config.seed, progress_bar=progress)
    trained = train_and_evaluate(train_cfg, out_dir / "run", data)
    times["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    trained_cfg, variables = load_checkpoint(out_dir / "run", "best")
    model = EfficientNet(dataclasses.replace(trained_cfg.model, dtype="float32"))
    score_cfg = ScoreConfig(layer=config.layer, method=config.method, feature_layers=(config.layer, "top"), batch_size=32,
                            rows_per_shard=1024, cam_sample=config.cam_sample, audit=True)
    stats = score_dataset(model, variables, data, out_dir / "profiles", score_cfg, data_config=trained_cfg.data,
                          progress=progress)
    times["score_s"] = time.perf_counter() - t

    t = time.perf_counter()
    val = trained.get("val") or {}
    extra = {"signal": signal, "training_steps": trained["step"],
             "val_accuracy_at_end": val.get("accuracy"), "train_seconds": round(times["train_s"], 1)}
    report = make_report(out_dir / "profiles", out_dir / "report", data_dir=data,
                         title=f"Grad-CAMO audit — synthetic plate, dose signal in the {signal}", extra=extra)
    times["report_s"] = time.perf_counter() - t

    from gradcamo_jax.scoring import read_profiles

    head = headline(read_profiles(out_dir / "profiles"))
    return {"signal": signal, "report": str(report.relative_to(out_dir.parent)), **head, **extra,
            "score_cells_per_s": stats["cells_per_s"], **{k: round(v, 1) for k, v in times.items()}}


def _index_html(results: list[dict]) -> str:
    rows = ["cells", "accuracy_held_out_wells", "mean_gradcamo", "frac_above_threshold", "mean_chance",
            "mean_gradcamo_random_model", "mean_gradcamo_corrected", "mean_context_reliance",
            "attention_cell", "attention_neighbors", "attention_background", "train_s", "score_cells_per_s"]
    head = "".join(f"<th>dose signal in the {html.escape(r['signal'])}</th>" for r in results)

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    body = "".join(
        f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{fmt(r.get(k))}</td>" for r in results) + "</tr>"
        for k in rows
    )
    links = " · ".join(f"<a href='{html.escape(r['signal'])}/report/index.html'>{html.escape(r['signal'])} plate report</a>"
                       for r in results)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>gradcamo demo</title><style>"
        "body{font-family:sans-serif;max-width:900px;margin:2em auto}td,th{padding:4px 10px;"
        "border-bottom:1px solid #ddd;text-align:right}</style></head><body><h1>gradcamo demo</h1>"
        "<p>Two synthetic plates, identical except where the dose shows: in the cells' own morphology, or only "
        "in a per-site imaging artefact that grows with dose (a planted confounder). The same model is trained on "
        "each. Both can predict the dose; Grad-CAMO is meant to show which one looks at the cells. Read it against "
        "the chance level (the cell's volume fraction) and against the measured power of the score in "
        "experiments/README.md: on these small CPU models it separates models on average, not every cell.</p>"
        f"<table><tr><th></th>{head}</tr>{body}</table><p>{links}</p></body></html>"
    )


def run_demo(out_dir: str | os.PathLike, config: DemoConfig = DemoConfig(), progress: bool = True) -> Path:
    """Run the demo on both plates; returns the path of ``out_dir/index.html``."""
    from gradcamo_jax.data import formats

    out = Path(out_dir)
    t0 = time.perf_counter()
    results = []
    for signal, strength in config.plates:
        if progress:
            print(f"[demo] plate with the dose signal in the {signal}", flush=True)
        results.append(run_plate(signal, strength, out / signal, config, progress))
    summary = {"plates": results, "wall_s": round(time.perf_counter() - t0, 1)}
    formats.write_json(summary, out / "demo.json")
    index = out / "index.html"
    with formats.atomic_path(index) as tmp:
        tmp.write_text(_index_html(results))
    if progress:
        print(json.dumps({r["signal"]: {k: r.get(k) for k in ("accuracy_held_out_wells", "mean_gradcamo",
                                                             "mean_chance")} for r in results}, indent=1))
    return index


__all__ = ["DemoConfig", "run_demo", "run_plate", "tiny_config"]
