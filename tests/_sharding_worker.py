"""Subprocess worker for tests/test_sharding.py (device counts and `jax.distributed` must be
fixed before JAX starts). The dataset and training settings are tests/_train_worker.py's; the
model is its tiny EfficientNet without squeeze-excite (`config`).

    python tests/_sharding_worker.py steps --out DIR [--runs jit:1,jit:8,pmap:8,jit:4] [--steps N]
    python tests/_sharding_worker.py distributed --init DIR/init.pkl --out P.npz --process-id I --num-processes N --port PORT

``steps`` writes ``DIR/init.pkl`` (the initial `TrainState`), ``DIR/init.npz`` and
``DIR/<strategy>_<k>.npz`` (parameters after N steps on the first k devices; pmap: all local
devices); ``distributed`` starts from that initial state and process 0 writes ``P.npz``.
Parameters are saved as ``leaf_<i>`` arrays in tree-flatten order.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import sys
import time

import numpy as np

# tests/ is on the path (the script's folder); the repository root too, for runs by hand.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _train_worker
from _train_worker import CLASSES, make_dataset, save_params


def config(**overrides):
    """tests/_train_worker.py's training settings on its tiny model less squeeze-excite: SE is
    per-cell (a spatial mean inside each crop), so it plays no part in what data parallelism can
    get wrong (gradients, loss and BatchNorm statistics summed over devices), and without it the
    step traces and compiles ~25% faster."""
    base = _train_worker.train_config(**overrides)
    return dataclasses.replace(base, model=dataclasses.replace(base.model, se_ratio=0.0))


def run_steps(cfg, mesh, state, num_steps: int):
    """`num_steps` steps of `cfg.strategy` on `mesh` from the host `state`, fed by the real
    pipeline (each process its rows of every global batch); host params."""
    import jax

    from gradcamo_jax import train
    from gradcamo_jax.data import pipeline

    data = make_dataset(cfg.data)
    runner = train.make_runner(cfg, mesh, np.ones(CLASSES, np.float32))
    state = runner.put_state(state)
    ds = pipeline.train_dataset(data.sources["train"], cfg.data, cfg.seed, jax.process_index(), jax.process_count())
    for t in range(num_steps):
        state, _ = runner.step(state, runner.put_batch(ds[t]))
    return runner.get_state(state).params


def cmd_steps(args) -> None:
    """One process for every run, so the initial state is built (and compiled) once."""
    import jax

    from gradcamo_jax import sharding, train

    cfg = config()
    init = train.create_state(cfg, train.training_model_config(cfg), make_dataset(cfg.data).input_shape)
    with open(os.path.join(args.out, "init.pkl"), "wb") as f:
        pickle.dump(init, f)
    save_params(os.path.join(args.out, "init.npz"), init.params)
    for run in args.runs.split(","):
        strategy, k = run.split(":")
        mesh = sharding.make_mesh(jax.devices()[: int(k)])
        t, c = time.perf_counter(), time.process_time()
        params = run_steps(config(strategy=strategy), mesh, init, args.steps)
        print(f"{run}: {time.perf_counter() - t:.1f} s, {time.process_time() - c:.1f} s CPU", flush=True)
        save_params(os.path.join(args.out, f"{strategy}_{k}.npz"), params)


def cmd_distributed(args) -> None:
    from gradcamo_jax import sharding

    sharding.initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
    import jax

    assert jax.process_count() == args.num_processes, jax.process_count()
    with open(args.init, "rb") as f:
        init = pickle.load(f)
    t, c = time.perf_counter(), time.process_time()
    params = run_steps(config(), sharding.make_mesh(), init, args.steps)
    print(f"process {jax.process_index()}: {time.perf_counter() - t:.1f} s, {time.process_time() - c:.1f} s CPU", flush=True)
    if jax.process_index() == 0:
        save_params(args.out, params)


def main() -> None:
    import absl.flags

    absl.flags.FLAGS.mark_as_parsed()
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("steps")
    s.add_argument("--out", required=True)
    s.add_argument("--runs", default="jit:1,jit:8,pmap:8,jit:4", help="comma-separated STRATEGY:DEVICES")
    s.add_argument("--steps", type=int, default=3)
    d = sub.add_parser("distributed")
    d.add_argument("--out", required=True)
    d.add_argument("--init", required=True, help="init.pkl of a `steps` run")
    d.add_argument("--process-id", type=int, required=True)
    d.add_argument("--num-processes", type=int, required=True)
    d.add_argument("--port", type=int, required=True)
    d.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    {"steps": cmd_steps, "distributed": cmd_distributed}[args.cmd](args)


if __name__ == "__main__":
    main()
