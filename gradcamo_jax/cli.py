"""The `gradcamo` command: parse arguments, then call one library function.

Kept short on purpose (like flax's examples/imagenet/main.py): every command is a
thin wrapper over a function that the tests call directly. Each command owns one
``_add_<name>`` (arguments) and one ``_run_<name>`` (the call) below.

    gradcamo synth  --out DIR [--preset demo|small|large] [--mode cell|background|neighbor|site] ...
    gradcamo import --layout loaddata|phenix|imagexpress|ome-tiff|ome-zarr SRC --out plate_map.csv [--platemap P]
    gradcamo train  --data DIR --workdir DIR [--config NAME] [--set key=value ...]
    gradcamo score  --checkpoint DIR --data DIR --out DIR [--shard I/N | --coordinator H:P ...]
    gradcamo score  --out DIR --merge                  (after every shard: check and mark complete)
    gradcamo report --profiles DIR --out DIR
    gradcamo evaluate --profiles DIR --out DIR [--control-query Q] [--group-by COLS] [--annotation COL]
    gradcamo demo   --out DIR [--tiny]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

# ----------------------------------------------------------------------------- synth


def _add_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder for the plate (plate map, TIFFs, ground truth)")
    p.add_argument("--preset", default="demo", help="demo (CPU demo), tiny (tests), small (paper geometry), large")
    p.add_argument("--mode", "--signal", dest="signal", default=None,
                   help="where the dose shows: cell | background | neighbor | site, or a mixture "
                        "such as 'cell=0.2,background=1' (default: the preset's, i.e. cell)")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed → byte-identical files)")
    p.add_argument("--wells-per-dose", type=int, default=None)
    p.add_argument("--sites-per-well", type=int, default=None)
    p.add_argument("--cells-per-site", type=int, default=None)
    p.add_argument("--field", default=None, help="field shape Z,Y,X, e.g. 21,256,256")


def _run_synth(args: argparse.Namespace) -> int:
    from gradcamo_jax.data import synthetic

    field = tuple(int(v) for v in args.field.split(",")) if args.field else None
    config = synthetic.make_config(
        args.preset, signal=args.signal, seed=args.seed, wells_per_dose=args.wells_per_dose,
        sites_per_well=args.sites_per_well, cells_per_site=args.cells_per_site, field_shape=field,
    )
    print(synthetic.write_plate(config, args.out))
    return 0


# ----------------------------------------------------------------------------- import


def _add_import(p: argparse.ArgumentParser) -> None:
    from gradcamo_jax.data.readers import add_import_arguments

    add_import_arguments(p)


def _run_import(args: argparse.Namespace) -> int:
    from gradcamo_jax.data.readers import run_import

    return run_import(args)


# ----------------------------------------------------------------------------- train


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="cell dataset folder (cells.parquet + crops.zarr); required unless --print-config")
    p.add_argument("--workdir", help="checkpoints and logs; an existing run resumes; required unless --print-config")
    p.add_argument(
        "--config",
        default="smoke",
        help="a preset shipped with the package (paper, smoke) or a .py file with get_config()",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, typed by its declaration (e.g. --set model.variant=b1 "
        "--set data.batch_size=64 --set data.crop_shape=5,24,24); repeatable",
    )
    _add_multihost(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _require(args: argparse.Namespace, command: str, names: Sequence[str], unless: str) -> None:
    """Exit naming the options of `names` left unset (they are required unless `unless` is given)."""
    missing = [f"--{n}" for n in names if not getattr(args, n)]
    if missing:
        raise SystemExit(f"gradcamo {command}: {' and '.join(missing)} required (or {unless})")


def _add_multihost(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", help="multi-host: coordinator host:port (else $GRADCAMO_COORDINATOR)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")


def _run_train(args: argparse.Namespace) -> int:
    import json

    from gradcamo_jax.config import config_to_dict, load_preset

    config = load_preset(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(config_to_dict(config), indent=2))
        return 0
    _require(args, "train", ("data", "workdir"), "--print-config")
    if config.data.worker_count > 0:
        import absl.flags

        absl.flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags (DESIGN §7)
    from gradcamo_jax import sharding, train

    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    out = train.train_and_evaluate(config, args.workdir, args.data)
    val = out["val"]
    summary = {"step": out["step"], "steps_per_second": out["steps_per_second"], "val": val,
               "spatial_dims": out["config"].model.spatial_dims}  # 2 when the plate had one plane per site
    print(json.dumps(summary))
    return 0


# ----------------------------------------------------------------------------- score


def _add_score(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="training workdir (its checkpoints/ folder is read); required unless --merge")
    p.add_argument("--step", default="best", help="'best' (validation accuracy), 'latest' or a step number")
    p.add_argument("--data", help="cell dataset folder (cells.parquet + crops.zarr); required unless --merge")
    p.add_argument("--out", required=True, help="profile folder; an interrupted run there resumes")
    p.add_argument("--shard", default="0/1", help="INDEX/COUNT: score only this job-array shard's parts "
                   "(e.g. $SLURM_ARRAY_TASK_ID/16), then run once with --merge")
    p.add_argument("--merge", action="store_true", help="only check that every part of --out is present and holds "
                   "its cells exactly once (after all shards), and write complete.json")
    p.add_argument("--layer", default="auto", help="layer Grad-CAM explains (stem, stage1…stage7, top); 'auto': the "
                   "deepest whose map keeps >= 8 voxels in Y and X on these crops")
    p.add_argument("--audit", action="store_true", help="also write the audit per cell: the interchange index (does "
                   "the prediction follow the cell or its context?), counterfactual reliance on background, neighbours "
                   "and the cell, and Grad-CAMO corrected by a random-weights model")
    p.add_argument("--audit-swap-donors", type=int, default=2, help="with --audit: donors per class of the interchange "
                   "columns (each costs 3 forwards per cell and class; 0 = no interchange columns)")
    p.add_argument("--allow-coarse-layer", action="store_true", help="score even when the layer's map has < 4 voxels in "
                   "Y or X (the scores then mostly restate each cell's volume fraction)")
    p.add_argument("--method", default="gradcam", help="gradcam, gradcam++, hirescam, layercam, xgradcam")
    p.add_argument("--feature-layers", default="", help="comma-separated layers pooled into features (default: --layer)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rows-per-shard", type=int, default=4096, help="cells per Parquet part")
    p.add_argument("--cam-sample", type=int, default=64, help="cells whose CAM volumes are saved for audits")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16 (GPU/TPU)")
    p.add_argument("--no-progress", action="store_true")
    _add_multihost(p)


def _run_score(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from gradcamo_jax.data.shards import parse_shard
    from gradcamo_jax.scoring import ScoreConfig, score_dataset, verify_profiles

    if args.merge:
        print(json.dumps(verify_profiles(args.out)))
        return 0
    _require(args, "score", ("checkpoint", "data"), "--merge")
    shard = parse_shard(args.shard)
    from gradcamo_jax import EfficientNet, sharding
    from gradcamo_jax.train import load_checkpoint

    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    step = args.step if args.step in ("best", "latest") else int(args.step)
    train_cfg, variables = load_checkpoint(args.checkpoint, step)
    model = EfficientNet(dataclasses.replace(train_cfg.model, dtype=args.dtype))
    layers = tuple(x for x in args.feature_layers.split(",") if x)
    config = ScoreConfig(layer=args.layer, method=args.method, feature_layers=layers, batch_size=args.batch_size,
                         rows_per_shard=args.rows_per_shard, cam_sample=args.cam_sample,
                         allow_coarse_layer=args.allow_coarse_layer, audit=args.audit,
                         audit_swap_donors=args.audit_swap_donors)
    # The run's DataConfig: its crop, binning and any inference-time context remedy (mask, attenuate).
    stats = score_dataset(model, variables, args.data, args.out, config, data_config=train_cfg.data, shard=shard,
                          progress=not args.no_progress)
    import jax

    if shard == (0, 1) and jax.process_count() == 1:  # the only writer: check and mark complete now
        stats["complete"] = verify_profiles(args.out)
    print(json.dumps(stats))
    return 0


# ----------------------------------------------------------------------------- report


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profiles", required=True, help="output folder of `gradcamo score`")
    p.add_argument("--out", required=True, help="report folder (index.html + PNGs)")
    p.add_argument("--data", default=None, help="cell dataset folder, for CAM overlays on the crops")
    p.add_argument("--control-query", default="Metadata_Dose == 0", help="pandas query selecting control cells")
    p.add_argument("--sphering", default="ZCA", help="ZCA, PCA, ZCA-cor, PCA-cor or none")
    p.add_argument("--title", default="Grad-CAMO audit")
    p.add_argument("--overlay-channel", default=None,
                   help="channel shown in grey beside and under the CAM overlays (e.g. DNA); default: mean of channels")


def _run_report(args: argparse.Namespace) -> int:
    from gradcamo_jax.evaluate import EvaluateConfig
    from gradcamo_jax.report import ReportConfig, make_report
    from gradcamo_jax.sphering import SpherizeConfig

    sph = None if args.sphering.lower() == "none" else SpherizeConfig(args.sphering, control_query=args.control_query)
    evaluate = EvaluateConfig(control_query=args.control_query, sphering=sph.method if sph is not None else None)
    config = ReportConfig(sphering=sph, overlay_channel=args.overlay_channel, evaluate=evaluate)
    print(make_report(args.profiles, args.out, data_dir=args.data, config=config, title=args.title))
    return 0


# ----------------------------------------------------------------------------- evaluate


def _columns(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profiles", required=True, help="output folder of `gradcamo score`")
    p.add_argument("--out", required=True, help="folder for map_activity.{parquet,csv}, summary.json, map_activity.png")
    p.add_argument("--control-query", default="Metadata_Dose == 0", help="pandas query selecting control cells")
    p.add_argument("--group-by", default="Metadata_Treatment,Metadata_Dose",
                   help="comma-separated columns naming a replicate group (absent ones are left out)")
    p.add_argument("--well-by", default="Metadata_Plate,Metadata_Well", help="comma-separated columns naming a well")
    p.add_argument("--sphering", default="ZCA", help="ZCA, PCA, ZCA-cor, PCA-cor or none")
    p.add_argument("--sphering-by", default="Metadata_Plate", help="one sphering per value of these columns; '' = one")
    p.add_argument("--sphere-on", default="cells", choices=("cells", "wells"),
                   help="sphere the cells on control cells before the well median (default), or the well medians on "
                   "control wells (needs more control wells than features)")
    p.add_argument("--annotation", default=None, help="Metadata_ column for phenotypic consistency (e.g. a MoA)")
    p.add_argument("--distance", default="cosine", help="copairs similarity: cosine, correlation, euclidean, ...")
    p.add_argument("--null-size", type=int, default=100_000, help="random rankings in copairs' null distribution")
    p.add_argument("--threshold", type=float, default=0.05, help="corrected p-value below which a dose is retrieved")
    p.add_argument("--seed", type=int, default=0, help="seed of copairs' null distributions")


def _run_evaluate(args: argparse.Namespace) -> int:
    import json

    from gradcamo_jax.evaluate import EvaluateConfig, evaluate_profiles, write_evaluation
    from gradcamo_jax.scoring import read_profiles

    config = EvaluateConfig(
        control_query=args.control_query, well_by=_columns(args.well_by), group_by=_columns(args.group_by),
        sphering=None if args.sphering.lower() == "none" else args.sphering, sphering_by=_columns(args.sphering_by),
        sphere_on=args.sphere_on, distance=args.distance, null_size=args.null_size, threshold=args.threshold,
        seed=args.seed, annotation=args.annotation,
    )
    try:
        result = evaluate_profiles(read_profiles(args.profiles), config)
    except ValueError as e:
        raise SystemExit(f"gradcamo evaluate: {e}") from e
    write_evaluation(result, args.out)
    print(json.dumps(result.summary))
    return 0


# ----------------------------------------------------------------------------- demo


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="demo folder (an interrupted demo there resumes)")
    p.add_argument("--tiny", action="store_true", help="the smallest end-to-end run (tests)")


def _run_demo(args: argparse.Namespace) -> int:
    from gradcamo_jax.demo import DemoConfig, run_demo, tiny_config

    index = run_demo(args.out, tiny_config() if args.tiny else DemoConfig())
    print(f"report: {index}")
    return 0


# ----------------------------------------------------------------------------- main

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "synth": ("write a synthetic 3D Cell Painting plate with planted confounders", _add_synth, _run_synth),
    "import": ("read a plate in place (LoadData, Phenix, ImageXpress, OME-TIFF, OME-Zarr) into a plate map",
               _add_import, _run_import),
    "train": ("train an EfficientNet on a cell dataset (resumes from --workdir)", _add_train, _run_train),
    "score": ("bulk Grad-CAMO scoring of a cell dataset to Parquet profiles", _add_score, _run_score),
    "report": ("HTML report with UMAP, CAM overlays and score distributions", _add_report, _run_report),
    "evaluate": ("copairs mAP of the well profiles per dose against controls (phenotypic activity)", _add_evaluate,
                 _run_evaluate),
    "demo": ("synth → crop → train → score → report on a synthetic plate", _add_demo, _run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradcamo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(COMMANDS[args.command][2](args) or 0)


def entry() -> None:
    """The `gradcamo` console script: `main` in a process started with huge-page malloc
    (`gradcamo_jax.runtime`; ``GRADCAMO_HUGEPAGES=0`` opts out)."""
    from gradcamo_jax.runtime import reexec_with_hugepages

    reexec_with_hugepages()
    sys.exit(main())


if __name__ == "__main__":
    entry()
