"""The `gradcamo` command: parse arguments, then call one library function.

Kept short on purpose (like flax's examples/imagenet/main.py): every command is a
thin wrapper over a function that the tests call directly. Each command owns one
``_add_<name>`` (arguments) and one ``_run_<name>`` (the call) below.

    gradcamo synth  --out DIR [--preset demo|small|large] [--mode cell|background|neighbor|site] ...
    gradcamo train  --data DIR --workdir DIR [--config NAME] [--set key=value ...]
    gradcamo score  --checkpoint DIR --data DIR --out DIR
    gradcamo report --profiles DIR --out DIR
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


# ----------------------------------------------------------------------------- train


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="cell dataset folder (cells.parquet + crops.zarr)")
    p.add_argument("--workdir", required=True, help="checkpoints and logs; an existing run resumes")


def _run_train(args: argparse.Namespace) -> int:
    raise SystemExit("gradcamo train: not available in this build yet")


# ----------------------------------------------------------------------------- score


def _add_score(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)


def _run_score(args: argparse.Namespace) -> int:
    raise SystemExit("gradcamo score: not available in this build yet")


# ----------------------------------------------------------------------------- report


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profiles", required=True)
    p.add_argument("--out", required=True)


def _run_report(args: argparse.Namespace) -> int:
    raise SystemExit("gradcamo report: not available in this build yet")


# ----------------------------------------------------------------------------- demo


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="the smallest end-to-end run (tests)")


def _run_demo(args: argparse.Namespace) -> int:
    raise SystemExit("gradcamo demo: not available in this build yet")


# ----------------------------------------------------------------------------- main

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "synth": ("write a synthetic 3D Cell Painting plate with planted confounders", _add_synth, _run_synth),
    "train": ("train an EfficientNet on a cell dataset (resumes from --workdir)", _add_train, _run_train),
    "score": ("bulk Grad-CAMO scoring of a cell dataset to Parquet profiles", _add_score, _run_score),
    "report": ("HTML report with UMAP, CAM overlays and score distributions", _add_report, _run_report),
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


if __name__ == "__main__":
    sys.exit(main())
