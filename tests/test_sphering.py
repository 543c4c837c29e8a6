"""Sphering against scikit-learn's PCA whitening and the identity covariance of whitened controls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA

from gradcamo_jax.sphering import SpherizeConfig, fit_sphering, spherize


def correlated(n, f, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(f, f)) * np.linspace(3, 0.2, f)
    return rng.normal(size=(n, f)) @ mix + shift + rng.normal(size=f) * 5


def test_pca_whitening_equals_sklearn_up_to_sign():
    ctrl = correlated(300, 8)
    other = correlated(50, 8, seed=1, shift=2.0)
    sph = fit_sphering(ctrl, "PCA", epsilon=0.0)
    ref = PCA(whiten=True, svd_solver="full").fit(ctrl)
    got, want = sph.transform(other), ref.transform(other)
    signs = np.sign(np.sum(got * want, axis=0))
    np.testing.assert_allclose(got * signs, want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sph.eigenvalues, ref.explained_variance_, rtol=1e-10)


@pytest.mark.parametrize("method", ["ZCA", "PCA", "ZCA-cor", "PCA-cor"])
def test_whitened_controls_have_identity_covariance_and_zero_mean(method):
    ctrl = correlated(400, 6, seed=2)
    y = fit_sphering(ctrl, method, epsilon=0.0).transform(ctrl)
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-10)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(y.shape[1]), atol=1e-9)


def test_zca_is_the_symmetric_whitening_closest_to_the_data():
    """ZCA's matrix is Σ^{-1/2}, symmetric: computed independently with scipy's sqrtm."""
    from scipy.linalg import inv, sqrtm

    ctrl = correlated(500, 5, seed=3)
    sph = fit_sphering(ctrl, "ZCA", epsilon=0.0)
    w = np.real(inv(sqrtm(np.cov(ctrl, rowvar=False))))
    x = correlated(20, 5, seed=4)
    np.testing.assert_allclose(sph.transform(x), (x - ctrl.mean(axis=0)) @ w, rtol=1e-8, atol=1e-8)


def test_treated_cells_are_centred_on_the_control_mean():
    """pycytominer #747: every cell is centred by the *control* mean, so a treatment shift survives."""
    ctrl = correlated(300, 4, seed=5)
    treated = ctrl + np.array([3.0, 0, 0, 0])
    sph = fit_sphering(ctrl, "ZCA", 0.0)
    shift = sph.transform(treated).mean(axis=0) - sph.transform(ctrl).mean(axis=0)
    assert np.linalg.norm(shift) > 0.5
    np.testing.assert_allclose(sph.transform(ctrl).mean(axis=0), 0, atol=1e-10)


def test_epsilon_shrinks_low_variance_directions():
    ctrl = correlated(300, 6, seed=6)
    y0 = fit_sphering(ctrl, "PCA", 0.0).transform(ctrl)
    sph = fit_sphering(ctrl, "PCA", 1.0)
    y1 = sph.transform(ctrl)
    want = sph.eigenvalues / (sph.eigenvalues + 1.0)  # variance of component i after whitening with ε
    np.testing.assert_allclose(y1.var(axis=0, ddof=1), want, rtol=1e-9)
    assert np.all(y1.var(axis=0, ddof=1) < y0.var(axis=0, ddof=1))


def test_constant_features_dropped_and_rank_deficient_controls_handled():
    rng = np.random.default_rng(7)
    ctrl = rng.normal(size=(5, 10))
    ctrl[:, 3] = 2.5  # constant
    sph = fit_sphering(ctrl, "ZCA", 0.0)
    assert not sph.keep[3] and sph.keep.sum() == 9
    assert sph.components.shape[1] == 4  # 5 controls span 4 directions
    y = sph.transform(ctrl)
    assert np.isfinite(y).all() and np.abs(y).max() < 10


def test_bad_input_errors():
    with pytest.raises(ValueError, match="at least 2"):
        fit_sphering(np.ones((1, 3)))
    with pytest.raises(ValueError, match="no feature varies"):
        fit_sphering(np.ones((5, 3)))
    with pytest.raises(ValueError, match="method="):
        fit_sphering(np.ones((5, 3)), "LDA")
    sph = fit_sphering(np.random.default_rng(0).normal(size=(10, 3)))
    with pytest.raises(ValueError, match=r"expected \(N, 3\)"):
        sph.transform(np.ones((2, 4)))


def table(seed=0):
    rows = []
    for plate in ("P1", "P2"):
        for dose in (0.0, 0.0, 1.6, 8.0):
            for _ in range(40):
                rows.append({"Metadata_Plate": plate, "Metadata_Dose": dose})
    df = pd.DataFrame(rows)
    shift = df["Metadata_Plate"].map({"P1": 0.0, "P2": 4.0}).to_numpy()[:, None]  # a plate effect
    feats = correlated(len(df), 5, seed=seed) + shift
    for i in range(5):
        df[f"f{i}"] = feats[:, i]
    return df


def test_spherize_per_plate_removes_the_plate_shift():
    df = table()
    out = spherize(df, SpherizeConfig("ZCA", 0.0, "Metadata_Dose == 0", ("Metadata_Plate",)))
    assert list(out.columns) == ["Metadata_Plate", "Metadata_Dose", "f0", "f1", "f2", "f3", "f4"]
    assert out.index.equals(df.index)
    for _, g in out[out.Metadata_Dose == 0].groupby("Metadata_Plate"):
        np.testing.assert_allclose(g[[f"f{i}" for i in range(5)]].mean(), 0, atol=1e-9)
    # the same as fitting each plate by hand
    p2 = df.Metadata_Plate == "P2"
    sph = fit_sphering(df.loc[p2 & (df.Metadata_Dose == 0), [f"f{i}" for i in range(5)]].to_numpy(), "ZCA", 0.0)
    np.testing.assert_allclose(out.loc[p2, [f"f{i}" for i in range(5)]], sph.transform(df.loc[p2, [f"f{i}" for i in range(5)]]))


def test_spherize_pca_names_and_missing_controls_error():
    df = table()
    out = spherize(df, SpherizeConfig("PCA", 0.0, "Metadata_Dose == 0", ()))
    assert [c for c in out.columns if not c.startswith("Metadata_")] == [f"PC{i}" for i in range(1, 6)]
    with pytest.raises(ValueError, match="control cell"):
        spherize(df, SpherizeConfig(control_query="Metadata_Dose == 99"))
    with pytest.raises(ValueError, match="control_query"):
        spherize(df, SpherizeConfig(control_query="Metadata_Nope == 1"))
