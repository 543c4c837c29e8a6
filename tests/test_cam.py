"""Grad-CAM family and the one-pass `explain`, against closed forms and finite differences."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import float64

from gradcamo_jax import CAM_METHODS, EfficientNet, ModelConfig, explain, grad_cam, gradcamo, upsample
from gradcamo_jax.cam import cam_from_gradients

# The quick loop: input checks, the map rule of every method, and one end-to-end `explain`
# against separate computations; closed forms, float64 gradients and sharding in `make test`.
FAST = {
    "test_bad_input_raises_value_error",
    "test_cam_from_gradients_is_nonnegative_for_every_method",
    "test_nan_error_names_the_cell",
    "test_one_pass_agrees_with_separate_computations",
}


def _top_and_classifier(setup):
    feats = setup.features(setup.variables, jnp.asarray(setup.images))
    w = np.asarray(setup.variables["params"]["classifier"]["kernel"])  # (K_top, classes)
    return np.asarray(feats["top"], np.float64), w


@pytest.mark.parametrize("fixture", ["tiny3d", "tiny2d"])
def test_gradcam_at_gap_head_is_classifier_weighted_map(fixture, request):
    """With a GAP + dense head, α_k = w_kc / |v| exactly, so Grad-CAM = ReLU(Σ_k w_kc A_k) / |v|
    and both give the same Grad-CAMO (the original CAM of Zhou et al. 2016)."""
    s = request.getfixturevalue(fixture)
    out = grad_cam(s.model, s.variables, s.images, layer="top", upsample_to_input=False)
    a, w = _top_and_classifier(s)
    t = np.asarray(out.targets)
    ref = np.maximum(np.einsum("n...k,kn->n...", a, w[:, t]), 0)
    nvox = np.prod(a.shape[1:-1])
    np.testing.assert_allclose(np.asarray(out.cam) * nvox, ref, rtol=1e-4, atol=1e-5 * ref.max())
    full = explain(s.model, s.variables, s.images, s.masks, layer="top")
    ref_up = np.stack([np.asarray(upsample(jnp.asarray(r, jnp.float32), s.masks.shape[1:])) for r in ref])
    np.testing.assert_allclose(np.asarray(full.scores.cell), np.asarray(gradcamo(ref_up, s.masks).cell), rtol=1e-5)


def test_methods_reduce_to_closed_forms_at_gap_head(tiny3d):
    """At "top" the gradient is spatially constant (g_k = w_kc/|v|): HiResCAM and XGrad-CAM equal
    Grad-CAM, LayerCAM keeps only positive weights, Grad-CAM++ has the closed form below."""
    s = tiny3d
    a, w = _top_and_classifier(s)
    logits = np.asarray(s.logits(s.variables, jnp.asarray(s.images)))
    c = logits.argmax(1)
    nvox = np.prod(a.shape[1:-1])
    g = w[:, c].T / nvox  # (N, K)
    gb = g[:, None, None, None, :]
    gradcam_ref = np.maximum((a * gb).sum(-1), 0)
    g2, g3 = gb**2, gb**3
    alpha = np.where(gb != 0, g2 / (2 * g2 + a.sum((1, 2, 3), keepdims=True) * g3 + 1e-7), 0)
    alpha = np.broadcast_to(alpha, a.shape)  # one α per voxel, summed over voxels below
    pp_w = (alpha * np.maximum(gb, 0)).sum((1, 2, 3), keepdims=True)
    refs = {
        "gradcam": gradcam_ref,
        "hirescam": gradcam_ref,
        "xgradcam": np.maximum((a * (gb * a).sum((1, 2, 3), keepdims=True) / (a.sum((1, 2, 3), keepdims=True) + 1e-7)).sum(-1), 0),
        "layercam": np.maximum((a * np.maximum(gb, 0)).sum(-1), 0),
        "gradcam++": np.maximum((a * pp_w).sum(-1), 0),
    }
    assert set(refs) == set(CAM_METHODS)
    for name, ref in refs.items():
        out = grad_cam(s.model, s.variables, s.images, layer="top", method=name, upsample_to_input=False)
        np.testing.assert_allclose(np.asarray(out.cam), ref, rtol=2e-4, atol=1e-6 * ref.max(), err_msg=name)


def test_channel_weights_match_float64_finite_differences(tiny3d, x64):
    """α_k = mean_v ∂y_c/∂A_k(v): perturbing the whole channel k by ε changes y_c by ε·|v|·α_k.
    Central differences in float64, no autodiff in the reference."""
    s = tiny3d
    cfg = ModelConfig("tiny", num_classes=4, stem_stride=(1, 2, 2), dtype="float64")
    model = EfficientNet(cfg)
    v64 = float64(s.variables)
    x = jnp.asarray(s.images[:2], jnp.float64)
    layer = "stage4"
    a = jax.jit(lambda v, x: model.apply(v, x, upto=layer, method="features")[layer])(v64, x)
    out = grad_cam(model, v64, x, layer=layer, upsample_to_input=False)
    targets = np.asarray(out.targets)
    nvox = np.prod(a.shape[1:-1])
    k = a.shape[-1]
    eps = 1e-6

    after = jax.jit(lambda v, a: model.apply(v, a, layer, method="forward_from")[0])

    def logit_after(delta):  # delta (N, K): added to every voxel of each channel
        logits = after(v64, a + delta[:, None, None, None, :])
        return logits[jnp.arange(a.shape[0]), targets]

    basis = jnp.eye(k, dtype=jnp.float64)
    # One program for both signs (h = ±ε).
    shifted = jax.jit(jax.vmap(lambda e, h: logit_after(jnp.broadcast_to(h * e, (a.shape[0], k))), in_axes=(0, None)))
    plus, minus = shifted(basis, eps), shifted(basis, -eps)
    alpha_fd = np.asarray((plus - minus) / (2 * eps * nvox)).T  # (N, K)
    ref = np.maximum(np.einsum("n...k,nk->n...", np.asarray(a), alpha_fd), 0)
    assert out.cam.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out.cam), ref, rtol=1e-6, atol=1e-8 * ref.max())


def test_per_cell_targets_equal_single_cell_calls_in_any_order(tiny3d):
    """The peers' batch bug: every cell must be explained for its own target."""
    s = tiny3d
    targets = np.array([0, 2, 1, 3])
    batch = grad_cam(s.model, s.variables, s.images, layer="stage4", targets=targets)
    singles = [
        grad_cam(s.model, s.variables, s.images[i : i + 1], layer="stage4", targets=targets[i : i + 1]).cam[0]
        for i in range(len(targets))
    ]
    np.testing.assert_allclose(np.asarray(batch.cam), np.stack(singles), rtol=1e-5, atol=1e-6 * float(batch.cam.max()))
    perm = np.array([2, 0, 3, 1])
    shuffled = grad_cam(s.model, s.variables, s.images[perm], layer="stage4", targets=targets[perm])
    np.testing.assert_allclose(np.asarray(shuffled.cam), np.asarray(batch.cam)[perm], rtol=1e-5, atol=1e-6 * float(batch.cam.max()))
    # Different classes give different maps, so the test above can fail.
    other = grad_cam(s.model, s.variables, s.images, layer="stage4", targets=(targets + 1) % 4)
    assert not np.allclose(np.asarray(other.cam), np.asarray(batch.cam), rtol=1e-3)


def test_batched_vjp_equals_per_cell_gradients_in_float64(tiny3d, x64):
    """`layer_gradient` differentiates the batch once with a one-hot cotangent per cell; the
    reference is `jax.grad` of each cell's own target logit, one crop at a time."""
    from gradcamo_jax.cam import layer_gradient

    s = tiny3d
    model = EfficientNet(ModelConfig("tiny", num_classes=4, stem_stride=(1, 2, 2), dtype="float64"))
    v64 = float64(s.variables)
    x = jnp.asarray(s.images, jnp.float64)
    targets = jnp.array([3, -1, 0, 2], jnp.int32)
    logits, t, _, _, a, g = jax.jit(lambda v, x, t: layer_gradient(model, v, x, t, "stage3"))(v64, x, targets)
    assert g.dtype == jnp.float64 and g.shape == a.shape
    # The reference: one crop at a time, plain `jax.grad` of the target logit (each jitted once).
    features = jax.jit(lambda v, x: model.apply(v, x, upto="stage3", method="features")["stage3"])
    after = jax.jit(lambda v, a: model.apply(v, a, "stage3", method="forward_from")[0][0])
    grad = jax.jit(jax.grad(lambda act, v, t: model.apply(v, act, "stage3", method="forward_from")[0][0, t]))
    for i in range(x.shape[0]):
        a_i = features(v64, x[i : i + 1])
        y_i = after(v64, a_i)
        want_t = int(targets[i]) if targets[i] >= 0 else int(np.argmax(np.asarray(y_i)))
        assert int(t[i]) == want_t
        g_i = grad(a_i, v64, want_t)
        np.testing.assert_allclose(np.asarray(logits[i]), np.asarray(y_i), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(g[i]), np.asarray(g_i[0]), rtol=1e-10, atol=1e-14 * float(jnp.abs(g_i).max()))
        assert float(jnp.abs(g_i).max()) > 0


# One `explain` setting for the two tests below, so they share one compiled program.
ONE_PASS = {"layer": "stage4", "feature_layers": ("stage2", "stage4", "top"), "return_cam": True}


def test_default_target_is_the_prediction(tiny3d):
    s = tiny3d
    out = explain(s.model, s.variables, s.images, s.masks, **ONE_PASS)
    logits = np.asarray(s.logits(s.variables, jnp.asarray(s.images)))
    np.testing.assert_array_equal(np.asarray(out.targets), logits.argmax(1))
    explicit = explain(s.model, s.variables, s.images, s.masks, targets=logits.argmax(1), **ONE_PASS)
    np.testing.assert_allclose(np.asarray(explicit.scores.cell), np.asarray(out.scores.cell), rtol=1e-6)


def test_one_pass_agrees_with_separate_computations(tiny3d):
    s = tiny3d
    out = explain(s.model, s.variables, s.images, s.masks, **ONE_PASS)
    x = jnp.asarray(s.images)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(s.logits(s.variables, x)), rtol=1e-5, atol=1e-5)
    feats = s.features(s.variables, x)
    for name in ("stage2", "stage4", "top"):
        np.testing.assert_allclose(
            np.asarray(out.features[name]), np.asarray(feats[name]).mean(axis=(1, 2, 3)), rtol=1e-5, atol=1e-5
        )
    assert out.cam.shape == s.masks.shape
    sep = gradcamo(np.asarray(out.cam), s.masks)
    for key in ("cell", "neighbors", "background", "chance"):
        np.testing.assert_allclose(np.asarray(getattr(out.scores, key)), np.asarray(getattr(sep, key)), rtol=1e-5)
    assert np.all(np.asarray(out.cam) >= 0)


def test_dead_map_gives_nan_and_flag(tiny3d):
    """A CAM that sums to 0 (all weights negative) must give NaN + flag, not a number."""
    s = tiny3d

    def dead(a, g):
        return jnp.zeros_like(g)

    out = explain(s.model, s.variables, s.images, s.masks, layer="stage4", method=dead)
    assert np.all(np.isnan(np.asarray(out.scores.cell)))
    assert np.all(np.asarray(out.scores.cam_zero))
    assert np.all(np.asarray(out.scores.cam_sum) == 0)
    assert np.all(np.isfinite(np.asarray(out.scores.chance)))


@pytest.mark.parametrize(
    "what, match",
    [
        ("rank", "rank"),
        ("channels", "channels"),
        ("mask_shape", "masks have shape"),
        ("nan", "NaN"),
        ("target", "target of cell"),
        ("layer", "unknown layer"),
        ("method", "unknown CAM method"),
    ],
)
def test_bad_input_raises_value_error(tiny3d, what, match):
    s = tiny3d
    images, masks, kwargs = s.images.copy(), s.masks, {}
    if what == "rank":
        images = images[0]
    elif what == "channels":
        images = np.concatenate([images, images[..., :1]], axis=-1)
    elif what == "mask_shape":
        masks = masks[:, :, :-1]
    elif what == "nan":
        images[2, 1, 1, 1, 0] = np.nan
    elif what == "target":
        kwargs["targets"] = np.array([0, 1, 9, 0])
    elif what == "layer":
        kwargs["layer"] = "block3"
    elif what == "method":
        kwargs["method"] = "scorecam"
    kwargs.setdefault("layer", "stage4")
    with pytest.raises(ValueError, match=match):
        explain(s.model, s.variables, images, masks, **kwargs)


def test_nan_error_names_the_cell(tiny3d):
    images = tiny3d.images.copy()
    images[2, 0, 0, 0, 1] = np.inf
    with pytest.raises(ValueError, match="cell 2"):
        explain(tiny3d.model, tiny3d.variables, images, tiny3d.masks, layer="stage4")


def test_cam_from_gradients_is_nonnegative_for_every_method():
    key = jax.random.key(0)
    a = jax.random.normal(key, (3, 4, 5, 6))
    g = jax.random.normal(jax.random.fold_in(key, 1), (3, 4, 5, 6))
    for name in CAM_METHODS:
        cam = cam_from_gradients(a, g, name)
        assert cam.shape == (3, 4, 5) and bool(jnp.all(cam >= 0)), name


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    from conftest import Setup
    from gradcamo_jax import ModelConfig, explain
    assert jax.device_count() == 8, jax.devices()
    s = Setup(ModelConfig("tiny", num_classes=4, stem_stride=(1, 2, 2)), (7, 24, 20), 3, 8)
    ref = explain(s.model, s.variables, s.images, s.masks, layer="stage4", return_cam=True)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    out = explain(s.model, s.variables, shard(s.images), shard(s.masks), layer="stage4", return_cam=True)
    print(json.dumps({
        "n_shards": len(out.scores.cell.sharding.device_set),
        "cell": float(np.abs(np.asarray(out.scores.cell) - np.asarray(ref.scores.cell)).max()),
        "cam": float(np.abs(np.asarray(out.cam) - np.asarray(ref.cam)).max() / np.asarray(ref.cam).max()),
        "logits": float(np.abs(np.asarray(out.logits) - np.asarray(ref.logits)).max() / np.abs(np.asarray(ref.logits)).max()),
    }))
    """
)


@pytest.mark.slow
def test_explain_on_a_sharded_batch_matches_one_device(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(script), str(Path(__file__).parent)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["n_shards"] == 8
    # Not bit-identical: each device runs a batch of 1 instead of 8, so XLA tiles the convolutions
    # differently and float32 rounding differs (seen: 1.3e-5 absolute on logits of a few units).
    assert res["cell"] < 1e-5 and res["cam"] < 1e-5 and res["logits"] < 1e-5, res
