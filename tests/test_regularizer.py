"""The Grad-CAMO training penalty: its score, its gradient, and that training on it moves attention."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import float64

from gradcamo_jax import EfficientNet, explain
from gradcamo_jax.cam import soft_gradcamo
from gradcamo_jax.config import DataConfig, TrainConfig
from gradcamo_jax.train import create_state, learning_rate_schedule, make_optimizer, train_step

# The quick loop checks the settings only; every check of the penalty compiles a second-order
# program and runs in `make test`.
FAST = {
    "test_bad_penalty_settings_are_rejected",
}


def _numpy_ratio(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Σ cam·[mask = 1] / Σ cam per cell in float64 NumPy; NaN where the map sums to 0."""
    cams = np.asarray(cams, np.float64)
    axes = tuple(range(1, cams.ndim))
    total = cams.sum(axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (cams * (masks == 1)).sum(axes) / total, np.nan)


def _soft_gradcamo_fn(model, layer: str):
    """``jit((variables, images, masks, targets) -> soft_gradcamo(...))`` at `layer`."""
    return jax.jit(functools.partial(soft_gradcamo, model, layer=layer))


def test_soft_gradcamo_equals_the_ratio_of_the_explained_maps(tiny3d):
    """For a named class, the penalty's score is Σ cam·[mask = 1] / Σ cam of the map `explain`
    returns for that class (ratio taken here in NumPy, not by `gradcamo.scores`); a map that
    sums to 0 scores 0 instead of NaN."""
    s = tiny3d
    targets = np.array([0, 1, 2, 3])
    # Jitted once per layer (the all-zero images reuse stage4's program): op by op, the first
    # call compiled every primitive of the network on its own (several times one program).
    soft = {layer: _soft_gradcamo_fn(s.model, layer) for layer in ("stage2", "stage4")}

    def both(images, layer):
        e = explain(s.model, s.variables, images, s.masks, layer=layer, targets=targets, return_cam=True)
        got = soft[layer](s.variables, jnp.asarray(images), jnp.asarray(s.masks), jnp.asarray(targets))
        return np.asarray(got), _numpy_ratio(e.cam, s.masks)

    for layer in ("stage2", "stage4"):
        got, ref = both(s.images, layer)
        ok = np.isfinite(ref)
        assert ok.sum() >= 2
        np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-5, atol=1e-6)
        assert np.all(got[~ok] == 0)
    # All-zero images: every activation is a constant, the maps of most classes vanish.
    got, ref = both(np.zeros_like(s.images), "stage4")
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[~np.isfinite(ref)], 0.0)


def test_penalty_gradient_matches_float64_finite_differences(tiny3d, x64):
    """d/dt of Σ_i soft_gradcamo_i(θ + t·d) at t = 0, by autodiff (a gradient through a
    gradient) and by central differences of the forward value, in float64."""
    s = tiny3d
    model = EfficientNet(dataclasses.replace(s.config, dtype="float64"))
    v64 = float64(s.variables)
    # Two cells keep the float64 second-order compile short.
    x, m = jnp.asarray(s.images[:2], jnp.float64), jnp.asarray(s.masks[:2])
    t = jnp.asarray([0, 1])
    rng = np.random.default_rng(0)
    direction = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), v64["params"])

    def f(params):
        return jnp.sum(soft_gradcamo(model, {"params": params, "batch_stats": v64["batch_stats"]}, x, m, t,
                                     layer="stage3"))

    grad = jax.jit(jax.grad(f))(v64["params"])
    # Host-side sums and one jitted program for both shifted points: op by op, every leaf's
    # vdot and shift compiled on its own.
    auto = sum(np.vdot(np.asarray(g), np.asarray(d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    eps = 1e-6
    f_shifted = jax.jit(lambda params, d, h: f(jax.tree.map(lambda p, di: p + h * di, params, d)))
    fd = (f_shifted(v64["params"], direction, eps) - f_shifted(v64["params"], direction, -eps)) / (2 * eps)
    assert abs(float(auto)) > 1e-4  # the penalty does depend on the parameters
    np.testing.assert_allclose(float(auto), float(fd), rtol=1e-6)


def _train(s, weight: float, steps: int, score):
    config = TrainConfig(
        model=s.config, data=DataConfig(batch_size=4), num_steps=steps, learning_rate=3e-3, warmup_steps=2,
        weight_decay=0.0, compute_dtype="float32", gradcamo_weight=weight, gradcamo_layer="stage2",
    )
    state = jax.tree.map(jnp.asarray, create_state(config, s.config, (*s.images.shape[1:],)))
    # Start from the fixture's calibrated BatchNorm statistics, so the penalty's inference-mode
    # maps are meaningful from step 0.
    state = state.replace(batch_stats=s.variables["batch_stats"], params=s.variables["params"])
    step = jax.jit(functools.partial(
        train_step, model=EfficientNet(s.config), tx=make_optimizer(config), schedule=learning_rate_schedule(config),
        class_weights=jnp.ones(s.config.num_classes), gradcamo_weight=weight, gradcamo_layer="stage2",
    ))
    batch = {"image": jnp.asarray(s.images), "mask": jnp.asarray(s.masks), "label": jnp.asarray([0, 1, 2, 3]),
             "valid": jnp.ones(4, bool)}
    metrics = []
    for _ in range(steps):
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
    return metrics, float(jnp.mean(score(state.variables(), batch["image"], batch["mask"], batch["label"])))


def test_training_on_the_penalty_moves_attention_onto_the_cell(tiny3d):
    """On a fixed batch, 20 steps with λ = 2 raise the batch's Grad-CAMO far more than λ = 0,
    and the step reports the penalty's score and the cross-entropy apart from the loss.
    (Measured: from 0.064, 0.523 with λ = 2 and 0.085 with λ = 0 after 20 steps, so both
    bounds below hold by more than 0.25; 0.587 and 0.093 after the 30 steps this test ran
    before. The first step has learning rate 0: warm-up starts at 0.)"""
    s = tiny3d
    score = _soft_gradcamo_fn(EfficientNet(s.config), "stage2")  # one program for both runs' final score
    plain, g0 = _train(s, 0.0, 20, score)
    reg, g1 = _train(s, 2.0, 20, score)
    assert "gradcamo" not in plain[0]
    start = reg[0]["gradcamo"]
    np.testing.assert_allclose(reg[0]["loss"], reg[0]["ce"] + 2.0 * (1 - reg[0]["gradcamo"]), rtol=1e-5)
    assert g1 > start + 0.2, (start, g1)
    assert g1 > g0 + 0.15, (g0, g1)


def test_bad_penalty_settings_are_rejected():
    with pytest.raises(ValueError, match="gradcamo_weight"):
        TrainConfig(gradcamo_weight=-1.0)
    with pytest.raises(ValueError, match="gradcamo_layer"):
        TrainConfig(gradcamo_layer="stage9")


def test_study_scoring_agrees_with_explain_for_every_method(tiny3d, x64):
    """experiments/study.py scores all methods from one trace per layer; each must equal
    the product's `explain` for that method. In float64, so that the comparison is of the
    formulas and not of float32 rounding: the two programs batch differently (3 padded vs
    4), XLA fuses and rounds them differently, and Grad-CAM++'s g²/g³ weights amplify that
    to 2e-4 relative in float32 (measured)."""
    from experiments import study

    s = tiny3d
    model = EfficientNet(dataclasses.replace(s.model.config, dtype="float64"))
    variables = float64(s.variables)
    images = jnp.asarray(s.images, jnp.float64)
    methods = ("gradcam", "gradcam++", "layercam")
    got = study.score_cells(model, variables, images, s.masks, layer="stage2", methods=methods, batch=3)
    for method in methods:
        ref = explain(model, variables, images, s.masks, layer="stage2", method=method)
        np.testing.assert_array_equal(got[method]["predicted"], np.asarray(ref.targets))
        for col, field in (("gradcamo", "cell"), ("neighbors", "neighbors"), ("background", "background"),
                           ("chance", "chance")):
            np.testing.assert_allclose(got[method][col], np.asarray(getattr(ref.scores, field)), rtol=1e-10,
                                       atol=1e-12, err_msg=f"{method} {col}")
