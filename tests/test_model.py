"""EfficientNet architecture: sizes against torchvision, geometry, modes, dtypes, errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradcamo_jax import STAGE_NAMES, EfficientNet, ModelConfig, init

# The quick loop: geometry, errors and one parameter count; the other variants, train mode and
# bfloat16 in `make test`.
FAST = {
    "test_2d_parameter_count_matches_torchvision[b0]",
    "test_default_strides_keep_21_slices_from_vanishing",
    "test_per_axis_stage_strides",
    "test_2d_odd_input_shapes",
    "test_wrong_rank_raises",
    "test_unknown_layer_and_variant",
    "test_layer_shapes_match_the_traced_network",
}

# torchvision.models.efficientnet_b{0..7}(num_classes=1000): trainable parameter counts
# (published in torchvision's model table), an independent check of widths, depths,
# squeeze-excite sizes and the head.
TORCHVISION_PARAMS = {
    "b0": 5_288_548,
    "b1": 7_794_184,
    "b2": 9_109_994,
    "b3": 12_233_232,
    "b4": 19_341_616,
    "b5": 30_389_784,
    "b6": 43_040_704,
    "b7": 66_347_960,
}


def n_params(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant", sorted(TORCHVISION_PARAMS))
def test_2d_parameter_count_matches_torchvision(variant):
    cfg = ModelConfig(variant, num_classes=1000, spatial_dims=2)
    shapes = jax.eval_shape(lambda: init(cfg, jax.random.key(0), (64, 64, 3)))
    assert n_params(shapes["params"]) == TORCHVISION_PARAMS[variant]


def _feature_shapes(cfg, spatial, channels=5):
    model = EfficientNet(cfg)
    v = jax.eval_shape(lambda: init(cfg, jax.random.key(0), (*spatial, channels)))
    x = jax.ShapeDtypeStruct((2, *spatial, channels), jnp.float32)
    return jax.eval_shape(lambda v, x: model.apply(v, x, method="features"), v, x)


def test_default_strides_keep_21_slices_from_vanishing():
    feats = _feature_shapes(ModelConfig("b0"), (21, 128, 128))
    z = [feats[n].shape[1] for n in STAGE_NAMES]
    yx = [feats[n].shape[2:4] for n in STAGE_NAMES]
    # ceil(n / s) per stride, and no stride that would leave fewer than 2 slices.
    assert z == [11, 11, 6, 3, 2, 2, 2, 2, 2]
    assert [a for a, _ in yx] == [64, 64, 32, 16, 8, 8, 4, 4, 4]
    assert feats["top"].shape[-1] == 1280 and feats["stage5"].shape[-1] == 112


def test_per_axis_stage_strides():
    cfg = ModelConfig(
        "b0", stem_stride=(1, 2, 2), stage_strides=(1, (2, 2, 2), (2, 2, 2), (1, 2, 2), 1, (1, 2, 2), 1)
    )
    feats = _feature_shapes(cfg, (21, 128, 128))
    assert [feats[n].shape[1] for n in STAGE_NAMES] == [21, 21, 11, 6, 6, 6, 6, 6, 6]
    with pytest.raises(ValueError, match="axes"):
        ModelConfig(stem_stride=(1, 2))
    with pytest.raises(ValueError, match="one per stage"):
        ModelConfig(stage_strides=(1, 2))


def test_2d_odd_input_shapes():
    feats = _feature_shapes(ModelConfig("tiny", spatial_dims=2), (33, 17))
    assert feats["stem"].shape[1:3] == (17, 9)
    assert feats["top"].shape[1:3] == (2, 2)  # 17 → 9 → 5 → 3 → 2, then held at min_size


@pytest.mark.parametrize(
    "shape, match",
    [((2, 8, 16, 16), "rank"), ((2, 8, 16, 16, 3, 1), "rank")],
)
def test_wrong_rank_raises(tiny3d, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny3d.model.apply(tiny3d.variables, jnp.zeros(shape))


def test_unknown_layer_and_variant():
    with pytest.raises(ValueError, match="unknown layer"):
        from gradcamo_jax.models.efficientnet import layer_index

        layer_index("stage9")
    with pytest.raises(ValueError, match="variant"):
        ModelConfig("b9")


def test_init_is_deterministic_and_train_mode_uses_rngs(tiny3d):
    cfg = tiny3d.config
    a = init(cfg, jax.random.key(3), (7, 24, 20, 3))
    b = init(cfg, jax.random.key(3), (7, 24, 20, 3))
    # Compared on the host: op by op, every leaf shape compiled its own comparison.
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))
    # Two blocks per stage so stochastic depth has residual blocks to drop; head dropout on.
    cfg = ModelConfig("tiny", num_classes=4, stem_stride=(1, 2, 2), depth_mult=0.5, dropout_rate=0.5)
    model = EfficientNet(cfg)
    # Its variables, initialised through XLA's native convolutions: the same values (parameters
    # are drawn before a conv picks its formulation), and init's forward compiles in a fifth
    # of the time of the engineered convolutions' (measured: 1.9 s vs 10.5 s CPU).
    variables = init(dataclasses.replace(cfg, conv_impl="xla"), jax.random.key(3), (7, 24, 20, 3))
    x = jnp.asarray(tiny3d.images)
    run = jax.jit(
        lambda v, x, r: model.apply(v, x, train=True, rngs={"dropout": r}, mutable=["batch_stats"])
    )
    (l1, s1), (l2, _), (l3, _) = (run(variables, x, jax.random.key(k)) for k in (0, 0, 1))
    np.testing.assert_array_equal(np.asarray(l1), np.asarray(l2))
    assert not np.allclose(np.asarray(l1), np.asarray(l3))  # dropout / stochastic depth follow the rng
    moved = jax.tree.map(lambda new, old: float(np.abs(np.asarray(new) - np.asarray(old)).max()), s1["batch_stats"],
                         variables["batch_stats"])
    assert min(jax.tree.leaves(moved)) > 0  # every BatchNorm updated its running statistics


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny3d):
    cfg = ModelConfig("tiny", num_classes=4, stem_stride=(1, 2, 2), dtype="bfloat16")
    model = EfficientNet(cfg)
    logits = jax.jit(model.apply)(tiny3d.variables, jnp.asarray(tiny3d.images))
    ref = tiny3d.logits(tiny3d.variables, jnp.asarray(tiny3d.images))  # the session's compiled float32 forward
    assert logits.dtype == jnp.float32
    assert jax.tree.leaves(tiny3d.variables["params"])[0].dtype == jnp.float32
    # bf16 keeps ~3 significant digits per op; after ~20 ops a few percent of the logit scale.
    ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=0.05 * np.abs(ref).max())
    assert np.corrcoef(np.asarray(logits).ravel(), ref.ravel())[0, 1] > 0.99


@pytest.mark.parametrize(
    "config, spatial",
    [
        (ModelConfig("tiny", stem_stride=(1, 2, 2)), (5, 32, 32)),
        (ModelConfig("b0", stem_stride=(1, 2, 2)), (21, 128, 128)),
        (ModelConfig("tiny", stage_strides=((1, 2, 2), 2, 2, (1, 2, 2), 1, 2, 1)), (9, 37, 50)),
        (ModelConfig("tiny", spatial_dims=2), (31, 20)),
    ],
    ids=["tiny-5x32x32", "b0-paper", "tiny-odd", "tiny-2d"],
)
def test_layer_shapes_match_the_traced_network(config, spatial):
    """The stride arithmetic of `layer_shapes` against the shapes the network actually produces."""
    from gradcamo_jax.models.efficientnet import layer_shapes

    model = EfficientNet(config)
    x = jax.ShapeDtypeStruct((1, *spatial, 3), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, method="features"), v, x)
    assert layer_shapes(config, spatial) == {k: tuple(a.shape[1:-1]) for k, a in feats.items()}
