"""Where the forward pass spends its time: per-stage wall time, FLOPs and GFLOP/s.

For the benchmark's model and input (EfficientNet-B0, 5×21×128×128, batch 8, float32 by
default), the forward up to each named stage is jitted on its own; a stage's cost is the
difference between consecutive prefixes (median of `--repeats` calls after a warm-up),
and its FLOPs come from XLA's cost analysis of the compiled prefixes. GFLOP/s per stage
is then set against the machine's sgemm rate, measured in the same run (a 2048² float32
matmul), which bounds what a convolution lowered to matrix products can reach.

Each stage is also timed alone, jitted on its own input activation ("alone" column): the
prefix differences include XLA's fusions across stage boundaries, the stage alone does not.
``--ops N`` adds, per stage, the N XLA ops (thunks) that took the most time in a
`jax.profiler` trace of the stage alone (ms per call; the profiler inflates the total, the
shares are what to read), which is where a stage's gap to its FLOP or bandwidth floor shows.

    python -m experiments.profile_stages                  # ≈ 1 min on 2 CPU cores
    python -m experiments.profile_stages --ops 8 --out experiments/results/profile_stages.json
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gradcamo_jax import STAGE_NAMES, EfficientNet, ModelConfig, calibrate_batch_stats, init


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _flops(jitted, *args) -> float:
    cost = jitted.lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def op_sources(hlo_text: str) -> dict[str, str]:
    """HLO instruction name → the JAX op it came from (its ``op_name`` metadata, without the
    ``jit(...)/`` prefix), for every instruction of a compiled module's text."""
    found = re.finditer(r'^\s*(?:ROOT )?%(\S+) = .*?op_name="([^"]+)"', hlo_text, re.M)
    return {m.group(1): re.sub(r"^jit\([^)]*\)/", "", m.group(2)) for m in found}


def top_ops(fn, n: int, calls: int = 5, sources: dict[str, str] | None = None) -> list[dict]:
    """The `n` XLA ops of `fn()` (already compiled and warmed up) with the most time in a
    `jax.profiler` trace of `calls` calls: ``[{"op", "source", "ms_per_call", "count_per_call"}]``
    (``source`` from `sources`, see `op_sources`). Profiler frames (names starting with "$")
    and the executor's wrapper events are left out."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                fn()
        traces = sorted(Path(d).rglob("*.json.gz"))
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no perfetto trace under {d}")
        events = json.load(gzip.open(traces[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith("$") or "Execute" in name or "Pjit" in name:
            continue
        total[name][0] += e["dur"]
        total[name][1] += 1
    ranked = sorted(total.items(), key=lambda kv: -kv[1][0])[:n]
    sources = sources or {}
    return [{"op": k, "source": sources.get(k, ""), "ms_per_call": us / calls / 1e3, "count_per_call": c / calls}
            for k, (us, c) in ranked]


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    return 2 * n**3 / _time(lambda: mm(a).block_until_ready(), repeats) / 1e9


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="b0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--shape", type=int, nargs="+", default=[21, 128, 128])
    p.add_argument("--channels", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--ops", type=int, default=0, help="list the N slowest XLA ops of each stage alone")
    p.add_argument("--out", default="profile_stages.json")
    args = p.parse_args(argv)

    spatial = tuple(args.shape)
    config = ModelConfig(args.variant, num_classes=6, spatial_dims=len(spatial), dtype=args.dtype)
    model = EfficientNet(config)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, *spatial, args.channels)), jnp.float32)
    variables = init(config, jax.random.key(0), (*spatial, args.channels))
    variables = calibrate_batch_stats(model, variables, x)
    peak = sgemm_gflops()
    print(f"{args.variant} batch {args.batch} crop {args.channels}×{'×'.join(map(str, spatial))} {args.dtype}, "
          f"backend {jax.default_backend()}; sgemm {peak:.0f} GFLOP/s", flush=True)

    rows, prev_t, prev_f, h = [], 0.0, 0.0, x
    for name in STAGE_NAMES:
        fn = jax.jit(lambda v, a, name=name: model.apply(v, a, upto=name, method="features")[name])
        flops = _flops(fn, variables, x)
        t = _time(lambda fn=fn: fn(variables, x).block_until_ready(), args.repeats)
        shape = tuple(fn(variables, x).shape[1:])
        dt, df = max(t - prev_t, 0.0), flops - prev_f
        # Compiled once: timed, profiled, and run to give the next stage its input.
        alone = jax.jit(lambda v, a, name=name: model.apply(v, a, method=lambda m, a: getattr(m, name)(a)))
        alone = alone.lower(variables, h).compile()
        t_alone = _time(lambda alone=alone, h=h: alone(variables, h).block_until_ready(), args.repeats)
        rows.append({"stage": name, "output_shape": shape, "cumulative_s": t, "stage_s": dt, "alone_s": t_alone,
                     "stage_gflop": df / 1e9, "stage_gflops_per_s": df / dt / 1e9 if dt > 0 else float("nan")})
        print(f"  {name:7s} out {str(shape):22s} {dt * 1e3:8.1f} ms  alone {t_alone * 1e3:6.1f} ms  {df / 1e9:7.2f} GFLOP  "
              f"{rows[-1]['stage_gflops_per_s']:7.1f} GFLOP/s  (cumulative {t:.3f} s)", flush=True)
        if args.ops:
            sources = op_sources(alone.as_text())
            rows[-1]["ops"] = top_ops(lambda alone=alone, h=h: alone(variables, h).block_until_ready(), args.ops, sources=sources)
            for o in rows[-1]["ops"]:
                print(f"            {o['ms_per_call']:7.2f} ms  ×{o['count_per_call']:<4g} {o['op']:30s} {o['source']}", flush=True)
        h = alone(variables, h)
        prev_t, prev_f = t, flops
    full = jax.jit(model.apply)
    total_flops = _flops(full, variables, x)
    total_t = _time(lambda: full(variables, x).block_until_ready(), args.repeats)
    out = {"config": vars(args), "sgemm_gflops_per_s": peak, "stages": rows,
           "forward_s": total_t, "forward_gflop": total_flops / 1e9,
           "forward_gflops_per_s": total_flops / total_t / 1e9, "cells_per_s": args.batch / total_t,
           "backend": jax.default_backend(), "jax": jax.__version__}
    print(f"  forward {total_t:.3f} s, {total_flops / 1e9:.1f} GFLOP ({total_flops / 1e9 / args.batch:.2f} per cell), "
          f"{out['forward_gflops_per_s']:.1f} GFLOP/s = {out['forward_gflops_per_s'] / peak:.1%} of sgemm")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    from gradcamo_jax.runtime import reexec_with_hugepages

    reexec_with_hugepages()
    main()
