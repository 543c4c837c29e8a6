"""Scaling of bulk scoring: time linear and memory flat in the number of cells; cost per cell vs batch.

Two measurements, each in fresh subprocesses (peak RSS is a high-water mark, so each
size gets its own process):

  scoring   `gradcamo_jax.scoring.score_dataset` over crop stores of N = 1k, 10k (and
            100k with --full) random cells of a small config: wall time, cells/s, peak RSS,
            and the crop store's own read throughput (the input pipeline) next to it.
  batch     `explain` cells/s against batch size (1 … 64) for the same config.

    python -m experiments.scale                 # 1k and 10k cells, batch sweep; ~10 min on 2 cores
    python -m experiments.scale --full          # adds 100k cells
    python -m experiments.scale --crop 21 128 128 --variant b0 --sizes 1000   # paper geometry

Writes scale.json next to the printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_store(path: Path, n: int, crop: tuple[int, int, int], channels: int, seed: int = 0) -> None:
    """A cell dataset of n random float16 crops with ellipsoid masks, written in pieces."""
    import pandas as pd

    from gradcamo_jax.data import formats

    rng = np.random.default_rng(seed)
    z, y, x = crop
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in crop], indexing="ij"))
    mask = np.zeros(crop, np.uint8)
    mask[((grid[1] - 0.5) ** 2 + grid[2] ** 2) < 0.15] = 2
    mask[(grid**2).sum(0) < 0.3] = 1
    with formats.crop_store_writer(path / "crops.zarr", n, crop, channels, "float16") as w:
        for s in range(0, n, 512):
            e = min(n, s + 512)
            w.write(s, rng.normal(size=(e - s, *crop, channels)).astype(np.float16), np.broadcast_to(mask, (e - s, *crop)))
    formats.write_cells(pd.DataFrame({
        "Metadata_Plate": "P", "Metadata_Well": [f"W{i % 96:02d}" for i in range(n)], "Metadata_Site": 1,
        "Metadata_ObjectNumber": np.arange(n) + 1, "Metadata_Dose": 0.0, "Metadata_Row": np.arange(n),
    }), path)


def _model(variant: str, crop, channels):
    import jax

    from gradcamo_jax import EfficientNet, ModelConfig, init

    config = ModelConfig(variant, num_classes=6, stem_stride=(1, 2, 2))
    return EfficientNet(config), init(config, jax.random.key(0), (*crop, channels))


def child_score(args) -> dict:
    """Runs in a subprocess: score one store, report time and peak RSS."""
    from gradcamo_jax.data import formats
    from gradcamo_jax.runtime import peak_rss_mb
    from gradcamo_jax.scoring import ScoreConfig, score_dataset

    crop = tuple(args.crop)
    model, variables = _model(args.variant, crop, args.channels)
    store = formats.open_crops(args.data)
    # The pipeline alone, in the scoring batches (larger reads would inflate the peak RSS
    # reported for scoring: 256 paper-sized crops are 1.8 GB as float32).
    t0 = time.perf_counter()
    for s in range(0, len(store), args.batch):
        store.image[s:s + args.batch].astype(np.float32)
        store.mask[s:s + args.batch]
    read_s = time.perf_counter() - t0
    cfg = ScoreConfig(layer="stage5", batch_size=args.batch, rows_per_shard=4096)
    t0 = time.perf_counter()
    stats = score_dataset(model, variables, args.data, args.out, cfg, progress=False)
    wall = time.perf_counter() - t0
    return {"n": len(store), "wall_s": wall, "cells_per_s": len(store) / wall,
            "pipeline_cells_per_s": len(store) / read_s,
            "peak_rss_mb": peak_rss_mb(), **stats}


def child_batch(args) -> dict:
    import jax

    from gradcamo_jax import make_explain_fn

    crop = tuple(args.crop)
    model, variables = _model(args.variant, crop, args.channels)
    out = {}
    for b in args.batches:
        x = jax.random.normal(jax.random.key(1), (b, *crop, args.channels))
        m = jax.numpy.ones((b, *crop), jax.numpy.uint8)
        t = jax.numpy.full((b,), -1, jax.numpy.int32)
        fn = make_explain_fn(model, "stage5", "gradcam", feature_layers=("stage5",))
        fn(variables, x, m, t).scores.cell.block_until_ready()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn(variables, x, m, t).scores.cell.block_until_ready()
            times.append(time.perf_counter() - t0)
        out[b] = b / sorted(times)[1]
        print(f"  batch {b:4d}: {out[b]:8.1f} cells/s", flush=True)
    return {"cells_per_s_by_batch": out}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="also 100k cells")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--variant", default="tiny")
    p.add_argument("--crop", type=int, nargs=3, default=[5, 32, 32], help="Z Y X")
    p.add_argument("--channels", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--out", default="scale.json")
    p.add_argument("--child", choices=["score", "batch"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        res = child_score(args) if args.child == "score" else child_batch(args)
        print("RESULT " + json.dumps(res))
        return

    sizes = args.sizes or ([1000, 10000, 100000] if args.full else [1000, 10000])
    common = ["--variant", args.variant, "--crop", *map(str, args.crop), "--channels", str(args.channels),
              "--batch", str(args.batch)]
    results = {"config": vars(args), "scoring": [], "batch": None}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            data = Path(tmp) / f"d{n}"
            t0 = time.perf_counter()
            make_store(data, n, tuple(args.crop), args.channels)
            print(f"store of {n} cells written in {time.perf_counter() - t0:.1f} s", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--child", "score", "--data", str(data),
                                   "--out", str(Path(tmp) / f"p{n}"), *common], capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(proc.stderr[-3000:])
            r = json.loads(line[0][7:])
            results["scoring"].append(r)
            print(f"  N={n:7d}: {r['wall_s']:8.1f} s  {r['cells_per_s']:8.1f} cells/s  peak RSS {r['peak_rss_mb']:7.0f} MB"
                  f"  (crop store read: {r['pipeline_cells_per_s']:.0f} cells/s)", flush=True)
            import shutil

            shutil.rmtree(data)
        proc = subprocess.run([sys.executable, __file__, "--child", "batch", "--batches", *map(str, args.batches),
                               "--out", "-", *common], capture_output=True, text=True)
        print(proc.stdout, end="")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if line:
            results["batch"] = json.loads(line[0][7:])
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from gradcamo_jax.runtime import reexec_with_hugepages

    reexec_with_hugepages()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
