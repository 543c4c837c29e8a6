"""Subprocess worker for the training tests (device counts and distributed start-up must be
fixed before JAX starts, and kills must hit a real process).

    python tests/_train_worker.py train  --workdir W --out P.npz [--slow-after S] [--crash-in-save STEP]
    python tests/_train_worker.py plate  --workdir W [--steps N] [--signal cell=2] [--sites 4]

The parent sets XLA_FLAGS (fake CPU devices) and the compilation cache in the environment.
`train` builds a small learnable in-memory dataset (`make_dataset` at TRAIN_SHAPE; the
sharding worker, tests/_sharding_worker.py, uses it at SHAPE) and saves the final parameters
as ``leaf_<i>`` arrays in tree-flatten order; `plate` trains on a synthetic plate written to disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time

import numpy as np
import pandas as pd

CLASSES = 3
SHAPE = (5, 16, 16, 2)  # (Z, Y, X, C)
# The kill/resume runs (`train`): four processes whose cost is start-up, tracing and
# checkpoints, not the steps; at this size a step is ~4x cheaper than at SHAPE.
TRAIN_SHAPE = (3, 8, 8, 2)


def make_dataset(data_config, wells_per_class: int = 4, cells_per_well: int = 6, seed: int = 0, shape=SHAPE):
    """A 3-class dataset whose class is visible in the central cell: a bright blob in
    channel 0 with intensity rising with the class, on noise. Wells are the split unit.
    `shape` (Z, Y, X, C): the blob's semi-axes are (1.5, 4, 4) at SHAPE, scaled with it."""
    from gradcamo_jax.data import pipeline

    rng = np.random.default_rng(seed)
    n = CLASSES * wells_per_class * cells_per_well
    well = np.repeat(np.arange(CLASSES * wells_per_class), cells_per_well)
    label = well % CLASSES
    z, y, x, c = shape
    radii = np.array([1.5, 4.0, 4.0]) * np.array([z, y, x]) / np.array(SHAPE[:3])
    grid = np.stack(np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij"), -1)
    centre = np.array([z, y, x]) / 2 - 0.5 + rng.uniform(-1.5, 1.5, (n, 3)) * np.array([0.3, 1, 1])
    dist = np.sqrt((((grid[None] - centre[:, None, None, None]) / radii) ** 2).sum(-1))
    masks = np.where(dist <= 1.0, 1, 0).astype(np.uint8)
    images = rng.normal(0, 0.3, (n, z, y, x, c)).astype(np.float32)
    images[..., 0] += masks * (0.5 + 0.75 * label)[:, None, None, None]
    cells = pd.DataFrame({"Metadata_Plate": "P1", "Metadata_Well": [f"W{w:02d}" for w in well], "Metadata_Class": label})
    return pipeline.dataset_from_arrays(images, masks, cells, data_config)


def train_config(**overrides):
    from gradcamo_jax.config import DataConfig, ModelConfig, TrainConfig

    model = ModelConfig("tiny", num_classes=CLASSES, stem_stride=(1, 2, 2), conv_impl="xla", drop_path_rate=0.0)
    data = DataConfig(batch_size=8, eval_batch_size=16, split_fractions=(0.75, 0.25, 0.0), read_threads=1, prefetch=2)
    base = TrainConfig(
        model=model,
        data=data,
        num_steps=4,
        learning_rate=3e-3,
        warmup_steps=1,
        # The project-BN biases have exact gradient 0 (a conv + BatchNorm follows); with the
        # default eps Adam turns their rounding noise into ±lr steps that differ between
        # 1 and 8 devices. A larger eps leaves real gradients (>> 1e-3) in charge.
        adam_eps=1e-3,
        log_every=1,
        checkpoint_every=2,
        keep_checkpoints=2,
        progress_bar=False,
        async_checkpointing=True,
    )
    return dataclasses.replace(base, **overrides)


def save_params(path: str, params) -> None:
    import jax

    leaves = jax.tree.leaves(params)
    np.savez(path, **{f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})


def _crash_in_save(step: int) -> None:
    """SIGKILL this process while orbax commits checkpoint `step`: its files are written to
    the temporary folder, the rename that publishes them has not happened."""
    from orbax.checkpoint._src.path import atomicity

    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        original = cls.finalize

        async def finalize(self, *a, _original=original, **k):
            if self.get_final().name == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
            return await _original(self, *a, **k)

        cls.finalize = finalize


def cmd_train(args) -> None:
    from gradcamo_jax import train

    # The engineered CPU convolutions (the library's default, "auto"): a step costs a
    # fraction of XLA's native depthwise convolution's (DESIGN.md §5).
    config = train_config(num_steps=args.steps, checkpoint_every=args.checkpoint_every,
                          model=dataclasses.replace(train_config().model, conv_impl="auto"))
    if args.crash_in_save is not None:
        _crash_in_save(args.crash_in_save)

    def hook(step: int) -> None:
        with open(os.path.join(args.workdir, "progress"), "w") as f:
            f.write(str(step))
        if args.slow_after is not None and step >= args.slow_after:
            time.sleep(args.sleep)  # leaves the parent time to kill us mid-run

    os.makedirs(args.workdir, exist_ok=True)
    out = train.train_and_evaluate(config, args.workdir, make_dataset(config.data, shape=TRAIN_SHAPE), hooks=[hook])
    save_params(args.out, out["state"].params)


def cmd_plate(args) -> None:
    """Synthetic `cell`-mode plate → crops → training; prints held-out accuracy and timings as JSON."""
    import json

    from gradcamo_jax import train
    from gradcamo_jax.config import DataConfig
    from gradcamo_jax.data import crop, synthetic

    t0, c0 = time.perf_counter(), time.process_time()
    plate = synthetic.make_config("tiny", signal=args.signal, wells_per_dose=3, sites_per_well=args.sites, seed=args.seed)
    plate_map = synthetic.write_plate(plate, os.path.join(args.workdir, "plate"))
    data_dir = crop.crop_plate(
        plate_map,
        os.path.join(args.workdir, "data"),
        crop.CropConfig(crop_size=(5, 24, 24), workers=0, split_fractions=(0.67, 0.33, 0.0)),
    )
    t1, c1 = time.perf_counter(), time.process_time()
    config = train_config(
        # 60 steps at the default momentum 0.99 leave the BatchNorm running statistics
        # ~55% at their initial values, and evaluation (inference mode) uses them.
        # conv_impl "auto" (the library's CPU default): 0.5 s of CPU a step against 1.8 s
        # with XLA's depthwise convolution, and the same held-out predictions.
        model=dataclasses.replace(train_config().model, bn_momentum=0.9, conv_impl="auto"),
        data=DataConfig(batch_size=16, eval_batch_size=48, read_threads=1, prefetch=2),
        num_steps=args.steps,
        checkpoint_every=args.steps,
        log_every=10,
        learning_rate=5e-3,
        warmup_steps=5,
        weight_decay=1e-4,
    )
    out = train.train_and_evaluate(config, os.path.join(args.workdir, "run"), str(data_dir))
    t2, c2 = time.perf_counter(), time.process_time()
    print(json.dumps({
        "val": out["val"], "data_seconds": t1 - t0, "train_seconds": t2 - t1,
        "data_cpu_seconds": c1 - c0, "train_cpu_seconds": c2 - c1,
        "steps_per_second": out["steps_per_second"], "cells_per_second": out["cells_per_second"],
    }), flush=True)


def main() -> None:
    import absl.flags

    absl.flags.FLAGS.mark_as_parsed()
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--workdir", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=8)
    t.add_argument("--checkpoint-every", type=int, default=2)
    t.add_argument("--slow-after", type=int)
    t.add_argument("--sleep", type=float, default=1.0)
    t.add_argument("--crash-in-save", type=int)
    q = sub.add_parser("plate")
    q.add_argument("--workdir", required=True)
    q.add_argument("--steps", type=int, default=60)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--signal", default="cell")
    q.add_argument("--sites", type=int, default=2)
    args = p.parse_args()
    {"train": cmd_train, "plate": cmd_plate}[args.cmd](args)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
