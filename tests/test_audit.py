"""Counterfactual audit: fills, reliance, fill sanity and the model-randomisation baseline,
against planted ground truth (models gated by the mask) and independent references."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import blob_masks
from jax.tree_util import Partial
from scipy import ndimage

from gradcamo_jax import EfficientNet, audit, explain
from gradcamo_jax.audit import (
    FillSettings,
    RelianceSettings,
    context_reliance_index,
    corrected_gradcamo,
    fill_region,
    fill_sanity,
    model_reliance,
    random_baseline,
    randomized_variables,
    reliance,
)

# The quick loop: fill and index definitions and one model whose context reliance is known;
# float64 references, batching, the random baseline and the sanity check in `make test`.
FAST = {
    "test_fills_replace_only_the_region",
    "test_empty_region_leaves_the_crop_unchanged_and_is_flagged",
    "test_fill_arguments_are_checked",
    "test_cri_definition",
    "test_corrected_gradcamo_definition",
    "test_blur_matches_scipy",
    "test_model_that_ignores_context_has_zero_context_drops",
}

DEFAULT_FILL = FillSettings()
ALL_FILLS = RelianceSettings(fills=("noise", "blur", "mean", "swap"))
# Multipliers per mask code (background, cell, neighbours) applied to the input inside the
# model: [0, 1, 0] provably ignores everything but the central cell, [1, 0, 0] everything but
# the background, [1, 1, 1] is the plain model (x · 1 is x bit for bit).
KEEP = {"cell": (0.0, 1.0, 0.0), "background": (1.0, 0.0, 0.0), "all": (1.0, 1.0, 1.0)}


@dataclasses.dataclass(frozen=True)
class _Gated:
    model: EfficientNet

    def __call__(self, variables, keep, images, masks):
        return self.model.apply(variables, images * keep[masks.astype(jnp.int32)][..., None], train=False)


def gated(setup, which: str) -> Partial:
    """One compiled reliance core serves every gate: the gate is a traced argument."""
    return Partial(_Gated(setup.model), setup.variables, jnp.asarray(KEEP[which], jnp.float32))


def donors_of(images):
    return np.roll(images, 1, axis=0)


_fill = jax.jit(fill_region, static_argnames=("region", "fill", "settings"))


@functools.partial(jax.jit, static_argnames=("settings",))
def _all_fills(image, mask, keys, donor, settings=DEFAULT_FILL):
    """Every (region, fill) of one crop, compiled once: ``{"region/fill": (filled, empty)}``;
    `keys` one key or ``{"region/fill": key}``."""
    return {f"{r}/{f}": fill_region(image, mask, r, f, keys[f"{r}/{f}"] if isinstance(keys, dict) else keys,
                                    donor, settings=settings)
            for r in audit.REGIONS for f in audit.FILLS}


def _inside(mask, region):
    return np.isin(mask, audit.REGIONS[region])


# ----------------------------------------------------------------------------- fills


def test_fills_replace_only_the_region(tiny3d):
    """noise: the region's per-channel mean and SD (ddof 0) kept to float32 rounding, ~1e-7
    relative for sums of ≤ 3360 voxels, so tolerance 1e-5 of the SD; a draw with the right
    moments only in expectation would miss by ~1/√n ≥ 1.7e-2. mean: one value per channel,
    the mean. swap: the donor's voxels bit for bit. Every voxel outside the region: bit-identical."""
    image, mask, donor = tiny3d.images[0], tiny3d.masks[0], tiny3d.images[1]
    out = jax.tree.map(np.asarray, _all_fills(image, mask, jax.random.key(3), donor))
    again = _all_fills(image, mask, jax.random.key(3), donor)
    other = _all_fills(image, mask, jax.random.key(4), donor)
    for region in audit.REGIONS:
        inside = _inside(mask, region)
        orig = image[inside].astype(np.float64)
        sd = orig.std(axis=0)
        for fill in audit.FILLS:
            filled, empty = out[f"{region}/{fill}"]
            assert not empty, (region, fill)
            assert np.array_equal(filled[~inside], image[~inside]), (region, fill)
            new = filled[inside].astype(np.float64)
            if fill == "noise":
                np.testing.assert_allclose(new.mean(axis=0), orig.mean(axis=0), rtol=0, atol=1e-5 * sd.max())
                np.testing.assert_allclose(new.std(axis=0), sd, rtol=1e-5)
                assert np.all(new != orig)  # structure replaced, not copied
                assert abs(np.corrcoef(new[:, 0], orig[:, 0])[0, 1]) < 0.2
                assert np.array_equal(np.asarray(again[f"{region}/{fill}"][0]), filled)
                assert not np.array_equal(np.asarray(other[f"{region}/{fill}"][0]), filled)
            elif fill == "mean":
                assert np.all(filled[inside] == filled[inside][0])
                np.testing.assert_allclose(new[0], orig.mean(axis=0), rtol=0, atol=1e-6 * np.abs(orig).max())
            elif fill == "swap":
                assert np.array_equal(filled[inside], donor[inside])
            else:  # blur, default sigma 2 / truncate 4 / reflect
                ref = ndimage.gaussian_filter(image.astype(np.float64), (2, 2, 2, 0), mode="reflect")
                np.testing.assert_allclose(new, ref[inside], rtol=0, atol=2e-6 * np.abs(image).max())


def test_empty_region_leaves_the_crop_unchanged_and_is_flagged(tiny3d):
    image, mask = tiny3d.images[0], tiny3d.masks[0]
    lonely = np.where(mask == 2, 0, mask).astype(np.uint8)  # no neighbours
    out = _all_fills(image, lonely, jax.random.key(0), tiny3d.images[1])
    for fill in audit.FILLS:
        filled, empty = out[f"neighbors/{fill}"]
        assert bool(empty), fill
        assert np.array_equal(np.asarray(filled), image), fill
        assert not bool(out[f"background/{fill}"][1]), fill


@pytest.mark.parametrize(
    "sigma, mode",
    [((1.0, 2.0, 1.5), "reflect"), ((3.0, 2.0, 2.0), "reflect"), ((0.0, 1.5, 3.0), "nearest"),
     ((1.0, 1.0, 1.0), "mirror"), ((1.0, 2.0, 2.0), "wrap"), ((1.5, 1.0, 2.5), "constant")],
)
def test_blur_matches_scipy(tiny3d, sigma, mode):
    """Against scipy.ndimage.gaussian_filter in float64 with the same sigma, mode and truncate
    (channels unblurred); z sigma 3 has a radius (11) above the 7 slices, so the boundary is
    crossed more than once. float32 here: errors ~1e-7 of the data range."""
    image = tiny3d.images[0]
    ref = ndimage.gaussian_filter(image.astype(np.float64), (*sigma, 0), mode=mode, truncate=3.5)
    out = audit.gaussian_blur(jnp.asarray(image), sigma, truncate=3.5, mode=mode)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-6 * np.abs(image).max())


def test_blur_2d_crop_inside_the_region():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(30, 26, 2)).astype(np.float32)
    mask = blob_masks(1, (30, 26))[0]
    ref = ndimage.gaussian_filter(image.astype(np.float64), (2.0, 1.0, 0), mode="reflect")
    out, _ = _fill(image, mask, region="background", fill="blur", key=jax.random.key(0),
                   settings=FillSettings(blur_sigma=(2.0, 1.0)))
    out = np.asarray(out)
    inside = mask == 0
    np.testing.assert_allclose(out[inside], ref[inside], rtol=0, atol=1e-5)
    assert np.array_equal(out[~inside], image[~inside])


def test_fill_arguments_are_checked(tiny3d):
    image, mask = tiny3d.images[0], tiny3d.masks[0]
    with pytest.raises(ValueError, match="donor"):
        fill_region(image, mask, "background", "swap", jax.random.key(0))
    with pytest.raises(ValueError, match="unknown region"):
        fill_region(image, mask, "nucleus", "mean", jax.random.key(0))
    with pytest.raises(ValueError, match="unknown fill"):
        fill_region(image, mask, "cell", "inpaint", jax.random.key(0))
    with pytest.raises(ValueError, match="cri_fill"):
        RelianceSettings(regions=("background", "cell"))
    with pytest.raises(ValueError, match="swap"):
        reliance(gated(tiny3d, "all"), tiny3d.images, tiny3d.masks, key=jax.random.key(0), settings=ALL_FILLS)
    with pytest.raises(ValueError, match="codes in"):
        reliance(gated(tiny3d, "all"), tiny3d.images, tiny3d.masks * 2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="3 keys for 4 cells"):
        reliance(gated(tiny3d, "all"), tiny3d.images, tiny3d.masks, key=jax.random.split(jax.random.key(0), 3))


# ----------------------------------------------------------------------------- reliance


def test_cri_definition():
    ctx = jnp.asarray([0.0, 0.5, 0.3, 0.0, -0.4, 2e-4, 0.2, jnp.nan])
    cell = jnp.asarray([0.7, 0.0, 0.3, 0.0, 0.1, 5e-4, -1.0, 0.3])
    cri, undefined = context_reliance_index(ctx, cell, eps=1e-3)
    np.testing.assert_array_equal(np.asarray(undefined), [False, False, False, True, False, True, False, True])
    np.testing.assert_allclose(np.asarray(cri), [0.0, 1.0, 0.5, np.nan, 0.0, np.nan, 1.0, np.nan])


def test_model_that_ignores_context_has_zero_context_drops(tiny3d):
    s = tiny3d
    r = reliance(gated(s, "cell"), s.images, s.masks, key=jax.random.key(1), donors=donors_of(s.images),
                 settings=ALL_FILLS, batch_size=3)
    drops = np.asarray(r.drops)
    assert r.regions == ("background", "neighbors", "cell", "context")
    assert drops.shape == (4, 4, 4)
    assert not np.asarray(r.empty).any()
    for region in ("background", "neighbors", "context"):
        assert np.array_equal(drops[:, r.regions.index(region)], np.zeros((4, 4))), region
    cell = np.asarray(r.drop("cell", "noise"))
    assert np.all(np.abs(drops[:, r.regions.index("cell")]) > 1e-3)
    assert np.all(cell > 1e-3)  # so the index is defined, and it is 0
    np.testing.assert_array_equal(np.asarray(r.cri), np.zeros(4))
    assert not np.asarray(r.cri_undefined).any()
    assert not np.asarray(r.changed)[:, [0, 1, 3]].any()


def test_model_that_reads_only_background_has_zero_cell_drops(tiny3d):
    s = tiny3d
    r = reliance(gated(s, "background"), s.images, s.masks, key=jax.random.key(1), donors=donors_of(s.images),
                 settings=ALL_FILLS, batch_size=3)
    drops = np.asarray(r.drops)
    for region in ("cell", "neighbors"):
        assert np.array_equal(drops[:, r.regions.index(region)], np.zeros((4, 4))), region
    assert np.all(np.abs(drops[:, r.regions.index("background")]) > 1e-3)
    # context = background + neighbours and the neighbours are ignored, so where the
    # background's new voxels do not depend on the region (blur, swap) the inputs it reads agree.
    for f in (1, 3):
        np.testing.assert_array_equal(drops[:, r.regions.index("context"), f], drops[:, r.regions.index("background"), f])
    # A random-weight model's target can also gain from noise (a negative drop): no evidence,
    # so the index is undefined there; wherever it is defined it must be exactly 1.
    defined = ~np.asarray(r.cri_undefined)
    assert defined.any()
    np.testing.assert_array_equal(np.asarray(r.cri)[defined], 1.0)
    assert np.all(np.asarray(r.drop("context", "noise"))[~defined] <= 1e-3)
    assert np.isnan(np.asarray(r.cri)[~defined]).all()


def _log_softmax64(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_log_probabilities_and_drops_against_float64_numpy(tiny3d):
    """Every (region, fill) drop equals one recomputed from fills made separately and a
    separate forward, log-softmax in float64 NumPy. Tolerance 5e-5 nats: the separate forward
    has another batch size, so XLA tiles the convolutions differently (float32 logits of
    magnitude ≤ 10 then differ by ~1e-6). batch_size=3 runs the padded last chunk too."""
    s = tiny3d
    key = jax.random.key(7)
    targets = np.array([-1, 0, 3, -1], np.int32)
    donors = donors_of(s.images)
    r = reliance(gated(s, "all"), s.images, s.masks, key=key, targets=targets, donors=donors, settings=ALL_FILLS,
                 batch_size=3)
    names = [f"{reg}/{f}" for reg in ALL_FILLS.regions for f in ALL_FILLS.fills]
    variants = []
    for i in range(4):
        cell_key = jax.random.fold_in(key, i)  # reliance's documented per-cell key
        keys = {n: audit._variant_key(cell_key, *n.split("/")) for n in names}
        out = _all_fills(s.images[i], s.masks[i], keys, donors[i], settings=ALL_FILLS.fill)
        variants += [out[n][0] for n in names]
    forward = jax.jit(lambda x: s.model.apply(s.variables, x, train=False))
    lp = _log_softmax64(forward(jnp.concatenate([jnp.asarray(s.images), jnp.stack(variants)])))
    lp0, lp = lp[:4], lp[4:].reshape(4, len(names), -1)  # (cell, variant, K)
    target = np.where(targets < 0, lp0.argmax(1), targets)
    np.testing.assert_array_equal(np.asarray(r.target), target)
    np.testing.assert_array_equal(np.asarray(r.predicted), lp0.argmax(1))
    np.testing.assert_allclose(np.asarray(r.logp0), lp0[np.arange(4), target], rtol=0, atol=5e-5)
    ref = lp0[np.arange(4), target][:, None] - lp[np.arange(4), :, target]
    np.testing.assert_allclose(np.asarray(r.drops), ref.reshape(4, 4, 4), rtol=0, atol=5e-5)
    assert np.abs(ref).max() > 0.01  # the comparison is not between zeros
    np.testing.assert_array_equal(np.asarray(r.changed), (lp.argmax(-1) != lp0.argmax(1)[:, None]).reshape(4, 4, 4))


def test_batch_equals_one_cell_at_a_time(tiny3d):
    """Per-cell keys make every cell's fills independent of the batch; BatchNorm in inference
    mode makes its logits so. Each cell alone goes through `model_reliance` (so the wrapper
    is checked against the plain model too). Not bit-identical: XLA tiles the convolutions
    of 13 crops differently from those of 39 (float32 drops differ by ~1e-6): atol 1e-5 nats."""
    s = tiny3d
    fn = gated(s, "all")
    keys = jax.random.split(jax.random.key(11), 4)
    donors = donors_of(s.images)
    batch = reliance(fn, s.images, s.masks, key=keys, donors=donors, settings=ALL_FILLS, batch_size=3)
    singles = [model_reliance(s.model, s.variables, s.images[i:i + 1], s.masks[i:i + 1], key=keys[i:i + 1],
                              donors=donors[i:i + 1], settings=ALL_FILLS) for i in range(4)]
    singles = jax.tree.map(lambda *a: jnp.concatenate(a), *singles)
    for name in ("target", "predicted", "empty", "changed", "cri_undefined"):
        np.testing.assert_array_equal(np.asarray(getattr(singles, name)), np.asarray(getattr(batch, name)), name)
    for name in ("logp0", "drops", "cri"):
        np.testing.assert_allclose(np.asarray(getattr(singles, name)), np.asarray(getattr(batch, name)),
                                   rtol=0, atol=1e-5, err_msg=name)
    assert np.abs(np.asarray(batch.drops)).max() > 0.01
    # Another order, another chunking (cells 3, 2, 1 then 0 padded): one shape, so bit-identical.
    reordered = reliance(fn, s.images[::-1], s.masks[::-1], key=keys[::-1], donors=donors[::-1],
                         settings=ALL_FILLS, batch_size=3)
    np.testing.assert_array_equal(np.asarray(reordered.drops)[::-1], np.asarray(batch.drops))


def _cell_mean_logits(images, masks):
    """A 'model' of 2 classes whose logit 0 is the mean of channel 0 over the central cell."""
    inside = (masks == 1).astype(images.dtype)
    a = jnp.sum(images[..., 0] * inside, axis=(1, 2)) / jnp.sum(inside, axis=(1, 2))
    return jnp.stack([a, jnp.zeros_like(a)], axis=-1)


def test_2d_crops_against_a_closed_form_model():
    """2D crops through the whole core with a model whose log-probability is known in closed
    form, log σ(mean of the cell): context drops are exactly 0; fills that keep the cell's
    mean (noise, mean) leave it to rounding (float32 sums of ~100 voxels: < 1e-5 nats);
    swap and blur give log σ(a) − log σ(a') with a' the replaced cell's mean."""
    rng = np.random.default_rng(1)
    images = rng.normal(0.5, 1.0, size=(3, 30, 26, 2)).astype(np.float32)
    masks = blob_masks(3, (30, 26), seed=1)
    donors = np.roll(images, 1, axis=0)
    settings = RelianceSettings(fills=("noise", "blur", "mean", "swap"), fill=FillSettings(blur_sigma=(2.0, 1.0)))
    r = reliance(_cell_mean_logits, images, masks, key=jax.random.key(0), targets=np.zeros(3, np.int32),
                 donors=donors, settings=settings)
    drops = np.asarray(r.drops, np.float64)
    for region in ("background", "neighbors", "context"):
        assert np.array_equal(drops[:, settings.regions.index(region)], np.zeros((3, 4))), region
    inside = masks == 1
    a = np.array([images[i, ..., 0][inside[i]].astype(np.float64).mean() for i in range(3)])
    blurred = ndimage.gaussian_filter(images[..., 0].astype(np.float64), (0, 2.0, 1.0), mode="reflect")
    a_swap = np.array([donors[i, ..., 0][inside[i]].astype(np.float64).mean() for i in range(3)])
    a_blur = np.array([blurred[i][inside[i]].mean() for i in range(3)])

    def log_sigmoid(z):
        return -np.logaddexp(0, -z)

    cell = drops[:, settings.regions.index("cell")]
    np.testing.assert_allclose(np.asarray(r.logp0), log_sigmoid(a), rtol=0, atol=1e-6)
    np.testing.assert_allclose(cell[:, [0, 2]], 0, atol=1e-5)
    np.testing.assert_allclose(cell[:, 1], log_sigmoid(a) - log_sigmoid(a_blur), rtol=0, atol=1e-5)
    np.testing.assert_allclose(cell[:, 3], log_sigmoid(a) - log_sigmoid(a_swap), rtol=0, atol=1e-5)
    assert np.abs(cell[:, 3]).min() > 1e-3


# ----------------------------------------------------------------------------- fill sanity


def test_fill_sanity(tiny3d):
    s = tiny3d
    key = jax.random.key(2)
    blind = fill_sanity(gated(s, "cell"), s.images, s.masks, 0, key=key, fill_settings=ALL_FILLS.fill)
    assert blind.n_cells == 4
    np.testing.assert_array_equal(blind.mean_abs_change, np.zeros(4))
    np.testing.assert_array_equal(blind.frac_changed, np.zeros(4))
    assert blind.too_strong() == ()

    plain = fill_sanity(gated(s, "all"), s.images, s.masks, 0, key=key, fill_settings=ALL_FILLS.fill)
    # The same counterfactuals by hand: context replaced, control class 0, cell i's donor i+1.
    ref = reliance(gated(s, "all"), s.images, s.masks, key=key, targets=np.zeros(4, np.int32),
                   donors=np.roll(s.images, -1, axis=0),
                   settings=RelianceSettings(regions=("context",), fills=audit.FILLS, fill=ALL_FILLS.fill,
                                             cri_fill=None))
    np.testing.assert_allclose(plain.mean_abs_change, np.abs(np.asarray(ref.drops, np.float64))[:, 0].mean(0))
    np.testing.assert_allclose(plain.frac_changed, np.asarray(ref.changed)[:, 0].mean(0))
    assert plain.mean_abs_change.min() > 0  # a random-weight model reacts to every fill
    assert set(plain.too_strong(max_abs_change=0.0, max_frac_changed=1.0)) == set(audit.FILLS)


# ----------------------------------------------------------------------------- randomisation


@pytest.fixture(scope="module")
def random_vars(tiny3d):
    """`randomized_variables` of the tiny3d architecture from key(0) and key(1), calibrated on
    the fixtures' calibration batch (tests/conftest.py Setup: data from fold_in(key(0), 1))."""
    calib = jax.random.normal(jax.random.fold_in(jax.random.key(0), 1), (8, 7, 24, 20, 3))
    return [randomized_variables(tiny3d.config, jax.random.key(k), calib) for k in (0, 1)]


def _same(a, b) -> bool:
    return jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))


def test_randomized_variables_are_init_plus_calibration_and_deterministic(tiny3d, random_vars):
    v0, v1 = random_vars
    # Same key, computed independently: the fixture was built with gradcamo_jax.init +
    # calibrate_batch_stats from key(0) on the same batch.
    assert _same(v0, tiny3d.variables)
    differ = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
                                          v0["params"], v1["params"]))
    # Biases and BatchNorm scales start at 0 / 1 whatever the key; every kernel differs.
    kernels = jax.tree.leaves(jax.tree.map(lambda a: a.ndim > 1, v0["params"]))
    assert sum(kernels) > 10 and all(d for d, k in zip(differ, kernels) if k)
    assert not _same(v0["batch_stats"], v1["batch_stats"])


def test_random_baseline(tiny3d, random_vars):
    s = tiny3d
    v0, v1 = random_vars
    rb = random_baseline(s.model, s.variables, s.images, s.masks, random_variables=v1, layer="stage3")
    trained = explain(s.model, s.variables, s.images, s.masks, layer="stage3")
    np.testing.assert_array_equal(np.asarray(rb.gradcamo), np.asarray(trained.scores.cell))
    np.testing.assert_array_equal(np.asarray(rb.target), np.asarray(trained.targets))
    # The random model explains the trained model's class, not its own prediction.
    rand = explain(s.model, v1, s.images, s.masks, layer="stage3", targets=trained.targets)
    np.testing.assert_array_equal(np.asarray(rb.gradcamo_random), np.asarray(rand.scores.cell))
    assert not np.allclose(np.asarray(rb.gradcamo_random), np.asarray(rb.gradcamo))
    g, r = np.asarray(rb.gradcamo, np.float64), np.asarray(rb.gradcamo_random, np.float64)
    np.testing.assert_allclose(np.asarray(rb.difference), g - r, rtol=1e-6)
    expect = np.where(g > r, (g - r) / (1 - r), (g - r) / r)
    np.testing.assert_allclose(np.asarray(rb.corrected), expect, rtol=1e-5, atol=1e-7)
    assert not np.asarray(rb.undefined).any()
    # Two draws: the per-cell mean. v0 is the trained model's own weights (both come from
    # key(0)), so its score is the trained one.
    two = random_baseline(s.model, s.variables, s.images, s.masks, random_variables=[v1, v0], layer="stage3")
    np.testing.assert_allclose(np.asarray(two.gradcamo_random), (g + r) / 2, rtol=1e-6)


def test_corrected_gradcamo_definition():
    g = jnp.asarray([0.6, 0.2, 0.3, 1.0, 0.0, 1.0, jnp.nan, 0.5])
    r = jnp.asarray([0.2, 0.4, 0.3, 0.5, 0.5, 1.0, 0.3, jnp.nan])
    c, undefined = corrected_gradcamo(g, r)
    np.testing.assert_allclose(np.asarray(c), [0.5, -0.5, 0.0, 1.0, -1.0, 0.0, np.nan, np.nan], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(undefined), [False] * 6 + [True, True])


# ----------------------------------------------------------------------------- interchange


def test_interchange_composites_take_each_voxel_from_one_crop():
    """Against the rule written out in NumPy: inside the union of the two central cells the
    context swap is the cell's crop and the cell swap the donor's, outside the reverse; masks
    follow their voxels. 3D, different masks, donor of another dtype (cast, not rounded)."""
    rng = np.random.default_rng(3)
    masks = blob_masks(2, (5, 18, 16), seed=4)
    image = rng.normal(size=(5, 18, 16, 2)).astype(np.float32)
    donor = rng.normal(size=(5, 18, 16, 2))  # float64
    ctx, ctx_m, cell, cell_m = jax.jit(audit.interchange_composites)(image, masks[0], donor, masks[1])
    union = (masks[0] == 1) | (masks[1] == 1)
    assert union.any() and (~union).any() and ((masks[0] == 1) != (masks[1] == 1)).any()
    d32 = donor.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(ctx), np.where(union[..., None], image, d32))
    np.testing.assert_array_equal(np.asarray(cell), np.where(union[..., None], d32, image))
    np.testing.assert_array_equal(np.asarray(ctx_m), np.where(union, masks[0], masks[1]))
    np.testing.assert_array_equal(np.asarray(cell_m), np.where(union, masks[1], masks[0]))
    assert np.asarray(ctx).dtype == np.float32
    # The context swap holds no voxel of the donor's own cell; the cell swap all of it.
    assert not ((np.asarray(ctx_m) == 1) & (masks[1] == 1) & (masks[0] != 1)).any()
    np.testing.assert_array_equal(np.asarray(cell)[masks[1] == 1], d32[masks[1] == 1])


def _region_logits(alpha: float, beta: float):
    """Two classes, ``logit_0 = α·mean(ch 0 over the cell) + β·mean(ch 0 over the background)``,
    ``logit_1 = 0``: a model whose reliance on cell and background is known in closed form."""

    def fn(images, masks):
        x = images[..., 0]
        axes = tuple(range(1, x.ndim))

        def mean(code):
            w = (masks == code).astype(x.dtype)
            return jnp.sum(x * w, axis=axes) / jnp.sum(w, axis=axes)

        z = alpha * mean(1) + beta * mean(0)
        return jnp.stack([z, jnp.zeros_like(z)], axis=-1)

    return fn


def _two_class_plate():
    """4 crops 2D (30, 26, 2): crops 0, 1 have cell +2 and background +1 in channel 0, crops 2, 3
    cell −2 and background −1 (noise on top); donors of crop i: crops i+2 (another class) and
    i+1 (mod 4), with the cell's own mask so the swaps exchange exactly one region."""
    rng = np.random.default_rng(5)
    masks = blob_masks(4, (30, 26), seed=6)
    sign = np.array([1, 1, -1, -1], np.float32)
    images = rng.normal(0, 0.3, size=(4, 30, 26, 2)).astype(np.float32)
    images[..., 0] += np.where(masks == 1, 2.0, np.where(masks == 0, 1.0, 0.0)) * sign[:, None, None]
    order = np.stack([(np.arange(4) + 2) % 4, (np.arange(4) + 1) % 4], axis=1)
    return images, masks, order


def test_interchange_closed_form_models():
    """A cell-only model follows the cell (follow_cell 1, follow_context 0, index 0); a
    background-only one the context (1, 0, index 1); a model of both, as far as its weights
    say (float64 reference of the linear model). Donors of the cell's own class are left out."""
    images, masks, order = _two_class_plate()
    donors, same_masks = images[order], np.repeat(masks[:, None], 2, axis=1)
    for alpha, beta in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.5)):
        r = audit.interchange(_region_logits(alpha, beta), images, masks, donors, same_masks)
        np.testing.assert_array_equal(np.asarray(r.predicted), [0, 0, 1, 1])
        np.testing.assert_array_equal(np.asarray(r.valid), [[True, False], [True, True], [True, False], [True, True]])
        x = images[..., 0].astype(np.float64)
        cell = np.array([x[i][masks[i] == 1].mean() for i in range(4)])
        bg = np.array([x[i][masks[i] == 0].mean() for i in range(4)])
        # Same masks, so the swaps exchange the region means exactly; m = ±(logit_1 − logit_0).
        # The donors carry the cell's mask (`same_masks`), so their means are over it too.
        cell_d = np.array([[x[j][masks[i] == 1].mean() for j in order[i]] for i in range(4)])
        bg_d = np.array([[x[j][masks[i] == 0].mean() for j in order[i]] for i in range(4)])
        z, z_d = alpha * cell + beta * bg, alpha * cell_d + beta * bg_d
        sign = np.where(np.asarray(r.predicted) == 0, 1.0, -1.0)[:, None]  # m = logit_b − logit_a = −sign·Δz
        span = -sign * (z_d - z[:, None])
        shift_ctx = -sign * beta * (bg_d - bg[:, None])
        shift_cell = -sign * alpha * (cell_d - cell[:, None])
        valid = np.asarray(r.valid)
        for name, ref in (("span", span), ("shift_context", shift_ctx), ("shift_cell", shift_cell)):
            np.testing.assert_allclose(np.asarray(getattr(r, name))[valid], ref[valid], rtol=1e-5, atol=1e-5, err_msg=name)
        fc = (shift_ctx * valid).sum(1) / (span * valid).sum(1)
        fk = (shift_cell * valid).sum(1) / (span * valid).sum(1)
        np.testing.assert_allclose(np.asarray(r.follow_context), fc, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(r.follow_cell), fk, rtol=1e-5, atol=1e-6)
        if beta == 0:
            np.testing.assert_array_equal(np.asarray(r.shift_context), 0.0)
            np.testing.assert_array_equal(np.asarray(r.index), 0.0)
            np.testing.assert_allclose(np.asarray(r.follow_cell), 1.0, rtol=1e-6)
        if alpha == 0:
            np.testing.assert_array_equal(np.asarray(r.shift_cell), 0.0)
            np.testing.assert_array_equal(np.asarray(r.index), 1.0)
            np.testing.assert_allclose(np.asarray(r.follow_context), 1.0, rtol=1e-6)
        if alpha and beta:
            assert np.all((np.asarray(r.index) > 0.2) & (np.asarray(r.index) < 0.8))
    # Only donors of the cell's own class: nothing to follow, NaN, flagged.
    r = audit.interchange(_region_logits(1.0, 0.0), images, masks, images[[1, 0, 3, 2]][:, None], masks[:, None])
    assert not np.asarray(r.valid).any()
    assert np.isnan(np.asarray(r.follow_context)).all() and np.isnan(np.asarray(r.index)).all()
    assert np.asarray(r.undefined).all()


def test_interchange_index_definition():
    fc = jnp.asarray([0.0, 1.0, 0.3, 0.0, -0.2, 1.4, 5e-4, jnp.nan])
    fk = jnp.asarray([1.0, 0.0, 0.3, 0.0, 0.5, 0.6, 2e-4, 0.5])
    index, undefined = audit.interchange_index(fc, fk, eps=1e-3)
    np.testing.assert_array_equal(np.asarray(undefined), [False, False, False, True, False, False, True, True])
    np.testing.assert_allclose(np.asarray(index), [0.0, 1.0, 0.5, np.nan, 0.0, 1 / 1.6, np.nan, np.nan], rtol=1e-6)


def test_interchange_of_a_model_that_ignores_context(tiny3d):
    """An EfficientNet gated to the central cell: with donors of other masks, the context swap
    moves nothing (exactly 0: the gated input is the original's bit for bit), so every
    defined index is 0. And a batch equals one cell at a time (atol: another batch size
    tiles the convolutions differently)."""
    s = tiny3d
    order = np.stack([(np.arange(4) + 1) % 4, (np.arange(4) + 2) % 4, (np.arange(4) + 3) % 4], axis=1)
    donors, donor_masks = s.images[order], s.masks[order]
    r = audit.interchange(gated(s, "cell"), s.images, s.masks, donors, donor_masks, batch_size=3)
    assert np.asarray(r.valid).any()
    np.testing.assert_array_equal(np.asarray(r.shift_context), 0.0)
    assert np.abs(np.asarray(r.shift_cell)).max() > 1e-3
    defined = ~np.asarray(r.undefined)
    assert defined.any()
    np.testing.assert_array_equal(np.asarray(r.index)[defined], 0.0)
    full = audit.interchange(gated(s, "all"), s.images, s.masks, donors, donor_masks, batch_size=3)
    singles = [audit.model_interchange(s.model, s.variables, s.images[i:i + 1], s.masks[i:i + 1], donors[i:i + 1],
                                       donor_masks[i:i + 1]) for i in range(4)]
    singles = jax.tree.map(lambda *a: jnp.concatenate(a), *singles)
    for name in ("predicted", "donor_predicted", "valid"):
        np.testing.assert_array_equal(np.asarray(getattr(singles, name)), np.asarray(getattr(full, name)), name)
    for name in ("span", "shift_context", "shift_cell", "follow_context", "follow_cell"):
        np.testing.assert_allclose(np.asarray(getattr(singles, name)), np.asarray(getattr(full, name)),
                                   rtol=1e-4, atol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="donor_masks have shape"):
        audit.interchange(gated(s, "all"), s.images, s.masks, donors, donor_masks[:, :2])
