"""Training: configs and overrides, the loss and metrics, exact resume after kill -9, atomic
checkpoints (learning a synthetic plate on held-out wells: tests/test_learning.py).

Runs that must be killed or need fresh JAX processes go through tests/_train_worker.py.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np
import pytest
from _subproc import load_params, run_worker, start_worker, worker_env

from gradcamo_jax import train
from gradcamo_jax.config import ModelConfig, TrainConfig, apply_overrides, config_from_dict, config_to_dict, load_preset

# ----------------------------------------------------------------------------- configs


def test_overrides_are_typed_by_the_field_declaration():
    c = apply_overrides(
        TrainConfig(),
        [
            "model.variant=tiny",
            "model.stem_stride=1,2,2",
            "model.stage_strides=((1,1,1),2,2,2,1,2,1)",
            "data.crop_shape=5,24,24",
            "data.flip_xy=false",
            "grad_clip_norm=none",
            "learning_rate=3e-4",
            "num_steps=7",
            "strategy=pmap",
        ],
    )
    assert c.model.variant == "tiny" and c.model.stem_stride == (1, 2, 2)
    assert c.model.stage_strides[0] == (1, 1, 1) and c.model.stage_strides[1] == 2
    assert c.data.crop_shape == (5, 24, 24) and c.data.flip_xy is False
    assert c.grad_clip_norm is None and c.learning_rate == 3e-4 and c.num_steps == 7 and c.strategy == "pmap"
    assert config_from_dict(TrainConfig, json.loads(json.dumps(config_to_dict(c)))) == c


@pytest.mark.parametrize(
    "override, error",
    [
        ("num_steps=1.5", "expected an int"),
        ("model.varient=b0", "no field 'varient'"),
        ("strategy=tpu", "not one of"),
        ("data.crop_shape=1,2", "expected 3 values"),
        ("model=b0", "set its fields"),
        ("learning_rate", "key=value"),
        ("class_weights=sometimes", "class_weights"),
    ],
)
def test_bad_overrides_name_the_field(override, error):
    with pytest.raises((TypeError, ValueError), match=error):
        apply_overrides(TrainConfig(), [override])


def test_presets_load():
    paper = load_preset("paper")
    assert paper.model.variant == "b0" and paper.model.num_classes == 6
    assert paper.data.crop_shape == (21, 128, 128)
    smoke = load_preset("smoke", ["num_steps=5"])
    assert smoke.model.variant == "tiny" and smoke.num_steps == 5
    with pytest.raises(FileNotFoundError, match=r"expected a preset name \['paper', 'smoke'\]"):
        load_preset("no-such-preset")


# ----------------------------------------------------------------------------- pieces


def test_class_weights_and_schedule():
    cfg = TrainConfig(model=ModelConfig("tiny", num_classes=3), class_weights="balanced", num_steps=100, warmup_steps=10)
    w = train.class_weight_vector(cfg, np.array([10, 30, 0]))
    np.testing.assert_allclose(w[:2] / w[1], [3.0, 1.0])
    assert w[2] == 0 and np.isclose(w[:2].mean(), 1.0)
    np.testing.assert_array_equal(train.class_weight_vector(dataclasses.replace(cfg, class_weights="none"), [1, 2, 3]), 1)
    sched = train.learning_rate_schedule(cfg)
    assert float(sched(0)) == 0.0 and np.isclose(float(sched(10)), cfg.learning_rate)
    assert np.isclose(float(sched(100)), cfg.learning_rate * cfg.end_lr_fraction)


def test_training_model_config_resolves_dtype_and_bn_axis():
    cfg = TrainConfig(model=ModelConfig("tiny"), strategy="pmap", compute_dtype="auto")
    m = train.training_model_config(cfg)
    assert m.bn_axis_name == "data"
    assert m.dtype == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    jit_model = train.training_model_config(dataclasses.replace(cfg, strategy="jit", compute_dtype="bfloat16"))
    assert jit_model.dtype == "bfloat16" and jit_model.bn_axis_name == "data"  # both strategies map over "data"


def test_summarize_eval_per_class():
    sums = {
        "loss": np.float32(6.0),
        "correct": np.float32(3),
        "count": np.float32(6),
        "class_correct": np.array([2.0, 1.0, 0.0]),
        "class_count": np.array([2.0, 4.0, 0.0]),
    }
    out = train.summarize_eval(sums)
    assert out["accuracy"] == 0.5 and out["loss"] == 1.0 and out["count"] == 6
    assert out["per_class_accuracy"] == [1.0, 0.25, None]
    assert out["balanced_accuracy"] == pytest.approx(0.625)


# ----------------------------------------------------------------------------- resume


def _wait_for(pred, timeout: float, what: str, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker ended ({proc.returncode}) before {what}: {proc.stderr.read()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _steps(workdir) -> list[int]:
    manager = train.checkpoint_manager(workdir, read_only=True)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_run(tmp_path, jax_cache):
    """Reference run; then a run killed with SIGKILL mid-training, resumed, killed again
    while committing a checkpoint, and resumed to the end: same final params, bit for bit."""
    env = worker_env(jax_cache, 1)
    ref, work = tmp_path / "ref", tmp_path / "work"
    common = ["--steps", "8", "--checkpoint-every", "2"]
    run_worker(["train", "--workdir", str(ref), "--out", str(tmp_path / "ref.npz"), *common], env)

    # 1. kill -9 from outside while training (the hook slows steps after 3 down).
    proc = start_worker(
        ["train", "--workdir", str(work), "--out", str(tmp_path / "x.npz"), *common, "--slow-after", "3", "--sleep", "2"],
        env,
    )
    progress = work / "progress"
    _wait_for(lambda: progress.exists() and int(progress.read_text() or 0) >= 5, 600, "step 5", proc)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9
    assert max(_steps(work)) in (2, 4)

    # 2. resume, and die inside the commit of checkpoint 6 (files written, not yet published).
    proc = start_worker(["train", "--workdir", str(work), "--out", str(tmp_path / "x.npz"), *common, "--crash-in-save", "6"], env)
    proc.communicate(timeout=600)
    assert proc.returncode == -9
    assert list((work / "checkpoints").glob("6.orbax-checkpoint-tmp*")), "the kill did not land inside the save"
    assert max(_steps(work)) == 4  # the half-written step is not listed ...
    config, variables = train.load_checkpoint(work, "latest")  # ... and the previous one loads
    assert config.num_steps == 8 and set(variables) == {"params", "batch_stats"}

    # 3. resume to the end.
    run_worker(["train", "--workdir", str(work), "--out", str(tmp_path / "resumed.npz"), *common], env)
    a, b = load_params(tmp_path / "ref.npz"), load_params(tmp_path / "resumed.npz")
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(x, y, err_msg=f"leaf {i}")
    steps = _steps(work)
    assert 8 in steps and len(steps) <= 3  # latest 2 + best
    assert not list((work / "checkpoints").glob("*tmp*"))  # the leftover was cleaned up
    logged = [json.loads(line)["step"] for line in (work / "log.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "train"]
    assert logged == list(range(1, 9))  # each step logged once despite two kills
