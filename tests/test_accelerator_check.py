"""experiments/accelerator_check.py: its --dry run (the GPU script's code on the CPU at tiny sizes) and
the containment of failures: a failing section or sub-check is recorded and the rest still runs,
the global deadline skips what is left, a function stops at its first out-of-memory batch."""

from __future__ import annotations

import json
import math
import shutil
import time

import pytest

from experiments import accelerator_check as ac

# The quick loop: failure containment, the deadline, the OOM stop and the JSON; the --dry run
# itself (≈ 50 s of compiling on 2 cores) in `make test`.
FAST = {
    "test_failing_section_is_recorded_and_the_others_run",
    "test_failing_sub_check_leaves_the_section_partial",
    "test_highest_precision_switches_both_frameworks_and_restores",
    "test_global_deadline_skips_the_remaining_sections",
    "test_a_function_stops_at_its_first_out_of_memory_batch",
    "test_json_is_strict_and_the_sampler_parses_nvidia_smi",
}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One --dry run for the module. A generous budget, so that no measurement is skipped for
    time on a busy machine (the deadline itself is tested with stand-in sections below)."""
    out = tmp_path_factory.mktemp("dry")
    t0 = time.perf_counter()
    report = ac.main(["--dry", "--out", str(out), "--budget-s", "900"])
    return out, report, time.perf_counter() - t0


def _strict(text: str) -> dict:
    """JSON parsed as a strict reader would: NaN / Infinity literals are refused."""
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_dry_run_records_every_section_ok(dry):
    out, report, _ = dry
    on_disk = _strict((out / ac.JSON_NAME).read_text())
    # What the file says, read back on its own: the run's own arguments and settings.
    assert on_disk["meta"]["argv"] == ["--dry", "--out", str(out), "--budget-s", "900"]
    assert on_disk["meta"]["budget_s"] == 900.0 and on_disk["meta"]["args"]["variant"] == "tiny"
    assert on_disk["meta"]["args"]["batch_sizes"] == [2, 4]
    assert on_disk["sections"]["end_to_end"]["result"]["store"]["n_cells"] == 64
    assert on_disk["total_s"] >= sum(sec["seconds"] for sec in on_disk["sections"].values())
    assert on_disk == report  # and main() returns what it wrote last
    assert list(on_disk["sections"]) == list(ac.SECTIONS)
    for name, sec in on_disk["sections"].items():
        detail = sec.get("error") or (sec.get("result") or {}).get("errors")
        assert sec["status"] == "ok", (name, detail)
        assert _finite(sec["seconds"])
    md = (out / ac.MD_NAME).read_text()
    for name in ac.SECTIONS:
        assert f"| {name} | ok |" in md
    assert on_disk["meta"]["dry"] is True


def test_dry_environment(dry):
    env = dry[1]["sections"]["environment"]["result"]
    assert env["backend"] == "cpu"
    assert env["versions"]["jax"] and env["versions"]["flax"] and env["versions"]["torch"]
    assert env["devices"] and env["devices"][0]["platform"] == "cpu"
    if shutil.which("nvidia-smi") is None:
        assert env["nvidia_smi"] is None
    else:
        assert isinstance(env["nvidia_smi"], str) and env["nvidia_smi"]


def test_dry_correctness_numbers_are_finite_and_small(dry):
    cor = dry[1]["sections"]["correctness"]["result"]
    conv = cor["convolutions"]
    assert conv["cases"] and conv["all_within_tolerance"] is True
    for case in conv["cases"]:
        for path in ("cpu_shifted", "accelerator_xla_default"):
            for part in ("value", "vjp_x", "vjp_w"):
                d = case[path][part]
                assert _finite(d["max_abs"]) and _finite(d["max_rel"]) and d["nonfinite"] == 0, (case["case"], path, part)
    ex = cor["explain_accelerator_vs_cpu"]["accelerator_default"]
    assert ex["within_tolerance"] is True and ex["same_predictions"] is True
    for key in ("logits", "cam", "gradcamo_cell", "features"):
        assert _finite(ex[key]["max_abs"]) and ex[key]["nonfinite"] == 0, key
    assert all(_finite(g) for g in ex["gradcamo"])
    twin = cor["torch_twin"]["default"]
    assert twin["within_tolerance"] is True and _finite(twin["logits"]["max_rel"])


def test_dry_throughput_rows(dry):
    thr = dry[1]["sections"]["throughput"]["result"]
    rows = {(r["framework"], r["function"], r["dtype"], r["batch"]): r for r in thr["rows"]}
    assert {d for _, _, d, _ in rows} == {"float32"} and {b for *_, b in rows} == {2, 4}
    expect_ok = [(fw, f, "float32", b) for fw, f in (("jax", "forward"), ("jax", "explain"), ("torch", "forward"),
                                                      ("torch", "hook_gradcam")) for b in (2, 4)]
    expect_ok += [("jax", "reliance", "float32", 2), ("torch", "train_step", "float32", 2)]
    for key in expect_ok:
        r = rows[key]
        assert r["status"] == "ok", (key, r.get("error") or r.get("note"))
        for field in ("cells_per_s", "median_s", "first_call_s"):
            assert _finite(r[field]) and r[field] > 0, (key, field)
    # --dry: the JAX train step is traced (no compilation), heavy functions run at batch 2 only,
    # pytorch-grad-cam not at all (--pgc-max-batch 0).
    traced = rows[("jax", "train_step", "float32", 2)]
    assert traced["status"] == "traced" and "loss" in traced["note"], traced
    for key in (("jax", "reliance", "float32", 4), ("torch", "train_step", "float32", 4),
                ("torch", "pytorch_grad_cam", "float32", 2)):
        assert rows[key]["status"] == "skipped", key
    ratios = {(r["dtype"], r["batch"]): r for r in thr["ratios"]}
    assert _finite(ratios[("float32", 2)]["forward_vs_torch"])
    assert _finite(ratios[("float32", 4)]["explain_vs_hook_gradcam"])
    assert ratios[("float32", 2)]["train_vs_torch"] is None


def test_dry_end_to_end(dry):
    e2e = dry[1]["sections"]["end_to_end"]["result"]
    n = e2e["store"]["n_cells"]
    assert n == 64 and e2e["store"]["repeats"] == 4
    assert e2e["scored_cells"] == n and "stopped" not in e2e
    assert e2e["output"]["rows"] == n and e2e["output"]["rows_in_order"] is True
    assert e2e["output"]["gradcamo_nan_fraction"] == 0 and _finite(e2e["output"]["gradcamo_mean"])
    for key in ("scoring_cells_per_s", "steady_cells_per_s"):
        assert _finite(e2e[key]) and e2e[key] > 0
    alone = e2e["bottleneck"]["alone_cells_per_s"]
    assert len(alone) == 3 and all(_finite(v) and v > 0 for v in alone.values())
    # the verdict names the slowest side alone and how close scoring (without its first part) comes to it
    slowest = min(alone, key=alone.get)
    assert e2e["bottleneck"]["slowest_alone"] == slowest
    share = e2e["steady_cells_per_s"] / alone[slowest]
    assert abs(e2e["bottleneck"]["scoring_vs_slowest_alone"] - share) < 1e-9
    label = "input pipeline" if slowest.startswith("input") else slowest.split(" ")[0]
    assert e2e["bottleneck"]["verdict"] == f"{label} (scoring runs at {share:.0%} of it alone)"
    assert [r["reader"] for r in e2e["read_alone"]] == ["scoring._batches"] * len(e2e["read_alone"])
    if shutil.which("nvidia-smi") is None:
        assert e2e["gpu_utilisation"] == {"available": False, "note": "no nvidia-smi on PATH"}
    else:
        assert e2e["gpu_utilisation"]["available"] is True


def _stand_ins(monkeypatch, calls: list, **overrides):
    """Replace every section by a recorder (or by `overrides[name]`)."""
    for name in ac.SECTIONS:
        def record(ctx, name=name):
            calls.append(name)
            return {"value": 1.0}

        monkeypatch.setattr(ac, f"section_{name}", overrides.get(name, record))


def test_failing_section_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    calls: list[str] = []

    def boom(ctx):
        raise RuntimeError("planted failure")

    _stand_ins(monkeypatch, calls, correctness=boom)
    report = ac.main(["--dry", "--out", str(tmp_path)])
    secs = report["sections"]
    assert secs["correctness"]["status"] == "error"
    assert "RuntimeError: planted failure" in secs["correctness"]["error"]
    assert "boom" in secs["correctness"]["traceback"]
    assert [secs[n]["status"] for n in ("environment", "throughput", "end_to_end")] == ["ok"] * 3
    assert calls == ["environment", "throughput", "end_to_end"]
    md = (tmp_path / ac.MD_NAME).read_text()
    assert "| correctness | error |" in md and "planted failure" in md


def test_failing_sub_check_leaves_the_section_partial(tmp_path, monkeypatch):
    calls: list[str] = []
    _stand_ins(monkeypatch, calls, correctness=ac.section_correctness)
    monkeypatch.setattr(ac, "check_convolutions", lambda ctx: {"ok": True})
    monkeypatch.setattr(ac, "check_explain", lambda ctx: (_ for _ in ()).throw(ValueError("bad explain")))
    monkeypatch.setattr(ac, "check_twin", lambda ctx: {"ok": True})
    report = ac.main(["--dry", "--out", str(tmp_path), "--sections", "correctness"])
    sec = report["sections"]["correctness"]
    assert sec["status"] == "partial"
    assert sec["result"]["explain_accelerator_vs_cpu"]["status"] == "error"
    assert sec["result"]["convolutions"]["ok"] is True and sec["result"]["torch_twin"]["ok"] is True
    assert any("bad explain" in e for e in sec["result"]["errors"])
    assert report["sections"]["throughput"]["note"] == "not in --sections"
    md = (tmp_path / ac.MD_NAME).read_text()
    assert "| correctness | partial |" in md and "rendering failed" not in md


def test_highest_precision_switches_both_frameworks_and_restores():
    import jax
    import jax.numpy as jnp
    torch = pytest.importorskip("torch")

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    x = jnp.ones((4, 4))
    with ac._precision("highest"):
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
        assert "HIGHEST" in jax.jit(jnp.matmul).lower(x, x).as_text()
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    assert "HIGHEST" not in jax.jit(jnp.matmul).lower(x, x).as_text()


def test_global_deadline_skips_the_remaining_sections(tmp_path, monkeypatch):
    calls: list[str] = []

    def slow(ctx):
        time.sleep(0.3)
        return {}

    _stand_ins(monkeypatch, calls, environment=slow)
    report = ac.main(["--dry", "--out", str(tmp_path), "--budget-s", "0.1"])
    secs = report["sections"]
    assert secs["environment"]["status"] == "ok"
    for name in ("correctness", "throughput", "end_to_end"):
        assert secs[name]["status"] == "skipped" and "deadline" in secs[name]["note"], name
    assert calls == []
    assert json.loads((tmp_path / ac.JSON_NAME).read_text())["sections"]["end_to_end"]["status"] == "skipped"


def test_a_function_stops_at_its_first_out_of_memory_batch():
    ctx = ac.Ctx(ac.parse_args(["--dry", "--batch-sizes", "2,4,8,16"]), time.perf_counter())
    rows: list[dict] = []
    sweep = ac._Sweep(ctx, "jax", "float32", time.perf_counter() + 60, rows)

    def make(batch):
        def build():
            if batch >= 8:
                raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB")
            return (lambda: batch), (lambda out: out)

        return build

    for b in (2, 4, 8, 16):
        sweep.run("forward", b, make(b))
        sweep.run("explain", b, lambda: (_ for _ in ()).throw(ValueError("not an OOM")))
    status = {(r["function"], r["batch"]): r["status"] for r in rows}
    assert [status[("forward", b)] for b in (2, 4, 8, 16)] == ["ok", "ok", "oom", "skipped"]
    assert [status[("explain", b)] for b in (2, 4, 8, 16)] == ["error", "skipped", "skipped", "skipped"]
    assert all(_finite(r["cells_per_s"]) for r in rows if r["status"] == "ok")
    assert "OOM at batch 8" in next(r["note"] for r in rows if (r["function"], r["batch"]) == ("forward", 16))


def test_json_is_strict_and_the_sampler_parses_nvidia_smi():
    cleaned = ac._clean({"a": float("nan"), "b": [1.5, float("inf")], "c": (1, 2)})
    assert cleaned == {"a": "nan", "b": [1.5, "inf"], "c": [1, 2]}
    json.dumps(cleaned, allow_nan=False)
    assert ac.GpuSampler.parse("87, 40321") == (87.0, 40321.0)
    assert ac.GpuSampler.parse("[N/A], 12") is None
