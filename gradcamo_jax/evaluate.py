"""What profiles are worth: copairs mean average precision per dose against controls.

Image-based profiling judges profiles by what they retrieve (Kalinin et al., Nat Commun
2025, `copairs <https://github.com/cytomining/copairs>`_). `evaluate_profiles` takes the
per-cell profiles of `gradcamo score` and

1. spheres the cells on the control cells (`gradcamo_jax.sphering.spherize`, controls =
   ``control_query``, dose 0 by default);
2. aggregates them per well (median of each feature over the well's cells, as pycytominer's
   ``aggregate`` does; ``Metadata_Object_Count`` = cells per well). ``sphere_on="wells"``
   aggregates first and spheres the well medians on the control wells, as profiling pipelines
   with hundreds of control wells do. With fewer control wells than features that fit keeps
   only ``control wells - 1`` directions (ZCA projects every well onto the controls' span);
   measured on a synthetic plate (8 control wells, 40 features, 8 wells per dose) it lost a
   dose that sphering on cells retrieves (mAP 0.77 vs 1.0), hence cells by default;
3. runs copairs' **phenotypic activity**: for each treated well, the average precision (AP)
   of ranking its replicate wells (same ``group_by`` values: same treatment and dose) above
   the control wells by cosine similarity; per group, the mean AP (mAP), copairs'
   permutation p-value against the mAP of random rankings with the same numbers of
   positives and negatives, and its Benjamini-Hochberg corrected p-value. A group is
   *retrieved* when the corrected p-value is below ``threshold``;
4. optionally **phenotypic consistency** (``annotation``, e.g. a mechanism-of-action
   column): per annotation value, the mAP of retrieving groups that share it against groups
   that do not, on each group's consensus profile (median of its wells), over the retrieved
   groups only unless ``consistency_active_only=False``.

`write_evaluation` writes the tables (Parquet and CSV), ``summary.json`` and the figure
``map_activity.png`` (`gradcamo evaluate --profiles DIR --out DIR`).

Determinism: copairs draws its null distributions from ``seed`` and caches them by
(positives, total) under a cache folder. Its default folder is ``~/.copairs``, shared across
runs, and the seed of each cached null depends on the other configurations of the run that
first wrote it; every call here uses a fresh temporary cache, so the p-values depend only
on the data, ``seed`` and ``null_size``. The smallest possible p-value is
``1 / (null_size + 1)``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from gradcamo_jax.sphering import Method, SpherizeConfig, feature_columns, spherize

CONTROL = "Metadata_Control"
"""Well-table column: True for control wells (every cell of the well matches ``control_query``)."""
COUNT = "Metadata_Object_Count"
"""Well-table column: cells aggregated into the well (pycytominer's name)."""
_REFERENCE = "Metadata_Reference_Index"


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """How profiles are evaluated.

    Attributes:
      control_query: a `pandas.DataFrame.query` string selecting control cells (e.g.
        ``"Metadata_Treatment == 'DMSO'"``); a well is a control when all its cells match.
      well_by: columns naming a well (the aggregation unit).
      group_by: columns naming a replicate group (treatment and dose): wells with equal
        values are replicates. Columns absent from the profiles are left out (the summary
        lists the ones used); at least one must be present.
      features: feature columns (default: every numeric column not starting with ``Metadata_``).
      sphering: sphering method ("ZCA", "PCA", "ZCA-cor", "PCA-cor") or None for none.
      sphering_epsilon: added to each control eigenvalue (`gradcamo_jax.sphering`).
      sphering_by: fit one sphering per value of these columns (``()`` = one global fit).
      sphere_on: "cells" (sphere the cells on control cells, then aggregate) or "wells"
        (aggregate, then sphere on control wells). With fewer control wells than features,
        "wells" can keep only ``control wells - 1`` directions (ZCA projects onto the
        controls' span; the summary notes it).
      distance: copairs similarity ("cosine", "correlation", "euclidean", ...).
      null_size: random rankings in copairs' null distribution per configuration.
      threshold: corrected p-value below which a group counts as retrieved.
      seed: seed of copairs' null distributions.
      annotation: a ``Metadata_`` column for phenotypic consistency (constant within a
        group), or None to skip it.
      consistency_active_only: consistency over the retrieved groups only (copairs' recipe).
      min_replicates: replicate wells a treated group needs (AP needs at least one other).
      min_controls: control wells needed.
    """

    control_query: str = "Metadata_Dose == 0"
    well_by: tuple[str, ...] = ("Metadata_Plate", "Metadata_Well")
    group_by: tuple[str, ...] = ("Metadata_Treatment", "Metadata_Dose")
    features: tuple[str, ...] | None = None
    sphering: Method | None = "ZCA"
    sphering_epsilon: float = 1e-6
    sphering_by: tuple[str, ...] = ("Metadata_Plate",)
    sphere_on: Literal["cells", "wells"] = "cells"
    distance: str = "cosine"
    null_size: int = 100_000
    threshold: float = 0.05
    seed: int = 0
    annotation: str | None = None
    consistency_active_only: bool = True
    min_replicates: int = 2
    min_controls: int = 2

    def __post_init__(self):
        if self.sphere_on not in ("wells", "cells"):
            raise ValueError(f"EvaluateConfig.sphere_on={self.sphere_on!r}; expected 'wells' or 'cells'")
        if self.sphering is not None:
            SpherizeConfig(self.sphering, self.sphering_epsilon)  # validates method and epsilon
        if self.null_size < 1:
            raise ValueError(f"EvaluateConfig.null_size={self.null_size}; expected >= 1")
        if not 0 < self.threshold < 1:
            raise ValueError(f"EvaluateConfig.threshold={self.threshold}; expected in (0, 1)")
        if self.min_replicates < 2 or self.min_controls < 2:
            raise ValueError("EvaluateConfig.min_replicates and min_controls must be >= 2 (AP needs a positive "
                             "and a negative pair)")
        if not self.well_by:
            raise ValueError("EvaluateConfig.well_by is empty; name the columns of a well, e.g. ('Metadata_Plate', "
                             "'Metadata_Well')")
        if not isinstance(self.seed, int):
            raise ValueError(f"EvaluateConfig.seed={self.seed!r}; an int (copairs draws a fresh null without one)")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The result of `evaluate_profiles`.

    Attributes:
      wells: one row per well: the ``well_by`` and ``group_by`` columns, `CONTROL`, `COUNT`,
        then the (sphered) aggregated features.
      ap: one row per treated well: its metadata, copairs' ``average_precision``,
        ``normalized_average_precision``, ``n_pos_pairs`` (replicates), ``n_total_pairs``.
      activity: one row per treated group: the ``group_by`` columns, ``n_wells``,
        ``mean_average_precision`` (mAP), ``mean_normalized_average_precision``,
        ``null_mean_average_precision`` (the mean of copairs' null for this group),
        ``p_value``, ``corrected_p_value`` (Benjamini-Hochberg over groups),
        ``below_p``, ``below_corrected_p`` (= retrieved).
      consistency: one row per annotation value (copairs' mAP columns and ``n_groups``),
        or None when no annotation was asked for or too few groups share one (the summary
        says which).
      summary: counts, settings, ``fraction_retrieved``, ``mean_map`` and notes (JSON-ready).
    """

    wells: pd.DataFrame
    ap: pd.DataFrame
    activity: pd.DataFrame
    consistency: pd.DataFrame | None
    summary: dict


def _require_columns(df: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"profiles lack the {what} column(s) {missing}; set EvaluateConfig.{what} to columns the "
                         f"profiles have (they have {[c for c in df.columns if c.startswith('Metadata_')]})")


def _features(profiles: pd.DataFrame, config: EvaluateConfig) -> list[str]:
    """The feature columns, checked to exist and be finite in every cell."""
    feats = list(config.features) if config.features is not None else feature_columns(profiles)
    if not feats:
        raise ValueError("no feature columns in the profiles (numeric columns not starting with 'Metadata_'); pass "
                         "the output of `gradcamo score` or name them with EvaluateConfig.features")
    _require_columns(profiles, feats, "features")
    x = profiles[feats].to_numpy(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        cols = [f for f, b in zip(feats, bad.any(axis=0)) if b]
        raise ValueError(f"{int(bad.any(axis=1).sum())} cell(s) have NaN/inf in {len(cols)} feature(s) (first: "
                         f"{cols[:3]}); drop those cells first (e.g. profiles.dropna(subset=features)) or leave "
                         "those features out with EvaluateConfig.features")
    return feats


def _controls(df: pd.DataFrame, query: str) -> np.ndarray:
    """``(N,)`` bool: rows matching `query` (a clear error when the query does not run)."""
    try:
        hit = df.eval(query)
    except Exception as e:  # pandas raises many types for a bad query
        raise ValueError(f"control_query {query!r} failed on the profiles: {e}; fix EvaluateConfig.control_query "
                         "(gradcamo evaluate --control-query)") from e
    hit = np.asarray(hit)
    if hit.shape != (len(df),) or hit.dtype != bool:
        raise ValueError(f"control_query {query!r} does not give one True/False per cell; write a condition such "
                         "as \"Metadata_Dose == 0\"")
    return hit


def aggregate_wells(profiles: pd.DataFrame, features, well_by, constant, is_control: np.ndarray) -> pd.DataFrame:
    """Median of each feature per well (pycytominer's ``aggregate``), in float64.

    Args:
      profiles: ``(N cells, ...)`` table.
      features: feature columns.
      well_by: columns naming a well.
      constant: metadata columns carried to the well table (replicate group, annotation);
        each must be constant within a well.
      is_control: ``(N,)`` bool per cell; constant within a well.

    Returns:
      ``(W wells, ...)``: `well_by`, `constant`, `CONTROL`, `COUNT`, then `features`,
      sorted by `well_by`.

    Raises:
      ValueError: a well's cells disagree on a `constant` value or on being controls.
    """
    by = list(well_by)
    meta = profiles[by + [c for c in constant if c not in by]].copy()
    meta[CONTROL] = np.asarray(is_control, bool)
    grouped = meta.groupby(by, sort=True, dropna=False)
    for col in (*[c for c in constant if c not in by], CONTROL):
        varies = grouped[col].nunique(dropna=False) > 1
        if varies.any():
            first = varies[varies].index[0]
            raise ValueError(f"well {first} holds cells with different {col} values; a well must be one condition. "
                             f"Fix the plate map, or name the wells with more columns (EvaluateConfig.well_by)")
    head = grouped.first()
    head[COUNT] = grouped.size()
    x = profiles[list(features)].astype(np.float64)
    med = pd.concat([profiles[by], x], axis=1).groupby(by, sort=True, dropna=False).median()
    return pd.concat([head, med], axis=1).reset_index()


def _sphere(df: pd.DataFrame, features, config: EvaluateConfig, control_col: np.ndarray) -> pd.DataFrame:
    """`spherize` with the controls given as a boolean array (one control definition)."""
    tmp = df.assign(Metadata_SphereControl=np.asarray(control_col, bool))
    cfg = SpherizeConfig(config.sphering, config.sphering_epsilon, control_query="Metadata_SphereControl",
                         by=config.sphering_by)
    out = spherize(tmp, cfg, features)
    return out.drop(columns="Metadata_SphereControl")


def _check_controls(n_ctrl: int, config: EvaluateConfig) -> None:
    if n_ctrl < config.min_controls:
        raise ValueError(f"{n_ctrl} well(s) match control_query {config.control_query!r}; mAP against controls needs "
                         f">= {config.min_controls} control wells. Fix the query (EvaluateConfig.control_query, "
                         "gradcamo evaluate --control-query) or add control wells")


def _label(values) -> str:
    """A group's values as text ("DMSO 0", "8"), floats without trailing zeros."""
    values = tuple(values) if isinstance(values, tuple | list) else (values,)
    return " ".join(f"{v:g}" if isinstance(v, float | np.floating) else str(v) for v in values)


def _copairs_map(meta: pd.DataFrame, feats: np.ndarray, pos_sameby, neg_diffby, sameby, config: EvaluateConfig,
                 cache: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """copairs AP per row, then mAP, p-values and the mean of the null per `sameby` group."""
    from copairs.map import average_precision, mean_average_precision
    from copairs.matching import UnpairedException

    try:
        ap = average_precision(meta, feats, pos_sameby=list(pos_sameby), pos_diffby=[], neg_sameby=[],
                               neg_diffby=list(neg_diffby), distance=config.distance, progress_bar=False)
    except UnpairedException as e:
        raise ValueError(f"copairs found no pairs: {e}") from e
    mapped = mean_average_precision(ap, list(sameby), null_size=config.null_size, threshold=config.threshold,
                                    seed=config.seed, progress_bar=False, cache_dir=cache)
    return ap, _with_null_mean(mapped, ap, config, cache)


def _with_null_mean(mapped: pd.DataFrame, ap: pd.DataFrame, config: EvaluateConfig, cache: Path) -> pd.DataFrame:
    """Add ``null_mean_average_precision``: the mean of the null that copairs compared each group
    with (the mean over its rows of their null distributions, read back from the same cache)."""
    from copairs import compute

    valid = ap.query("~average_precision.isna() and n_pos_pairs > 0").reset_index(drop=True)
    confs, rev = np.unique(valid[["n_pos_pairs", "n_total_pairs"]].to_numpy(), axis=0, return_inverse=True)
    nulls = compute.get_null_dists(confs, config.null_size, config.seed, cache_dir=cache, progress_bar=False)
    conf_mean = nulls.mean(axis=1, dtype=np.float64)
    out = mapped.copy()
    out["null_mean_average_precision"] = [float(conf_mean[rev[np.asarray(ix)]].mean()) for ix in out["indices"]]
    return out.drop(columns="indices")


def evaluate_profiles(profiles: pd.DataFrame, config: EvaluateConfig = EvaluateConfig()) -> Evaluation:
    """Phenotypic activity (and optionally consistency) of per-cell profiles with copairs.

    Args:
      profiles: one row per cell (`gradcamo_jax.scoring.read_profiles`): ``Metadata_*``
        columns (the `config.well_by` and `config.group_by` ones, and whatever
        `config.control_query` reads) and numeric feature columns.
      config: `EvaluateConfig`.

    Returns:
      `Evaluation` (well table, per-well AP, per-group mAP with p-values, consistency, summary).

    Raises:
      ValueError: with the fix, when there are no feature columns, a feature is NaN/inf, a
        column is missing, the control query fails or matches fewer than ``min_controls``
        wells, a well mixes conditions, no well is treated, or a treated group has fewer
        than ``min_replicates`` wells.
    """
    feats = _features(profiles, config)
    group_by = [c for c in config.group_by if c in profiles.columns]
    if not group_by:
        raise ValueError(f"none of the group_by columns {list(config.group_by)} is in the profiles; set "
                         "EvaluateConfig.group_by to the columns naming a treatment and dose (gradcamo evaluate "
                         "--group-by)")
    _require_columns(profiles, config.well_by, "well_by")
    sph_by = list(config.sphering_by) if config.sphering is not None else []
    _require_columns(profiles, sph_by, "sphering_by")
    annotation = [config.annotation] if config.annotation is not None else []
    _require_columns(profiles, annotation, "annotation")
    well_by = list(config.well_by) + [c for c in sph_by if c not in config.well_by and c not in group_by]
    for col in [*well_by, *group_by]:
        if profiles[col].isna().any():
            raise ValueError(f"{int(profiles[col].isna().sum())} cell(s) have no {col}; fill it (e.g. the plate map's "
                             "value) or drop those cells")
    is_control = _controls(profiles, config.control_query)
    notes = []

    carried = list(dict.fromkeys(group_by + annotation))
    # Before any sphering, whose message would be about cells.
    _check_controls(len(profiles.loc[is_control, well_by].drop_duplicates()), config)
    cells = profiles
    if config.sphering is not None and config.sphere_on == "cells":
        per = pd.Series(is_control).groupby([profiles[c].to_numpy() for c in sph_by]).sum() if sph_by else \
            pd.Series([int(is_control.sum())])
        if int(per.min()) < 2:
            raise ValueError(f"sphering per {sph_by} needs >= 2 control cells in each, and one has {int(per.min())} "
                             f"matching control_query {config.control_query!r}; fix the query (gradcamo evaluate "
                             "--control-query) or sphere globally (EvaluateConfig.sphering_by=(), --sphering-by '')")
        cells = _sphere(profiles[list(dict.fromkeys(well_by + carried)) + feats], feats, config, is_control)
        feats = feature_columns(cells)
    wells = aggregate_wells(cells, feats, well_by, carried, is_control)
    n_ctrl = int(wells[CONTROL].sum())
    _check_controls(n_ctrl, config)
    treated = wells[~wells[CONTROL]]
    if treated.empty:
        raise ValueError(f"every well matches control_query {config.control_query!r}; there is nothing to evaluate. "
                         "Fix the query so that it selects only the control wells")
    sizes = treated.groupby(group_by, sort=True).size()
    small = sizes[sizes < config.min_replicates]
    if len(small):
        listed = ", ".join(f"{_label(k)} ({n} well)" for k, n in list(small.items())[:5])
        raise ValueError(f"{len(small)} treated group(s) by {group_by} have fewer than {config.min_replicates} "
                         f"replicate wells: {listed}. mAP ranks a well's replicates, so each group needs >= "
                         f"{config.min_replicates} wells; drop those groups from the profiles or group more coarsely "
                         "(EvaluateConfig.group_by)")

    if config.sphering is not None and config.sphere_on == "wells":
        per = wells.groupby(sph_by)[CONTROL].sum() if sph_by else pd.Series([n_ctrl])
        if int(per.min()) < 2:
            raise ValueError(f"sphering per {sph_by} needs >= 2 control wells in each, and one has {int(per.min())}; "
                             "sphere globally (EvaluateConfig.sphering_by=(), --sphering-by '') or on cells "
                             "(sphere_on='cells')")
        if int(per.min()) - 1 < len(feats):
            notes.append(f"sphering on wells: {int(per.min())} control wells span at most {int(per.min()) - 1} of "
                         f"{len(feats)} feature directions, and sphering keeps only those (sphere_on='cells' fits on "
                         "control cells instead)")
        wells = _sphere(wells, feats, config, wells[CONTROL].to_numpy())
        feats = feature_columns(wells)
    wells = wells[[c for c in wells.columns if c.startswith("Metadata_")] + feats]

    meta = wells[[c for c in wells.columns if c.startswith("Metadata_")]].copy()
    # copairs' reference index: each control its own value (controls are never replicates of each
    # other), every treated well -1; negatives = treated vs control pairs only.
    meta[_REFERENCE] = np.where(meta[CONTROL], np.arange(len(meta)), -1)
    x = wells[feats].to_numpy(np.float64)
    with tempfile.TemporaryDirectory(prefix="copairs-") as tmp:
        cache = Path(tmp)
        ap, activity = _copairs_map(meta, x, (*group_by, _REFERENCE), (_REFERENCE, CONTROL), group_by, config, cache)
        ap = ap[~ap[CONTROL]].drop(columns=_REFERENCE).reset_index(drop=True)
        activity.insert(len(group_by), "n_wells", activity[group_by].merge(
            sizes.rename("n").reset_index(), on=group_by, how="left")["n"].to_numpy())
        consistency, why = None, None
        if config.annotation is not None:
            consistency, why = _consistency(wells, feats, group_by, activity, config, cache)
    summary = {
        "cells": int(len(profiles)),
        "wells": int(len(wells)),
        "control_wells": n_ctrl,
        "treated_wells": int(len(treated)),
        "groups": int(len(activity)),
        "groups_retrieved": int(activity["below_corrected_p"].sum()),
        "fraction_retrieved": float(activity["below_corrected_p"].mean()),
        "mean_map": float(activity["mean_average_precision"].mean()),
        "features": len(feats),
        "group_by": group_by,
        "well_by": well_by,
        "control_query": config.control_query,
        "sphering": config.sphering,
        "sphere_on": config.sphere_on if config.sphering is not None else None,
        "distance": config.distance,
        "null_size": config.null_size,
        "min_p_value": 1.0 / (config.null_size + 1),
        "threshold": config.threshold,
        "seed": config.seed,
        "copairs": _version("copairs"),
        "notes": notes,
    }
    if config.annotation is not None:
        summary["annotation"] = config.annotation
        summary["consistency_skipped"] = why
        if consistency is not None:
            summary["fraction_consistent"] = float(consistency["below_corrected_p"].mean())
    return Evaluation(wells=wells, ap=ap, activity=activity, consistency=consistency, summary=summary)


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _consistency(wells: pd.DataFrame, feats, group_by, activity: pd.DataFrame, config: EvaluateConfig,
                 cache: Path) -> tuple[pd.DataFrame | None, str | None]:
    """Phenotypic consistency over the groups' consensus profiles (median of their wells)."""
    col = config.annotation
    treated = wells[~wells[CONTROL]]
    groups = treated.groupby(group_by, sort=True)
    if (groups[col].nunique(dropna=False) > 1).any():
        raise ValueError(f"annotation {col!r} varies within a group of {group_by}; it must be one value per group")
    consensus = groups[feats].median()
    consensus[col] = groups[col].first()
    consensus = consensus.reset_index()
    if config.consistency_active_only:
        keep = activity.loc[activity["below_corrected_p"], group_by]
        consensus = consensus.merge(keep, on=group_by, how="inner")
    consensus = consensus.dropna(subset=[col])
    shared = consensus[col].value_counts()
    if (shared >= 2).sum() == 0 or len(shared) < 2:
        scope = "retrieved " if config.consistency_active_only else ""
        return None, (f"consistency needs >= 2 {scope}groups sharing an annotation value and >= 2 values; found "
                      f"{len(consensus)} {scope}group(s) over {len(shared)} value(s)")
    meta = consensus[[*group_by, col]]
    x = consensus[feats].to_numpy(np.float64)
    _, out = _copairs_map(meta, x, (col,), (col,), (col,), config, cache)
    out.insert(1, "n_groups", out[[col]].merge(shared.rename("n").reset_index(), on=col, how="left")["n"].to_numpy())
    return out, None


def plot_activity(activity: pd.DataFrame, path: str | os.PathLike, *, group_by, threshold: float = 0.05,
                  title: str = "Phenotypic activity (copairs mAP vs controls)") -> Path:
    """Two panels per treated group: mAP (filled = retrieved, corrected p < `threshold`; grey
    dash = the mean of its null), and -log10 corrected p-value with the threshold line."""
    from gradcamo_jax.report import _plt

    plt = _plt()
    labels = [_label(v) for v in activity[list(group_by)].itertuples(index=False)]
    pos = np.arange(len(activity))
    hit = activity["below_corrected_p"].to_numpy(bool)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(activity) + 4), 4))
    ax = axes[0]
    m = activity["mean_average_precision"].to_numpy(float)
    ax.scatter(pos[hit], m[hit], s=60, color="tab:blue", label=f"retrieved (corrected p < {threshold:g})", zorder=3)
    ax.scatter(pos[~hit], m[~hit], s=60, facecolors="none", edgecolors="tab:blue", label="not retrieved", zorder=3)
    ax.plot(pos, activity["null_mean_average_precision"].to_numpy(float), "_", color="grey", markersize=22, mew=2,
            label="null (random ranking)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel("mAP (replicates vs controls)")
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[1]
    lp = -np.log10(activity["corrected_p_value"].to_numpy(float))
    ax.bar(pos, lp, color=np.where(hit, "tab:blue", "lightgrey"))
    ax.axhline(-np.log10(threshold), color="k", ls="--", lw=1, label=f"p = {threshold:g}")
    ax.set_ylabel("-log10 corrected p-value")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(pos, labels, rotation=30 if len(pos) > 6 else 0)
        ax.set_xlabel(" / ".join(c.replace("Metadata_", "").lower() for c in group_by))
    fig.suptitle(f"{title}: {int(hit.sum())} of {len(hit)} retrieved", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_evaluation(result: Evaluation, out_dir: str | os.PathLike, *, figure: bool = True) -> dict[str, Path]:
    """Write `result` into `out_dir`: ``map_activity.{parquet,csv}``, ``ap_activity.parquet``,
    ``wells.parquet``, ``map_consistency.{parquet,csv}`` (when computed), ``summary.json`` and
    ``map_activity.png``. Returns {name: path}."""
    from gradcamo_jax.data import formats

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    tables = {"map_activity": result.activity, "map_consistency": result.consistency}
    for name, table in tables.items():
        if table is not None:
            paths[name] = formats.write_table(table, out / f"{name}.parquet")
            paths[f"{name}_csv"] = formats.write_table(table, out / f"{name}.csv")
    paths["ap_activity"] = formats.write_table(result.ap, out / "ap_activity.parquet")
    paths["wells"] = formats.write_table(result.wells, out / "wells.parquet")
    paths["summary"] = formats.write_json(result.summary, out / "summary.json")
    if figure:
        paths["figure"] = plot_activity(result.activity, out / "map_activity.png", group_by=result.summary["group_by"],
                                        threshold=result.summary["threshold"])
    return paths


__all__ = ["CONTROL", "COUNT", "EvaluateConfig", "Evaluation", "aggregate_wells", "evaluate_profiles", "plot_activity",
           "write_evaluation"]
