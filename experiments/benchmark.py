"""Throughput of gradcamo-jax against its PyTorch peers, measured in one process run.

Same architecture (EfficientNet, our default per-axis strides), same input, same
weights (copied into the PyTorch twin, `gradcamo_jax.peers.torch_twin`):

  jax_forward        jitted logits
  jax_explain        one jitted pass: logits + pooled features + Grad-CAM + Grad-CAMO
  jax_train_step     forward + backward + AdamW update (BatchNorm in train mode)
  torch_forward      the twin, eval mode, no grad
  torch_hook_gradcam a forward hook on the layer + torch.autograd.grad of the target logits
                     (the fairest hand-written PyTorch Grad-CAM), + Grad-CAMO
  pytorch_grad_cam   pytorch_grad_cam.GradCAM on the twin (what the paper used), + Grad-CAMO
  monai_gradcam      monai.visualize.GradCAM on the twin, one call per class
  torch_train_step   the twin, AdamW, train mode

For each: cells/s (median of `--repeats` timed calls after two warm-up calls, the first
one's time reported separately as first-call/compile time) and the process's peak RSS
after it (a high-water mark: it only grows). Prints a table and writes
`benchmark.json` with ratios of cells/s (> 1 = gradcamo-jax is faster):
``forward_vs_pytorch``, ``explain_vs_pytorch_grad_cam``, ``explain_vs_hook_gradcam``,
``explain_vs_monai``, ``train_vs_pytorch``, and ``explain_vs_forward`` (time ratio).

    python -m experiments.benchmark --quick           # < 5 min on 2 CPU cores
    python -m experiments.benchmark --batch 32 --repeats 10 --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradcamo_jax import EfficientNet, ModelConfig, calibrate_batch_stats, init, make_explain_fn
from gradcamo_jax.metric import scores as gradcamo_scores
from gradcamo_jax.runtime import hugepages_active, peak_rss_mb


@dataclasses.dataclass
class Result:
    name: str
    cells_per_s: float
    first_call_s: float
    median_s: float
    peak_rss_mb: float
    note: str = ""


def measure(name: str, fn, batch: int, repeats: int, note: str = "") -> Result:
    """Call `fn()` (which must block until its result is ready) twice to warm up (the first
    call's time is reported as first-call/compile time), then `repeats` timed times."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    # One untimed settling call: the first rows after a switch between JAX and PyTorch ran
    # up to 2x slow while the other runtime's worker threads wound down.
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    r = Result(name, batch / med, first, med, peak_rss_mb(), note)
    print(f"  {name:<20} {r.cells_per_s:9.2f} cells/s  median {med:8.3f} s  first {first:8.2f} s  "
          f"peak RSS {r.peak_rss_mb:8.0f} MB {note}", flush=True)
    return r


def synthetic_masks(batch: int, spatial: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """(B, *spatial) uint8: a central ellipsoid (1) and a neighbour (2) per crop."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in spatial], indexing="ij")
    masks = np.zeros((batch, *spatial), np.uint8)
    for i in range(batch):
        off = rng.uniform(0.4, 0.7) * np.array([0.0] + [1.0] * (len(spatial) - 1))
        masks[i][sum(((g - o) / 0.35) ** 2 for g, o in zip(grids, off)) <= 1] = 2
        masks[i][sum((g / 0.4) ** 2 for g in grids) <= 1] = 1
    return masks


def jax_benchmarks(args, model, variables, images, masks, targets) -> list[Result]:
    out = []
    x = jnp.asarray(images)
    m = jnp.asarray(masks)
    t = jnp.asarray(targets)
    fwd = jax.jit(model.apply)
    out.append(measure("jax_forward", lambda: fwd(variables, x).block_until_ready(), len(images), args.repeats))
    explain = make_explain_fn(model, args.layer, "gradcam", feature_layers=(args.layer,))
    out.append(
        measure(
            "jax_explain",
            lambda: explain(variables, x, m, t).scores.cell.block_until_ready(),
            len(images),
            args.repeats,
        )
    )
    tx = optax.adamw(1e-3, weight_decay=0.05)
    train_model = EfficientNet(model.config)

    def loss_fn(params, batch_stats, x, y, rng):
        logits, updates = train_model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True,
            rngs={"dropout": rng}, mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    @jax.jit
    def train_step(state, x, y, rng):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    state = [(variables["params"], variables["batch_stats"], tx.init(variables["params"]))]
    y = jnp.asarray(targets)
    key = jax.random.key(0)

    def step():
        state[0], loss = train_step(state[0], x, y, key)
        loss.block_until_ready()

    out.append(measure("jax_train_step", step, len(images), args.repeats))
    return out


def torch_benchmarks(args, config, variables, images, masks, targets) -> list[Result]:
    import torch

    from gradcamo_jax.peers.torch_twin import TorchEfficientNet, import_torchvision_safely, load_flax_variables

    torch.set_num_threads(os.cpu_count() or 1)
    out = []
    spatial = images.shape[1:-1]
    twin = TorchEfficientNet(config, images.shape[-1], spatial)
    load_flax_variables(twin, variables)
    twin.eval()
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, 1)))
    masks_t = np.asarray(masks)

    def forward():
        with torch.no_grad():
            twin(x)

    out.append(measure("torch_forward", forward, len(images), args.repeats))

    layer = getattr(twin, args.layer)
    size = tuple(spatial)
    mode = "trilinear" if len(spatial) == 3 else "bilinear"

    def hook_gradcam():
        store = {}
        handle = layer.register_forward_hook(lambda mod, inp, o: store.__setitem__("a", o))
        try:
            logits = twin(x)
            sel = logits[torch.arange(len(targets)), torch.as_tensor(targets)]
            (g,) = torch.autograd.grad(sel.sum(), store["a"])
        finally:
            handle.remove()
        a = store["a"].detach()
        w = g.mean(dim=tuple(range(2, g.ndim)), keepdim=True)
        cam = torch.relu((w * a).sum(1, keepdim=True))
        cam = torch.nn.functional.interpolate(cam, size=size, mode=mode, align_corners=False)[:, 0]
        return np.asarray(gradcamo_scores(jnp.asarray(cam.numpy()), jnp.asarray(masks_t)).cell)

    out.append(measure("torch_hook_gradcam", hook_gradcam, len(images), args.repeats))

    import_torchvision_safely()
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = GradCAM(model=twin, target_layers=[layer])
    tgts = [ClassifierOutputTarget(int(c)) for c in targets]

    def pgc():
        maps = cam(input_tensor=x, targets=tgts)  # (N, *S) min-max normalised, resized on the CPU
        return np.asarray(gradcamo_scores(jnp.asarray(maps), jnp.asarray(masks_t)).cell)

    out.append(measure("pytorch_grad_cam", pgc, len(images), args.repeats, "(maps min-max normalised)"))
    cam.activations_and_grads.release()

    try:
        from monai.visualize import GradCAM as MonaiGradCAM

        mcam = MonaiGradCAM(nn_module=twin, target_layers=args.layer)

        def monai():
            # MONAI explains one class per call (a batch with several classes mixes them).
            maps = np.zeros(masks_t.shape, np.float32)
            for c in np.unique(targets):
                idx = np.flatnonzero(targets == c)
                maps[idx] = mcam(x[idx], class_idx=int(c))[:, 0].detach().numpy()
            return np.asarray(gradcamo_scores(jnp.asarray(maps), jnp.asarray(masks_t)).cell)

        out.append(measure("monai_gradcam", monai, len(images), args.repeats, "(per class)"))
    except Exception as exc:
        print(f"  monai_gradcam skipped: {type(exc).__name__}: {exc}")

    twin.train()
    opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.05)
    y = torch.as_tensor(targets, dtype=torch.long)  # cross_entropy wants int64 class indices

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(twin(x), y)
        loss.backward()
        opt.step()

    out.append(measure("torch_train_step", torch_step, len(images), args.repeats))
    return out


def ratios(results: dict[str, Result]) -> dict[str, float]:
    def r(a, b):
        return results[a].cells_per_s / results[b].cells_per_s if a in results and b in results else None

    out = {
        "forward_vs_pytorch": r("jax_forward", "torch_forward"),
        "explain_vs_pytorch_grad_cam": r("jax_explain", "pytorch_grad_cam"),
        "explain_vs_hook_gradcam": r("jax_explain", "torch_hook_gradcam"),
        "explain_vs_monai": r("jax_explain", "monai_gradcam"),
        "train_vs_pytorch": r("jax_train_step", "torch_train_step"),
    }
    if "jax_explain" in results and "jax_forward" in results:
        out["explain_vs_forward"] = results["jax_explain"].median_s / results["jax_forward"].median_s
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 repeats, skip nothing; < 5 min on 2 CPU cores")
    p.add_argument("--variant", default="b0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--shape", type=int, nargs="+", default=[21, 128, 128], help="crop spatial shape, Z Y X")
    p.add_argument("--channels", type=int, default=5)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--layer", default="stage5")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--out", default="benchmark.json")
    p.add_argument("--no-hugepages", action="store_true",
                   help="keep glibc's default malloc (4 KiB pages) instead of restarting with huge pages "
                        "(gradcamo_jax.runtime); both runtimes in this process get the same setting")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = max(5, min(args.repeats, 5))

    spatial = tuple(args.shape)
    config = ModelConfig(args.variant, num_classes=args.classes, spatial_dims=len(spatial), dtype=args.dtype)
    model = EfficientNet(config)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, *spatial, args.channels)).astype(np.float32)
    masks = synthetic_masks(args.batch, spatial)
    targets = (np.arange(args.batch) % args.classes).astype(np.int32)
    variables = init(config, jax.random.key(0), (*spatial, args.channels))
    # Random weights in inference mode make activations vanish; calibrate BatchNorm on other data.
    calib = rng.standard_normal(images.shape).astype(np.float32)
    model32 = EfficientNet(dataclasses.replace(config, dtype="float32"))
    variables = jax.device_get(calibrate_batch_stats(model32, variables, jnp.asarray(calib)))

    print(f"gradcamo-jax benchmark: {args.variant}, batch {args.batch}, crop {args.channels}×{'×'.join(map(str, spatial))}, "
          f"layer {args.layer}, {args.dtype}, backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"huge-page malloc {'on' if hugepages_active() else 'off'}", flush=True)
    results = {r.name: r for r in jax_benchmarks(args, model, variables, images, masks, targets)}
    if not args.skip_torch:
        results.update({r.name: r for r in torch_benchmarks(args, config, variables, images, masks, targets)})

    summary = {
        "config": {k: v for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind),
            "hugepages": hugepages_active(),
        },
        "results": {k: dataclasses.asdict(v) for k, v in results.items()},
        **ratios(results),
    }
    try:
        import torch

        summary["machine"]["torch"] = torch.__version__
        summary["machine"]["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    print("\nratios (cells/s, > 1 = gradcamo-jax faster; explain_vs_forward is a time ratio):")
    for k, v in ratios(results).items():
        print(f"  {k:<28} {v:8.2f}" if v is not None else f"  {k:<28}      n/a")
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    # Both runtimes, one process, one allocator setting: huge pages unless --no-hugepages.
    if "--no-hugepages" not in sys.argv:
        from gradcamo_jax.runtime import reexec_with_hugepages

        reexec_with_hugepages()
    main()
