"""Grad-CAMO against a plain NumPy computation, and its edge cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gradcamo_jax import gradcamo, summarize
from gradcamo_jax.metric import SCORE_COLUMNS


def numpy_reference(cam: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Loop-per-cell float64 reference, written from the paper's definition."""
    out = {k: [] for k in ("cell", "neighbors", "background", "chance")}
    for c, m in zip(cam.astype(np.float64), mask):
        total = c.sum()
        for key, code in (("cell", 1), ("neighbors", 2), ("background", 0)):
            out[key].append(c[m == code].sum() / total if total > 0 else np.nan)
        out["chance"].append((m == 1).mean())
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("spatial", [(5, 9, 7), (11, 13)])
def test_matches_numpy_reference_including_edge_cases(spatial):
    rng = np.random.default_rng(0)
    n = 9
    cam = rng.gamma(0.5, size=(n, *spatial)).astype(np.float32)
    cam[rng.random(cam.shape) < 0.3] = 0  # ReLU'd maps have exact zeros
    mask = rng.integers(0, 3, size=(n, *spatial)).astype(np.uint8)
    mask[0] = 0  # empty central mask: score 0, chance 0
    cam[1] = 0  # zero map: undefined
    mask[2] = 1  # all inside: score 1
    mask[3] = 2  # all on neighbours: score 0
    cam[4] = 0
    cam[4].flat[7] = 3.0  # one hot voxel
    mask[4].flat[7] = 1
    res = gradcamo(cam, mask)
    ref = numpy_reference(cam, mask)
    for key in ref:
        np.testing.assert_allclose(np.asarray(getattr(res, key)), ref[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert res.cell[0] == 0 and res.chance[0] == 0
    assert np.isnan(res.cell[1]) and np.isnan(res.neighbors[1]) and np.isnan(res.background[1])
    assert bool(res.cam_zero[1]) and not bool(np.asarray(res.cam_zero)[np.arange(n) != 1].any())
    assert res.cell[2] == pytest.approx(1.0) and res.chance[2] == 1.0
    assert res.cell[3] == 0 and res.neighbors[3] == pytest.approx(1.0)
    assert res.cell[4] == pytest.approx(1.0)
    defined = ~np.asarray(res.cam_zero)
    total = np.asarray(res.cell + res.neighbors + res.background)[defined]
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)


def test_scale_invariant_but_not_shift_invariant():
    """Why we never min-max normalise: a positive scale keeps the score, a shift does not."""
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 3, size=(4, 6, 8, 8)).astype(np.uint8)
    # A diffuse floor plus a focus on the cell, as Grad-CAM maps often look.
    cam = (0.5 + rng.random(mask.shape) + 3.0 * (mask == 1)).astype(np.float32)
    base = np.asarray(gradcamo(cam, mask).cell)
    np.testing.assert_allclose(np.asarray(gradcamo(cam * 37.5, mask).cell), base, rtol=1e-5)
    lo = cam.min(axis=(1, 2, 3), keepdims=True)
    hi = cam.max(axis=(1, 2, 3), keepdims=True)
    minmax = (cam - lo) / (hi - lo)
    assert np.abs(np.asarray(gradcamo(minmax, mask).cell) - base).max() > 1e-3


def test_uniform_map_scores_chance():
    mask = np.random.default_rng(2).integers(0, 3, size=(3, 5, 7, 9)).astype(np.uint8)
    res = gradcamo(np.ones(mask.shape, np.float32), mask)
    np.testing.assert_allclose(np.asarray(res.cell), np.asarray(res.chance), rtol=1e-6)


def test_accepts_jax_arrays():
    import jax.numpy as jnp

    mask = np.zeros((2, 4, 4), np.uint8)
    mask[:, :2] = 1
    res = gradcamo(jnp.ones((2, 4, 4)), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(res.cell), 0.5)


@pytest.mark.parametrize(
    "cam_shape, mask_shape, fill, code, match",
    [
        ((2, 4, 4), (2, 4, 5), 1.0, 0, "cam shape"),
        ((2, 4, 4), (2, 4, 4), -1.0, 0, "negative"),
        ((2, 4, 4), (2, 4, 4), np.nan, 0, "non-finite"),
        ((2, 4, 4), (2, 4, 4), 1.0, 7, "codes"),
        ((4,), (4,), 1.0, 0, "leading cell axis"),
    ],
)
def test_bad_input_raises(cam_shape, mask_shape, fill, code, match):
    cam = np.full(cam_shape, fill, np.float32)
    mask = np.full(mask_shape, code, np.uint8)
    with pytest.raises(ValueError, match=match):
        gradcamo(cam, mask)


def test_summarize_by_group_matches_pandas():
    rng = np.random.default_rng(3)
    n = 200
    cell = rng.random(n)
    cell[:7] = np.nan
    chance = rng.uniform(0.05, 0.2, n)
    neigh = (1 - np.nan_to_num(cell)) * 0.3
    df = pd.DataFrame(
        {
            "Metadata_Dose": rng.choice([0.0, 0.06, 8.0], n),
            SCORE_COLUMNS["cell"]: cell,
            SCORE_COLUMNS["chance"]: chance,
            SCORE_COLUMNS["neighbors"]: neigh,
            SCORE_COLUMNS["background"]: 1 - np.nan_to_num(cell) - neigh,
        }
    )
    out = summarize(df, by="Metadata_Dose")
    assert list(out.index) == [0.0, 0.06, 8.0]
    for dose, g in df.groupby("Metadata_Dose"):
        s = g[SCORE_COLUMNS["cell"]]
        row = out.loc[dose]
        assert row["n_cells"] == len(g)
        assert row["n_undefined"] == s.isna().sum()
        assert row["mean"] == pytest.approx(np.nanmean(s))
        assert row["median"] == pytest.approx(np.nanmedian(s))
        assert row["frac_above"] == pytest.approx(np.mean(s.dropna() > 0.5))
        assert row["lift"] == pytest.approx(np.nanmean(s) / g[SCORE_COLUMNS["chance"]].mean())
    overall = summarize(df)
    assert overall["n_cells"].iloc[0] == n
