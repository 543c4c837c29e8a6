"""Train-step time on 1 vs N devices: the data-parallel step of `gradcamo_jax.train`.

Each device count runs in a fresh process (the device count is fixed when JAX starts):
``make_runner`` with the "jit" strategy (batch sharded over a 1-D "data" mesh, parameters
replicated, gradients all-reduced by XLA) and, with ``--pmap``, the "pmap" strategy. Same
global batch, same data, same initial state; reports the median step time of `--repeats`
steps after two untimed ones, the first step's time (compile), and the loss after the
timed steps, which must agree across device counts (same global batch, same update).

On a CPU host the N devices are fake (``--xla_force_host_platform_device_count``) and share
the same cores, so this measures the cost of partitioning and collectives, not a speedup:
the N-device step should take about as long as the 1-device step. On a GPU/TPU host, pass
``--real`` to use the real devices (counts up to ``jax.device_count()``).

    python -m experiments.devices                     # 1 and 8 fake CPU devices, tiny model
    python -m experiments.devices --counts 1 2 4 8 --variant b0 --crop 21 128 128 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(args) -> dict:
    import dataclasses

    import jax
    import numpy as np

    from gradcamo_jax import ModelConfig, sharding, train
    from gradcamo_jax.config import TrainConfig

    devices = jax.devices()[: args.count]
    if len(devices) < args.count:
        raise SystemExit(f"asked for {args.count} devices, JAX sees {len(jax.devices())}")
    model = ModelConfig(args.variant, num_classes=4, spatial_dims=3)
    config = TrainConfig(model=model, strategy=args.strategy)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=args.batch))
    mesh = sharding.make_mesh(devices) if args.strategy == "jit" else None
    shape = (*args.crop, args.channels)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((args.batch, *shape)).astype(np.float32),
        "mask": np.ones((args.batch, *args.crop), np.uint8),
        "label": (np.arange(args.batch) % 4).astype(np.int32),
        "valid": np.ones(args.batch, bool),
    }
    runner = train.make_runner(config, mesh, np.ones(4, np.float32))
    state = runner.put_state(train.create_state(config, model, shape))
    b = runner.put_batch(batch)
    t0 = time.perf_counter()
    state, metrics = runner.step(state, b)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    state, metrics = runner.step(state, b)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, metrics = runner.step(state, b)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    loss = float(runner.host_metrics(metrics)["loss"])
    return {"devices": args.count, "strategy": args.strategy, "median_s": statistics.median(times),
            "first_s": first, "loss": loss, "backend": jax.default_backend()}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs="+", default=[1, 8])
    p.add_argument("--variant", default="tiny")
    p.add_argument("--crop", type=int, nargs=3, default=[5, 32, 32], help="Z Y X")
    p.add_argument("--channels", type=int, default=5)
    p.add_argument("--batch", type=int, default=32, help="global batch (divisible by every count)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--pmap", action="store_true", help="also the pmap strategy")
    p.add_argument("--real", action="store_true", help="use the real devices (no fake CPU devices)")
    p.add_argument("--out", default="devices.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="jit", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return []
    for n in args.counts:
        if args.batch % n:
            p.error(f"--batch {args.batch} is not divisible by {n} devices")
    results = []
    strategies = ["jit", "pmap"] if args.pmap else ["jit"]
    for strategy in strategies:
        for n in args.counts:
            env = dict(os.environ)
            if not args.real:
                env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
                env["JAX_PLATFORMS"] = "cpu"
            cmd = [sys.executable, __file__, "--child", "--count", str(n), "--strategy", strategy,
                   "--variant", args.variant, "--crop", *map(str, args.crop), "--channels", str(args.channels),
                   "--batch", str(args.batch), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not lines:
                raise SystemExit(f"{strategy} on {n} devices failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            r = json.loads(lines[-1][7:])
            results.append(r)
            print(f"  {strategy:<5} {n:3d} devices: step {r['median_s'] * 1e3:8.1f} ms "
                  f"({args.batch / r['median_s']:7.1f} cells/s)  first {r['first_s']:6.1f} s  loss {r['loss']:.6f}",
                  flush=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "results": results}, f, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    from gradcamo_jax.runtime import reexec_with_hugepages

    reexec_with_hugepages()
    main()
