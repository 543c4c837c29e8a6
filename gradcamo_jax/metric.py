"""The Grad-CAMO score: the fraction of a CAM's attention on the cell of interest.

For one cell with a non-negative map ``L`` and crop mask ``M`` (codes 0 =
background, 1 = the central cell, 2 = any other cell)::

    cell       = Σ_v L(v)·[M(v)=1] / Σ_v L(v)       (Grad-CAMO, Gopalakrishnan et al. 2024)
    neighbors  = Σ_v L(v)·[M(v)=2] / Σ_v L(v)
    background = Σ_v L(v)·[M(v)=0] / Σ_v L(v)
    chance     = Σ_v [M(v)=1] / |V|                 (the score of a uniform map)

``cell + neighbors + background = 1``. The ratio is invariant to a positive scale
of ``L``, so no min-max normalisation is applied (it would change the score).
``Σ L = 0`` gives NaN scores and ``cam_zero = True``, never a made-up number.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# The crop store's mask codes, under the names of the attention split.
from gradcamo_jax.data.formats import MASK_BACKGROUND as BACKGROUND
from gradcamo_jax.data.formats import MASK_CENTRAL as CENTRAL
from gradcamo_jax.data.formats import MASK_OTHER as NEIGHBOR


@struct.dataclass
class GradCAMOResult:
    """Per-cell attention split; every field has shape ``(N,)``.

    Attributes:
      cell: Grad-CAMO, the fraction of the map on the central cell (NaN if the map sums to 0).
      neighbors: fraction on other cells in the crop (mask code 2).
      background: fraction on background (mask code 0).
      chance: volume fraction of the central cell, the score of a uniform map.
      cam_sum: Σ of the map (0 ⇒ undefined score).
      cam_zero: True where the map sums to 0 (or is not finite) and the scores are NaN.
    """

    cell: jax.Array
    neighbors: jax.Array
    background: jax.Array
    chance: jax.Array
    cam_sum: jax.Array
    cam_zero: jax.Array

    def __len__(self) -> int:
        return int(self.cell.shape[0])


def scores(cam: jax.Array, mask: jax.Array) -> GradCAMOResult:
    """Traceable core of `gradcamo` (no host-side checks; use inside `jit`).

    cam: ``(N, *S)`` non-negative maps; mask: ``(N, *S)`` integer codes 0/1/2.
    """
    axes = tuple(range(1, cam.ndim))
    # Sums in float32 at least: bf16 maps of ~3e5 voxels would lose the ratio's digits.
    acc = jnp.promote_types(cam.dtype, jnp.float32)
    cam = cam.astype(acc)
    total = jnp.sum(cam, axis=axes)
    inside = jnp.sum(jnp.where(mask == CENTRAL, cam, 0), axis=axes)
    neigh = jnp.sum(jnp.where(mask == NEIGHBOR, cam, 0), axis=axes)
    back = jnp.sum(jnp.where(mask == BACKGROUND, cam, 0), axis=axes)
    chance = jnp.mean((mask == CENTRAL).astype(acc), axis=axes)
    zero = ~(total > 0) | ~jnp.isfinite(total)
    safe = jnp.where(zero, 1, total)
    nan = jnp.asarray(jnp.nan, acc)
    return GradCAMOResult(
        cell=jnp.where(zero, nan, inside / safe),
        neighbors=jnp.where(zero, nan, neigh / safe),
        background=jnp.where(zero, nan, back / safe),
        chance=chance,
        cam_sum=total,
        cam_zero=zero,
    )


def check_cam_and_mask(cam, mask) -> None:
    """ValueError unless cam and mask are ``(N, *S)`` of equal shape, with mask codes in {0, 1, 2}
    and a finite, non-negative map. Value checks run on the host."""
    if cam.shape != mask.shape:
        raise ValueError(
            f"cam shape {tuple(cam.shape)} != mask shape {tuple(mask.shape)}; expected both (N, [Z,] Y, X). "
            "Upsample the CAM to the crop (gradcamo_jax.cam.upsample) before scoring"
        )
    if cam.ndim < 2:
        raise ValueError(f"cam has shape {tuple(cam.shape)}; expected (N, [Z,] Y, X) with a leading cell axis")
    m = np.asarray(mask)
    bad = ~np.isin(m, (BACKGROUND, CENTRAL, NEIGHBOR))
    if bad.any():
        cell = int(np.argwhere(bad)[0][0])
        raise ValueError(
            f"mask of cell {cell} holds codes {sorted(set(np.unique(m[cell]).tolist()) - {0, 1, 2})}; "
            "expected 0 = background, 1 = central cell, 2 = other cells"
        )
    c = np.asarray(cam)
    if not np.all(np.isfinite(c)):
        cell = int(np.argwhere(~np.isfinite(c).reshape(len(c), -1).all(axis=1))[0][0])
        raise ValueError(f"cam of cell {cell} has non-finite values")
    if (c < 0).any():
        cell = int(np.argwhere((c < 0).reshape(len(c), -1).any(axis=1))[0][0])
        raise ValueError(
            f"cam of cell {cell} has negative values (min {c[cell].min():.3g}); Grad-CAMO needs a "
            "non-negative map (apply the ReLU of Grad-CAM, not a min-max normalisation)"
        )


_scores_jit = jax.jit(scores)


def gradcamo(cam, mask, *, check: bool = True) -> GradCAMOResult:
    """Grad-CAMO of each cell with its attention split and chance level.

    Args:
      cam: ``(N, [Z,] Y, X)`` non-negative maps at crop resolution (NumPy or JAX).
      mask: ``(N, [Z,] Y, X)`` integer codes: 0 background, 1 central cell, 2 other cells.
      check: validate shapes, codes and values on the host first (one device sync).

    Returns:
      `GradCAMOResult`; ``.cell`` is the ``(N,)`` Grad-CAMO. Cells whose map sums to 0
      get NaN scores and ``cam_zero = True``.
    """
    if check:
        check_cam_and_mask(cam, mask)
    return _scores_jit(jnp.asarray(cam), jnp.asarray(mask))


SCORE_COLUMNS = {
    "cell": "Metadata_GradCAMO",
    "neighbors": "Metadata_GradCAMO_Neighbors",
    "background": "Metadata_GradCAMO_Background",
    "chance": "Metadata_GradCAMO_Chance",
}


def summarize(table, by: str | Sequence[str] | None = None, threshold: float = 0.5):
    """Dataset aggregates of per-cell Grad-CAMO, overall or by grouping columns.

    Args:
      table: a pandas DataFrame with the profile columns of `SCORE_COLUMNS`.
      by: column name(s) to group by (e.g. "Metadata_Dose", ["Metadata_Plate", "Metadata_Site"]).
      threshold: cells with Grad-CAMO above it count as "on cell".

    Returns:
      DataFrame, one row per group: ``n_cells``, ``n_undefined`` (NaN scores, map sum 0),
      ``mean``, ``median``, ``std``, ``frac_above`` (of defined scores), ``mean_chance``,
      ``mean_neighbors``, ``mean_background``, and ``lift`` = mean / mean_chance.
    """
    import pandas as pd

    col = SCORE_COLUMNS["cell"]

    def agg(df):
        s = df[col]
        valid = s.notna()
        mean = s.mean()
        chance = df[SCORE_COLUMNS["chance"]].mean()
        return pd.Series(
            {
                "n_cells": len(df),
                "n_undefined": int((~valid).sum()),
                "mean": mean,
                "median": s.median(),
                "std": s.std(),
                "frac_above": float((s[valid] > threshold).mean()) if valid.any() else np.nan,
                "mean_chance": chance,
                "mean_neighbors": df[SCORE_COLUMNS["neighbors"]].mean(),
                "mean_background": df[SCORE_COLUMNS["background"]].mean(),
                "lift": mean / chance if chance > 0 else np.nan,
            }
        )

    if by is None:
        return agg(table).to_frame().T
    by = [by] if isinstance(by, str) else list(by)
    keys = by[0] if len(by) == 1 else by  # scalar index labels for one column, tuples for several
    return table.groupby(keys, sort=True)[list(SCORE_COLUMNS.values())].apply(agg)
