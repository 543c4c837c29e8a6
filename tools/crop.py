"""Single-cell crops from z-stacks + labels: the cell dataset (cells.parquet + crops.zarr).

A thin command over `gradcamo_jax.data.crop` (read its docstring for the method:
percentile normalisation, centring, padding flags, mask codes, classes, splits).

    # one machine: crop every site with 4 processes, then merge
    python tools/crop.py PLATEMAP --out DATASET --workers 4

    # a SLURM job array of 8 tasks, then one merge job
    python tools/crop.py PLATEMAP --out DATASET --shard ${SLURM_ARRAY_TASK_ID}/8
    python tools/crop.py PLATEMAP --out DATASET --merge

Re-running skips finished sites (resumable). Labels come from the plate map's
FileName_Labels column, or from --labels-dir (<site id>_labels.tiff, as tools/segment.py writes
them into OUT/labels/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from gradcamo_jax.data import crop, shards


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/crop.py", description=__doc__.splitlines()[0])
    p.add_argument("plate_map", help="plate map (CSV or Parquet)")
    p.add_argument("--out", required=True, help="dataset folder (parts/, then cells.parquet + crops.zarr)")
    p.add_argument("--labels-dir", default=None,
                   help="folder of <site id>_labels.tiff label volumes, e.g. tools/segment.py's OUT/labels "
                   "(default: FileName_Labels)")
    p.add_argument("--crop", type=_ints, default=(21, 128, 128), help="crop size Z,Y,X (default 21,128,128)")
    p.add_argument("--percentiles", type=_floats, default=(1.0, 99.8), help="normalisation percentiles LOW,HIGH")
    p.add_argument("--intensity-range", type=_floats, default=None,
                   help="fixed raw LOW,HIGH mapped to 0 and 1 for every site and channel, instead of each site's "
                   "percentiles (use when a treatment changes a field's brightest voxels)")
    p.add_argument("--clip", action="store_true", help="clip normalised intensities to [0, 1]")
    p.add_argument("--min-volume", type=int, default=50, help="drop (and count) labels with fewer voxels")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--axes", default="ZCYX", help="axis order of the stack files (default ZCYX)")
    p.add_argument("--channels", default=None, help="expected channel names, comma-separated (default: Cell Painting 5)")
    p.add_argument("--center-z", choices=("auto", "cell", "stack"), default="auto",
                   help="z centring: on the cell, on the stack, or auto (stack when the crop is as deep as it)")
    p.add_argument("--workers", type=int, default=1, help="processes over sites (0 = in this process)")
    p.add_argument("--shard", default="0/1", help="INDEX/COUNT: crop only this shard's sites (SLURM arrays)")
    p.add_argument("--merge", action="store_true", help="only merge the finished parts (after all shards)")
    p.add_argument("--no-merge", action="store_true", help="with a single shard: crop without merging")
    p.add_argument("--split", type=_floats, default=(0.7, 0.15, 0.15), help="train,val,test fractions of wells")
    p.add_argument("--split-seed", type=int, default=0)
    return p


def config_from_args(args: argparse.Namespace) -> crop.CropConfig:
    kwargs = {}
    if args.channels:
        kwargs["channels"] = tuple(c.strip() for c in args.channels.split(","))
    return crop.CropConfig(
        crop_size=args.crop, percentiles=args.percentiles, intensity_range=args.intensity_range, clip=args.clip,
        min_volume=args.min_volume,
        dtype=args.dtype, stack_axes=args.axes, labels_dir=args.labels_dir,
        center_z={"auto": None, "cell": True, "stack": False}[args.center_z],
        split_fractions=args.split, split_seed=args.split_seed, workers=args.workers, **kwargs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        shard = shards.parse_shard(args.shard)
        if not args.merge:
            t0 = time.perf_counter()
            reports = crop.crop_shard(args.plate_map, args.out, config, shard)
            n = sum(r["n_cells"] for r in reports)
            secs = time.perf_counter() - t0
            print(json.dumps({"shard": args.shard, "sites": len(reports), "cells": n,
                              "filtered_small": sum(r["n_filtered_small"] for r in reports),
                              "empty_sites": [r["site_id"] for r in reports if r["n_cells"] == 0],
                              "seconds": round(secs, 2)}))
        if args.merge or (shard[1] == 1 and not args.no_merge):
            out = crop.merge(args.plate_map, args.out, config)
            print(f"dataset: {out}")
    except (ValueError, FileNotFoundError) as e:
        print(f"tools/crop.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
