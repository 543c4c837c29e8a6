"""Wall time of the convolution primitives, "xla" vs "shifted" (`gradcamo_jax.models.conv`).

Cases (float32, channels-last):

  dw3   depthwise 3×3×3, stride 1,       x = (8, 21, 64, 64, 96)
  stem  dense 3×3×3, 5 → 32, (1, 2, 2),  x = (8, 21, 128, 128, 5)
  dw5   depthwise 5×5×5, stride 1,       x = (8, 11, 32, 32, 240)

For each: forward, forward + backward to (x, w) (``jax.grad`` of ``<y, ct>`` for a fixed
random ``ct``), and forward + backward to w only (training: the input needs no gradient).
Median of `--repeats` jitted calls after one warm-up call, `block_until_ready`.

    python -m experiments.conv_timing                     # everything (xla depthwise: minutes)
    python -m experiments.conv_timing --impls shifted --cases dw3,stem
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from gradcamo_jax.models.conv import conv, depthwise_conv

CASES = {
    "dw3": dict(x=(8, 21, 64, 64, 96), w=(3, 3, 3, 1, 96), strides=(1, 1, 1), fn=depthwise_conv),
    "stem": dict(x=(8, 21, 128, 128, 5), w=(3, 3, 3, 5, 32), strides=(1, 2, 2), fn=conv),
    "dw5": dict(x=(8, 11, 32, 32, 240), w=(5, 5, 5, 1, 240), strides=(1, 1, 1), fn=depthwise_conv),
}


def median_time(f, *args, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_case(case: dict, impl: str, repeats: int) -> dict[str, float]:
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, case["x"], jnp.float32)
    w = 0.1 * jax.random.normal(kw, case["w"], jnp.float32)
    fn, strides = case["fn"], case["strides"]

    def forward(x, w):
        return fn(x, w, strides, impl=impl)

    ct = jax.random.normal(kc, jax.eval_shape(forward, x, w).shape, jnp.float32)

    def loss(x, w):
        return jnp.vdot(forward(x, w), ct)

    return {
        "fwd": median_time(jax.jit(forward), x, w, repeats=repeats),
        "fwd+bwd(x,w)": median_time(jax.jit(jax.grad(loss, (0, 1))), x, w, repeats=repeats),
        "fwd+bwd(w)": median_time(jax.jit(jax.grad(loss, 1)), x, w, repeats=repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--impls", default="xla,shifted")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    print(f"{'case':6} {'impl':8} {'fwd':>9} {'fwd+bwd(x,w)':>13} {'fwd+bwd(w)':>11}   (seconds, median of {args.repeats})")
    for name in args.cases.split(","):
        for impl in args.impls.split(","):
            r = time_case(CASES[name], impl, args.repeats)
            print(f"{name:6} {impl:8} {r['fwd']:9.3f} {r['fwd+bwd(x,w)']:13.3f} {r['fwd+bwd(w)']:11.3f}", flush=True)


if __name__ == "__main__":
    main()
