"""Sphering (whitening) of single-cell profiles, fitted on control cells.

Batch effects in image-based profiling are largely a per-plate shift and a
covariance distortion shared by all wells of the plate; controls see the same
distortion without any treatment, so a whitening transform fitted on controls
removes it (Ando et al. 2017; the Grad-CAMO paper, §4). For controls with mean
``μ`` and covariance ``Σ = U diag(λ) Uᵀ`` (``ddof = 1``)::

    PCA:  y = (x - μ) U_r diag(1 / sqrt(λ_r + ε))          (r columns, "PC1" …)
    ZCA:  y = (x - μ) U_r diag(1 / sqrt(λ_r + ε)) U_rᵀ      (the original feature columns)

``r`` keeps the directions the controls actually span (``λ > rank_rtol · λ_max``):
with fewer controls than features the remaining eigenvalues are 0 up to round-off and
whitening them would multiply noise by ~1e8. ``ε`` is added to every kept eigenvalue,
so ``ε = 0`` gives controls an exact identity covariance (and PCA equal to
scikit-learn's ``PCA(whiten=True)`` up to the sign of each component), and a larger
``ε`` shrinks low-variance directions instead of amplifying them. The "-cor" variants
first divide each feature by its control standard deviation (whitening the correlation
matrix). ``μ`` is subtracted from every cell, treated or not, before the rotation: the
centring that pycytominer's Spherize once got wrong (its issue #747).

pycytominer ≥ 1.7.1 (``normalize(method="spherize", spherize_method="ZCA-cor")``, fitted on
the same controls) computes the same ZCA-cor transform at ``ε = 0`` (tests/test_pycytominer.py).
Two conventions differ. Its ``ε`` is added to the singular values ``s`` of the standardised
control matrix (scale ``√(n−1)/(s + ε)``), ours to the eigenvalues (``1/√(λ + ε)``), so an
equal non-zero ``ε`` shrinks the direction of eigenvalue ``λ`` by ≈ ``ε/√(nλ)`` there and by
≈ ``ε/(2λ)`` here. With fewer controls than features it whitens the directions the controls
do not span by the smallest non-zero singular value, where ``r`` drops them: there only the
controls' outputs agree.

Features that are (near) constant over the controls (standard deviation ≤ ``min_std``
times the largest one, or non-finite) cannot be whitened and are dropped first; the
fitted `Sphering` records which.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

Method = Literal["ZCA", "PCA", "ZCA-cor", "PCA-cor"]
_METHODS = ("ZCA", "PCA", "ZCA-cor", "PCA-cor")


@dataclasses.dataclass(frozen=True)
class SpherizeConfig:
    """How profiles are sphered.

    Attributes:
      method: "ZCA" (keeps feature names), "PCA" (principal components), or their "-cor"
        versions (features standardised by the controls' standard deviation first).
      epsilon: added to each covariance eigenvalue before the inverse square root; 0 = exact
        whitening of the controls, larger = regularised (see the module docstring).
      control_query: a `pandas.DataFrame.query` string selecting the control cells, e.g.
        ``"Metadata_Treatment == 'DMSO'"`` or ``"Metadata_Dose == 0"``.
      by: fit one transform per value of these columns (e.g. ``("Metadata_Plate",)``), or
        ``()`` for one global transform.
      min_std: features whose control standard deviation is ≤ ``min_std · max std`` are dropped.
      rank_rtol: eigen-directions with ``λ ≤ rank_rtol · λ_max`` are discarded.
    """

    method: Method = "ZCA"
    epsilon: float = 1e-6
    control_query: str = "Metadata_Dose == 0"
    by: tuple[str, ...] = ("Metadata_Plate",)
    min_std: float = 1e-6
    rank_rtol: float = 1e-9

    def __post_init__(self):
        if self.method not in _METHODS:
            raise ValueError(f"SpherizeConfig.method={self.method!r}; expected one of {_METHODS}")
        if self.epsilon < 0:
            raise ValueError(f"SpherizeConfig.epsilon={self.epsilon}; expected >= 0")


@dataclasses.dataclass(frozen=True)
class Sphering:
    """A fitted sphering transform.

    Attributes:
      method: as in `SpherizeConfig`.
      keep: ``(F,)`` bool, input features kept (not constant over the controls).
      mean: ``(F_kept,)`` control mean.
      scale: ``(F_kept,)`` control standard deviation for "-cor" methods, else ones.
      components: ``(F_kept, r)`` eigenvectors of the (scaled) control covariance, by
        decreasing eigenvalue.
      eigenvalues: ``(r,)`` the matching eigenvalues (ddof = 1).
      epsilon: as fitted.
      n_controls: number of control cells it was fitted on.
    """

    method: str
    keep: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    epsilon: float
    n_controls: int

    @property
    def output_dim(self) -> int:
        return int(self.keep.sum()) if self.method.startswith("ZCA") else int(self.components.shape[1])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Sphere profiles ``x`` ``(N, F)`` (all input features) → ``(N, output_dim)`` float64."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.keep.size:
            raise ValueError(f"profiles have shape {x.shape}; expected (N, {self.keep.size}) as fitted")
        z = (x[:, self.keep] - self.mean) / self.scale
        y = z @ (self.components / np.sqrt(self.eigenvalues + self.epsilon))
        if self.method.startswith("ZCA"):
            y = y @ self.components.T
        return y


def fit_sphering(
    controls: np.ndarray,
    method: Method = "ZCA",
    epsilon: float = 1e-6,
    *,
    min_std: float = 1e-6,
    rank_rtol: float = 1e-9,
) -> Sphering:
    """Fit a sphering transform on control profiles ``(N_controls, F)`` (float64 arithmetic).

    Raises ValueError when fewer than 2 controls are given, or no feature varies.
    """
    if method not in _METHODS:
        raise ValueError(f"method={method!r}; expected one of {_METHODS}")
    x = np.asarray(controls, np.float64)
    if x.ndim != 2:
        raise ValueError(f"controls have shape {x.shape}; expected (N_controls, F)")
    if x.shape[0] < 2:
        raise ValueError(
            f"{x.shape[0]} control cell(s); sphering needs at least 2 (and ideally more than the "
            f"{x.shape[1]} features). Check the control query"
        )
    finite = np.isfinite(x).all(axis=0)
    std = np.where(finite, np.nan_to_num(x).std(axis=0, ddof=1), 0.0)
    keep = finite & (std > min_std * max(std.max(), 1e-300))
    if not keep.any():
        raise ValueError(f"no feature varies over the {x.shape[0]} controls; cannot sphere")
    xk = x[:, keep]
    mean = xk.mean(axis=0)
    scale = std[keep] if method.endswith("-cor") else np.ones(int(keep.sum()))
    z = (xk - mean) / scale
    # SVD of the centred data, not eigh of its covariance: squaring the condition number
    # would lose the small eigenvalues' digits.
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    lam = s**2 / (x.shape[0] - 1)
    r = int(np.sum(lam > rank_rtol * lam[0]))
    comps = vt[:r].T
    # A deterministic sign per component (largest-magnitude loading positive), as scikit-learn does.
    signs = np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(r)])
    return Sphering(
        method=method,
        keep=keep,
        mean=mean,
        scale=scale,
        components=comps * signs,
        eigenvalues=lam[:r],
        epsilon=float(epsilon),
        n_controls=int(x.shape[0]),
    )


def feature_columns(df, prefix_exclude: str = "Metadata_") -> list[str]:
    """Numeric columns that are not metadata (pycytominer's convention)."""
    return [c for c in df.columns if not c.startswith(prefix_exclude) and np.issubdtype(df[c].dtype, np.number)]


def spherize(df, config: SpherizeConfig = SpherizeConfig(), features: Sequence[str] | None = None):
    """Sphere the feature columns of a profile table, per group of `config.by`.

    Args:
      df: pandas DataFrame, one row per cell, ``Metadata_*`` columns plus numeric features.
      config: `SpherizeConfig`.
      features: feature columns (default: every numeric non-``Metadata_`` column).

    Returns:
      A new DataFrame with the same rows in the same order: every ``Metadata_*`` column,
      then the sphered features (the kept feature names for ZCA, ``PC1 …`` for PCA). With
      per-group PCA the number of components can differ between groups; missing ones are NaN.
    """
    import pandas as pd

    features = list(features) if features is not None else feature_columns(df)
    if not features:
        raise ValueError("no feature columns to sphere (numeric columns not starting with 'Metadata_')")
    meta = [c for c in df.columns if c.startswith("Metadata_")]
    try:
        is_control = df.eval(config.control_query)
    except Exception as e:  # pandas raises many types for a bad query
        raise ValueError(f"control_query {config.control_query!r} failed on the profiles: {e}") from e
    is_control = np.asarray(is_control, bool)
    groups = [((), np.arange(len(df)))] if not config.by else [
        (key, idx) for key, idx in df.groupby(list(config.by), sort=True).indices.items()
    ]
    x = df[features].to_numpy(np.float64)
    pieces = []
    for key, idx in groups:
        ctrl = idx[is_control[idx]]
        if len(ctrl) < 2:
            raise ValueError(
                f"group {dict(zip(config.by, np.atleast_1d(key)))} has {len(ctrl)} control cell(s) matching "
                f"{config.control_query!r}; need >= 2. Fit globally (by=()) or fix the query"
            )
        sph = fit_sphering(x[ctrl], config.method, config.epsilon, min_std=config.min_std, rank_rtol=config.rank_rtol)
        y = sph.transform(x[idx])
        if config.method.startswith("ZCA"):
            cols = [f for f, k in zip(features, sph.keep) if k]
        else:
            cols = [f"PC{i + 1}" for i in range(y.shape[1])]
        pieces.append(pd.DataFrame(y, index=idx, columns=cols))
    # Positional index while assembling: the caller's index may have duplicates.
    out = pd.concat(pieces).sort_index()
    out.index = df.index
    return pd.concat([df[meta], out], axis=1)


__all__ = ["Sphering", "SpherizeConfig", "feature_columns", "fit_sphering", "spherize"]
