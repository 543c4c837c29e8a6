"""gradcamo-jax against its PyTorch peers on the identical network (`gradcamo_jax/peers/torch_twin.py`).

* The twin with our weights reproduces our logits and every named activation.
* pytorch-grad-cam's GradCAM, GradCAM++, HiResCAM, LayerCAM and XGradCAM on the twin
  give our raw (layer-resolution, ReLU'd, un-normalised) maps; MONAI's GradCAM too.
* torch's trilinear/bilinear ``interpolate(align_corners=False)`` of the twin's raw
  map gives our crop-resolution map.
* pytorch-grad-cam's default (min-max normalised) output changes Grad-CAMO.

Models have random weights with BatchNorm calibrated on one batch
(`calibrate_batch_stats`) and are tested on another. Late stages of these small crops
have 2×2×2 = 8 positions, so statistics calibrated on 8 crops generalise poorly and
out-of-sample activations grow with depth (B0 logits reach ~1e3 instead of ~1); the
float32 rounding error grows with them. Tolerances are therefore relative to the
magnitude of the compared quantity (1e-4 of max|logit| when that exceeds 1, 1e-4 of
each map's maximum): a real disagreement is O(1) of that scale.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from gradcamo_jax import EfficientNet, ModelConfig, calibrate_batch_stats, grad_cam, gradcamo  # noqa: E402
from gradcamo_jax.cam import cam_from_gradients, upsample  # noqa: E402
from gradcamo_jax.peers.torch_twin import (  # noqa: E402
    TorchEfficientNet,
    import_torchvision_safely,
    load_flax_variables,
    to_channels_first,
)

# The quick loop: the twin reproduces the tiny 3D model, loading fails loudly, and one map
# against pytorch-grad-cam; the other sizes, methods and peers in `make test`.
FAST = {
    "test_twin_reproduces_logits_and_every_named_activation[tiny3d-xla]",
    "test_twin_rejects_another_input_shape",
    "test_load_flax_variables_fails_loudly",
    "test_raw_maps_match_pytorch_grad_cam[gradcam-stage4-xla]",
    "test_gradcampp_formula_is_pytorch_grad_cams",
    "test_min_max_shift_changes_gradcamo_of_positive_maps",
}

# One class per crop, all different; chosen so that no map of the tested layers/methods is
# entirely zero (a dead map would make a comparison vacuous; each test asserts it).
TARGETS = np.array([3, 0, 2])

# name -> (config, spatial, channels)
SETUPS = {
    # odd sizes (ceil(n/s) rounding) and z left unstrided by the stem, then stopped by min_size
    "tiny3d": (ModelConfig("tiny", num_classes=4, stem_stride=(1, 2, 2)), (7, 33, 29), 3),
    "tiny2d": (ModelConfig("tiny", num_classes=4, spatial_dims=2), (31, 26), 2),
    "b0_3d": (ModelConfig("b0", num_classes=6), (5, 32, 32), 5),
}


def random_variables(config: ModelConfig, input_shape: tuple[int, ...], seed: int = 0) -> dict:
    """Random ``{"params", "batch_stats"}`` of the shapes `init` gives, every leaf non-trivial
    (BatchNorm scale/bias and biases too, so a swapped or dropped leaf cannot hide behind
    init's ones and zeros). Kernels N(0, 2 / fan_in). NumPy-filled from `jax.eval_shape`:
    `init` compiles its ~250 initialisers for ~15 s (B0) on 2 CPU cores."""
    model = EfficientNet(dataclasses.replace(config, conv_impl="xla"))
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, *input_shape), jnp.float32)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(fill, shapes)


class Pair:
    """Our model (random weights, BatchNorm calibrated on 8 crops) and its twin with the
    same weights, plus a different test batch of 3 crops.

    ``model(impl)`` is our EfficientNet with ``conv_impl=impl``: "auto" (the default; on CPU
    the engineered "shifted" convolutions with their hand-written VJPs) or "xla" (native
    convolutions, ~3× faster to compile, used where the convolution formulation is not the
    subject)."""

    def __init__(self, name: str):
        config, spatial, channels = SETUPS[name]
        self.name, self.config, self.spatial, self.channels = name, config, spatial, channels
        variables = random_variables(config, (*spatial, channels))
        key = jax.random.key(0)
        calib = jax.random.normal(jax.random.fold_in(key, 1), (8, *spatial, channels))
        self.variables = jax.jit(functools.partial(calibrate_batch_stats, self.model("xla")))(variables, calib)
        self.images = np.asarray(jax.random.normal(jax.random.fold_in(key, 2), (3, *spatial, channels)))
        self.x = to_channels_first(self.images)
        self.twin = self.new_twin()

    def model(self, impl: str = "auto") -> EfficientNet:
        return EfficientNet(dataclasses.replace(self.config, conv_impl=impl))

    def new_twin(self) -> TorchEfficientNet:
        twin = TorchEfficientNet(self.config, self.channels, self.spatial)
        load_flax_variables(twin, self.variables)
        return twin.eval()


@functools.cache
def get_pair(name: str) -> Pair:
    return Pair(name)


@functools.cache
def _jax_forward(model):
    return jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, method="features")))


def _rel_err(ours, ref, axes=None):
    """max |ours - ref| / max |ref| (per leading index when axes is given)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if axes is None:
        return np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30)
    return np.abs(ours - ref).max(axis=axes) / np.maximum(np.abs(ref).max(axis=axes), 1e-30)


def _maps_rel_err(ours, ref):
    """Per-crop max error relative to that crop's map maximum, (N,)."""
    return _rel_err(ours, ref, axes=tuple(range(1, np.ndim(ref))))


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize(("name", "impl"), [("tiny3d", "auto"), ("tiny3d", "xla"), ("tiny2d", "auto"), ("b0_3d", "auto")])
def test_twin_reproduces_logits_and_every_named_activation(name, impl):
    p = get_pair(name)
    logits, feats = _jax_forward(p.model(impl))(p.variables, jnp.asarray(p.images))
    captured = {}
    handles = [
        getattr(p.twin, layer).register_forward_hook(lambda m, i, o, layer=layer: captured.__setitem__(layer, o))
        for layer in feats
    ]
    try:
        with torch.no_grad():
            twin_logits = p.twin(p.x).numpy()
    finally:
        for h in handles:
            h.remove()
    scale = max(1.0, float(np.abs(logits).max()))
    np.testing.assert_allclose(twin_logits, np.asarray(logits), rtol=0, atol=1e-4 * scale)
    assert sorted(captured) == sorted(feats)
    for layer, ours in feats.items():
        ours = np.moveaxis(np.asarray(ours), -1, 1)
        assert captured[layer].shape == ours.shape, layer
        assert tuple(ours.shape[2:]) == p.twin.layer_spatial[layer]
        assert _rel_err(captured[layer].numpy(), ours) < 1e-4, layer


def test_twin_in_train_mode_disagrees():
    """Negative control: the test batch is not the calibration batch, so BatchNorm in the
    wrong mode is caught by the tolerance above."""
    p = get_pair("tiny3d")
    logits, _ = _jax_forward(p.model())(p.variables, jnp.asarray(p.images))
    twin = p.new_twin().train()
    with torch.no_grad():
        wrong = twin(p.x).numpy()
    assert np.abs(wrong - np.asarray(logits)).max() > 1e-2 * max(1.0, float(np.abs(logits).max()))


def test_twin_rejects_another_input_shape():
    p = get_pair("tiny3d")
    with pytest.raises(ValueError, match="built for"):
        p.twin(torch.zeros(1, 3, 7, 32, 29))


def _copy_tree(tree):
    return {k: _copy_tree(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}


@pytest.mark.parametrize("edit", ["missing", "extra", "shape", "config"])
def test_load_flax_variables_fails_loudly(edit):
    p = get_pair("tiny3d")
    v = _copy_tree(jax.device_get(p.variables))
    twin = TorchEfficientNet(p.config, p.channels, p.spatial)
    if edit == "missing":
        del v["params"]["stage3"]["block0"]["se"]["reduce"]["bias"]
        match = "not in the Flax variables.*stage3.block0.se.reduce.bias"
    elif edit == "extra":
        v["batch_stats"]["top"]["bn"]["extra"] = np.zeros(3)
        match = "without a twin tensor.*top/bn/extra"
    elif edit == "shape":
        k = v["params"]["stage5"]["block0"]["depthwise"]["conv"]["kernel"]
        v["params"]["stage5"]["block0"]["depthwise"]["conv"]["kernel"] = k[:3]
        match = "shape mismatches.*stage5/block0/depthwise/conv/kernel"
    else:
        twin = TorchEfficientNet(ModelConfig("tiny", num_classes=5, stem_stride=(1, 2, 2)), 3, p.spatial)
        match = "classifier"
    before = {k: t.clone() for k, t in twin.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_flax_variables(twin, v)
    assert all(torch.equal(before[k], t) for k, t in twin.state_dict().items()), "partial load on error"


# ----------------------------------------------------------------------------- pytorch-grad-cam


@pytest.fixture(scope="module")
def pgc():
    """pytorch-grad-cam, imported after `import_torchvision_safely` (it imports torchvision)."""
    import_torchvision_safely()
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class GradCAMPlusPlusEps(pytorch_grad_cam.GradCAMPlusPlus):
        """pytorch-grad-cam 1.5.7's ``GradCAMPlusPlus.get_cam_weights`` verbatim, except that
        its epsilon (a literal 1e-6 there) is the attribute `eps`, set to ours (1e-7).
        `test_gradcampp_formula_is_pytorch_grad_cams` checks that with 1e-6 it is the stock class."""

        eps = 1e-7

        def get_cam_weights(self, input_tensor, target_layers, target_category, activations, grads):
            grads_power_2 = grads**2
            grads_power_3 = grads_power_2 * grads
            spatial_axes = tuple(range(2, activations.ndim))
            sum_activations = np.sum(activations, axis=spatial_axes)
            sum_activations = sum_activations.reshape(sum_activations.shape + (1,) * len(spatial_axes))
            aij = grads_power_2 / (2 * grads_power_2 + sum_activations * grads_power_3 + self.eps)
            aij = np.where(grads != 0, aij, 0)
            weights = np.maximum(grads, 0) * aij
            return np.sum(weights, axis=spatial_axes)

    return dict(
        target=ClassifierOutputTarget,
        scale_cam_image=scale_cam_image,
        GradCAM=pytorch_grad_cam.GradCAM,
        GradCAMPlusPlus=pytorch_grad_cam.GradCAMPlusPlus,
        GradCAMPlusPlusEps=GradCAMPlusPlusEps,
        # our method name -> the pytorch-grad-cam class computing the same formula
        methods={
            "gradcam": pytorch_grad_cam.GradCAM,
            "gradcam++": GradCAMPlusPlusEps,
            "hirescam": pytorch_grad_cam.HiResCAM,
            "layercam": pytorch_grad_cam.LayerCAM,
            "xgradcam": pytorch_grad_cam.XGradCAM,
        },
    )


def pgc_raw_maps(pgc, cam_cls, twin, layer: str, x, targets):
    """pytorch-grad-cam's per-layer map before `scale_cam_image`: the steps of
    ``BaseCAM.forward`` and ``compute_cam_per_layer`` up to ``np.maximum(cam, 0)``, i.e.
    ReLU(Σ_k w_k A_k) at layer resolution, for ``ClassifierOutputTarget`` targets
    (the pre-softmax logit). Returns (raw (N, *s), activations, gradients) as NumPy."""
    module = getattr(twin, layer)
    cam = cam_cls(model=twin, target_layers=[module])
    try:
        targets = [pgc["target"](int(t)) for t in targets]
        outputs = cam.activations_and_grads(x)
        twin.zero_grad()
        loss = sum(t(o) for t, o in zip(targets, outputs))
        loss.backward()
        a = cam.activations_and_grads.activations[0].numpy()
        g = cam.activations_and_grads.gradients[0].numpy()
        raw = np.maximum(cam.get_cam_image(x, module, targets, a, g, False), 0)
    finally:
        cam.activations_and_grads.release()
    return raw, a, g


def _assert_live(maps):
    assert (np.asarray(maps).reshape(len(maps), -1).max(1) > 0).all(), "a dead map makes the comparison vacuous"


METHOD_CASES = [
    *[(m, layer, "xla") for layer in ("stage4", "top") for m in ("gradcam", "gradcam++", "hirescam", "layercam", "xgradcam")],
    # The default CPU convolutions: the gradient crosses stages 5-7 through their custom VJPs.
    ("gradcam", "stage4", "auto"),
    ("gradcam++", "stage4", "auto"),
]


@pytest.mark.parametrize(("method", "layer", "impl"), METHOD_CASES)
def test_raw_maps_match_pytorch_grad_cam(pgc, method, layer, impl):
    p = get_pair("tiny3d")
    ours = grad_cam(p.model(impl), p.variables, p.images, layer=layer, targets=TARGETS, method=method, upsample_to_input=False)
    np.testing.assert_array_equal(np.asarray(ours.targets), TARGETS)
    ref, _, _ = pgc_raw_maps(pgc, pgc["methods"][method], p.twin, layer, p.x, TARGETS)
    assert ref.shape == ours.cam.shape
    _assert_live(ref)
    err = _maps_rel_err(ours.cam, ref)
    assert (err < 1e-4).all(), err


def _pp_map(cls, a, g):
    """ReLU(Σ_k w_k A_k) with the Grad-CAM++ weights of pytorch-grad-cam class `cls`; (N, K, *s) → (N, *s)."""
    w = cls.get_cam_weights(cls, None, None, None, a, g)
    return np.maximum((w.reshape(w.shape + (1,) * (a.ndim - 2)) * a).sum(1), 0)


def test_gradcampp_formula_is_pytorch_grad_cams(pgc):
    """The reference used above for "gradcam++" is pytorch-grad-cam's formula: with its
    epsilon (1e-6) it reproduces the stock class bit for bit on real activations/gradients;
    with ours (1e-7) it is what we compute. The stock class differs from ours here by
    ~1e-3 of the map maximum (more than the tolerance) only because of that epsilon."""
    p = get_pair("tiny3d")
    _, a, g = pgc_raw_maps(pgc, pgc["GradCAMPlusPlus"], p.twin, "stage4", p.x, TARGETS)
    stock_eps = type("Stock", (pgc["GradCAMPlusPlusEps"],), {"eps": 1e-6})
    np.testing.assert_array_equal(_pp_map(stock_eps, a, g), _pp_map(pgc["GradCAMPlusPlus"], a, g))


def test_gradcampp_epsilon_matters_for_small_gradients(pgc):
    """Grad-CAM++: α = G² / (2G² + Σ_v A·G³ + eps); ours eps = 1e-7, pytorch-grad-cam's 1e-6.
    eps is not negligible next to 2G² once |G| ≲ 1e-3 (late layers of large crops: the
    global pool divides gradients by the number of positions), and pushes α towards 0.
    On the same (A, G) with |G| ~ 1e-4 ours is the formula with 1e-7 and differs from the stock class."""
    rng = np.random.default_rng(0)
    a = np.asarray(jax.nn.silu(rng.normal(size=(3, 16, 2, 3, 2))), np.float32)  # (N, K, *s)
    g = (1e-4 * rng.normal(size=a.shape)).astype(np.float32)
    ours = np.stack(
        [np.asarray(cam_from_gradients(jnp.moveaxis(ai, 0, -1), jnp.moveaxis(gi, 0, -1), "gradcam++")) for ai, gi in zip(a, g)]
    )
    _assert_live(ours)
    assert (_maps_rel_err(ours, _pp_map(pgc["GradCAMPlusPlusEps"], a, g)) < 1e-5).all()
    assert (_maps_rel_err(ours, _pp_map(pgc["GradCAMPlusPlus"], a, g)) > 0.1).all()


@pytest.mark.parametrize(("name", "layer"), [("tiny3d", "stage4"), ("tiny2d", "stage3")])
def test_upsampled_maps_match_torch_interpolate(pgc, name, layer):
    """Our crop-resolution map = torch ``interpolate(align_corners=False)`` (trilinear in 3D,
    bilinear in 2D) of the twin's raw map. The interpolation alone agrees to 1e-6; the rest
    of the tolerance is the float32 difference of the raw maps."""
    p = get_pair(name)
    ours = grad_cam(p.model(), p.variables, p.images, layer=layer, targets=TARGETS)
    raw, _, _ = pgc_raw_maps(pgc, pgc["GradCAM"], p.twin, layer, p.x, TARGETS)
    _assert_live(raw)
    assert all(s < n for s, n in zip(raw.shape[1:], p.spatial))
    mode = "trilinear" if len(p.spatial) == 3 else "bilinear"
    ref = F.interpolate(torch.from_numpy(raw)[:, None], size=p.spatial, mode=mode, align_corners=False)[:, 0].numpy()
    interp_only = np.stack([np.asarray(upsample(jnp.asarray(r), p.spatial)) for r in raw])
    assert (_maps_rel_err(interp_only, ref) < 1e-6).all()
    assert ours.cam.shape == ref.shape
    assert (_maps_rel_err(ours.cam, ref) < 2e-5).all(), _maps_rel_err(ours.cam, ref)


def _ellipsoid_masks(n, spatial, seed=0):
    """(n, *spatial) uint8: central cell (1) and a neighbour (2) as random ellipsoids."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij")
    out = np.zeros((n, *spatial), np.uint8)
    for i in range(n):
        for code, lo, hi in ((2, 0.1, 0.9), (1, 0.3, 0.7)):
            c = rng.uniform(lo, hi, len(spatial)) * np.array(spatial)
            r = rng.uniform(0.2, 0.35, len(spatial)) * np.array(spatial)
            out[i][sum(((gr - ci) / ri) ** 2 for gr, ci, ri in zip(grids, c, r)) <= 1] = code
    return out


def test_pytorch_grad_cam_default_output_changes_gradcamo(pgc):
    """pytorch-grad-cam's default output is the raw map min-max normalised, resized (in 3D by
    ``scipy.ndimage.zoom``: a cubic spline, not trilinear), clipped at 0 and min-max
    normalised again. Its inside-mask fraction is not the raw map's, while a positive scale
    of the raw map leaves Grad-CAMO unchanged: why we never normalise."""
    p = get_pair("tiny3d")
    layer = "stage4"
    masks = _ellipsoid_masks(3, p.spatial)
    assert all((masks == 1).any(axis=tuple(range(1, masks.ndim))))
    ours = grad_cam(p.model(), p.variables, p.images, layer=layer, targets=TARGETS)
    raw, _, _ = pgc_raw_maps(pgc, pgc["GradCAM"], p.twin, layer, p.x, TARGETS)
    cam = pgc["GradCAM"](model=p.twin, target_layers=[p.twin.stage4])
    try:
        default = cam(input_tensor=p.x, targets=[pgc["target"](int(t)) for t in TARGETS])
    finally:
        cam.activations_and_grads.release()
    # What the library's call does to the raw maps (target size is given X, Y, Z there).
    scale = pgc["scale_cam_image"]
    np.testing.assert_allclose(default, scale(np.maximum(scale(raw, p.spatial[::-1]), 0)), atol=1e-6)

    score = np.asarray(gradcamo(np.asarray(ours.cam), masks).cell)
    np.testing.assert_allclose(gradcamo(np.asarray(ours.cam) * 37.0, masks).cell, score, rtol=1e-5)
    default_score = np.asarray(gradcamo(default, masks).cell)
    # Here the maps touch 0, so the first min-max is a pure rescale; the spline resize, the clip
    # and the second min-max move each cell's score by ~5e-3 (float32 noise is ~1e-6).
    assert (np.abs(default_score - score) > 1e-3).all(), (default_score, score)


def test_min_max_shift_changes_gradcamo_of_positive_maps():
    """Min-max alone (same trilinear resize) is a pure rescale of a map whose minimum is 0,
    but shifts a strictly positive map (Grad-CAM++ at "top" here) and changes its score."""
    p = get_pair("tiny3d")
    masks = _ellipsoid_masks(3, p.spatial)
    raw = grad_cam(p.model("xla"), p.variables, p.images, layer="top", targets=TARGETS, method="gradcam++", upsample_to_input=False)
    up = np.stack([np.asarray(upsample(r, p.spatial)) for r in raw.cam]).astype(np.float64)
    flat = up.reshape(3, -1)
    lo, hi = flat.min(1), flat.max(1)
    shifted = lo > 1e-3 * hi
    assert shifted.any(), "no strictly positive map: min-max would be a pure rescale"
    mm = (up - lo.reshape(-1, 1, 1, 1)) / (hi - lo).reshape(-1, 1, 1, 1)
    score = np.asarray(gradcamo(up.astype(np.float32), masks).cell)
    mm_score = np.asarray(gradcamo(mm.astype(np.float32), masks).cell)
    assert (np.abs(mm_score - score)[shifted] > 1e-4).all(), (mm_score, score)  # float32 noise ~1e-6
    np.testing.assert_allclose(mm_score[lo == 0], score[lo == 0], rtol=1e-5)


# ----------------------------------------------------------------------------- MONAI


def test_monai_gradcam_matches_per_class():
    """monai.visualize.GradCAM explains one class per call (``class_idx``) for the whole batch,
    so cells are explained one at a time. `compute_map` is its raw map (ReLU'd, before the
    upsampler and the default normaliser, which maps (min, max) to (1, 0))."""
    try:
        from monai.visualize import GradCAM as MonaiGradCAM
    except Exception as exc:
        pytest.skip(f"monai.visualize.GradCAM does not import: {type(exc).__name__}: {exc}")
    p = get_pair("tiny3d")
    layer = "stage4"
    twin = p.new_twin()  # MONAI leaves its hooks on the module
    mcam = MonaiGradCAM(nn_module=twin, target_layers=layer)
    raw = np.concatenate(
        [mcam.compute_map(p.x[i : i + 1], class_idx=int(t))[:, 0].detach().numpy() for i, t in enumerate(TARGETS)]
    )
    ours = grad_cam(p.model(), p.variables, p.images, layer=layer, targets=TARGETS, upsample_to_input=False)
    assert raw.shape == ours.cam.shape
    assert (_maps_rel_err(ours.cam, raw) < 1e-4).all()
    # MONAI's upsampler is trilinear, align_corners=False: our crop-resolution map.
    up = mcam.upsampler(p.spatial)(torch.from_numpy(raw)[:, None])[:, 0].numpy()
    ours_up = grad_cam(p.model(), p.variables, p.images, layer=layer, targets=TARGETS)
    assert (_maps_rel_err(ours_up.cam, up) < 1e-5).all()
