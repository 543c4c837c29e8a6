"""The audit study's statistics on hand-made per-cell tables with known answers (no model, no JAX)."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from experiments import audit


def _model(rng, mode, seed, n=40, *, gc, cri, marked=None, classes=None, p_pred=0.9, geometry="tiny"):
    """A per-cell table of one model: `gc` and `cri` are arrays (or scalars) of its measures."""
    classes = rng.integers(0, 3, n) if classes is None else classes
    predicted = classes.copy()
    predicted[: n // 4] = (classes[: n // 4] + 1) % 3  # a quarter wrong
    return pd.DataFrame({
        "Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": 1, "Metadata_ObjectNumber": np.arange(n),
        "Metadata_Class": classes, "Marked": np.zeros(n, bool) if marked is None else marked,
        "predicted": predicted, "correct": predicted == classes, "p_pred": np.broadcast_to(p_pred, n).astype(float),
        "gc_stem_layercam": np.broadcast_to(gc, n).astype(float),
        "cgc_stem_layercam": np.broadcast_to(gc, n).astype(float) - 0.3,
        "drop_context_noise": np.broadcast_to(cri, n).astype(float),
        "drop_cell_noise": 1 - np.broadcast_to(cri, n).astype(float),
        "cri_noise": np.broadcast_to(cri, n).astype(float),
        "geometry": geometry, "mode": mode, "seed": seed, "kind": "trained",
    })


def _study(seeds=(0, 1, 2), site_like_cell=True):
    rng = np.random.default_rng(0)
    parts = []
    for seed in seeds:
        gc_cell = rng.uniform(0.6, 0.9, 40)
        # CRI falls as Grad-CAMO rises: Spearman -1 inside the cell model
        parts.append(_model(rng, "cell", seed, gc=gc_cell, cri=1 - gc_cell))
        parts.append(_model(rng, "background", seed, gc=rng.uniform(0.1, 0.4, 40), cri=rng.uniform(0.7, 1.0, 40)))
        # site: the cell model's Grad-CAMO values (no separation); CRI perfectly separating
        parts.append(_model(rng, "site", seed, gc=gc_cell if site_like_cell else 0.2,
                            cri=rng.uniform(0.7, 1.0, 40)))
        classes = np.tile([0, 1, 2, 1], 10)
        marked = np.arange(40) % 2 == 0
        # marked treated cells rely on themselves (low CRI), unmarked on neighbours; controls random
        cri = np.where(marked, 0.1, 0.9)
        cri = np.where(classes == 0, rng.uniform(0, 1, 40), cri)
        parts.append(_model(rng, "neighbor", seed, gc=0.5, cri=cri, marked=marked, classes=classes,
                            p_pred=np.where(np.arange(40) < 20, 0.95, 0.5)))
        parts.append(_model(rng, "untrained", seed, gc=rng.uniform(0.3, 0.5, 40), cri=0.5))
    return pd.concat(parts, ignore_index=True)


def _sanity() -> pd.DataFrame:
    return pd.DataFrame([
        {"geometry": "tiny", "mode": m, "seed": s, "fill": f, "mean_abs_change": a, "frac_changed": 0.0,
         "n_cells": 10, "too_strong": a > 0.1}
        for m in ("cell", "background") for s in (0, 1) for f, a in (("noise", 0.02), ("swap", 0.3))
    ])


@functools.lru_cache(maxsize=1)
def _summary() -> dict:
    """The summary of `_study()` (3 seeds), computed once for the tests that only read it
    (each AUROC goes through scikit-learn, the slow part)."""
    return audit.summarize(_study(), _sanity())["geometries"]["tiny"]


def test_orientation_and_measure_columns():
    cells = _study(seeds=(0,))
    ms = audit.measure_columns(cells)
    assert ms == ["gc_stem_layercam", "cgc_stem_layercam", "drop_cell_noise", "drop_context_noise", "cri_noise"]
    assert [audit.orientation(m) for m in ms] == [1, 1, 1, -1, -1]
    assert audit.fill_of("cri_swap") == "swap" and audit.fill_of("drop_context_blur") == "blur"
    assert audit.fill_of("gc_stage2_gradcam") is None


def test_auroc_separates_by_construction_and_orients_context_measures():
    out = _summary()
    auc = out["auroc_cell_model_vs"]
    # Grad-CAMO: background all below the cell model → 1; site equal to it → 0.5
    assert auc["gc_stem_layercam"]["background"]["mean"] == 1.0
    assert auc["gc_stem_layercam"]["background"]["n"] == 3
    assert abs(auc["gc_stem_layercam"]["site"]["mean"] - 0.5) < 1e-12  # all ties
    # CRI is higher in shortcut models; negated, the AUROC is 1, not 0
    assert auc["cri_noise"]["background"]["mean"] == 1.0
    assert auc["cri_noise"]["site"]["mean"] == 1.0
    assert auc["drop_context_noise"]["site"]["mean"] == 1.0
    assert auc["cri_noise"]["untrained"]["mean"] == 1.0  # controls are compared too
    shortcuts = [auc["cri_noise"][m]["mean"] for m in ("background", "neighbor", "site")]
    assert abs(auc["cri_noise"]["mean_over_shortcuts"] - np.mean(shortcuts)) < 1e-12
    # The table plants one context signal in three columns (cri, drop_context = cri, drop_cell =
    # 1 - cri: the same ranking once oriented), so those three tie at the top with
    # (background 1 + site 1 + neighbor) / 3, above both Grad-CAMOs at (1 + 0.5 + 1) / 3 (the site
    # model's Grad-CAMO ties the cell model's).
    ranking = {r["measure"]: r["auroc"] for r in out["ranking_mean_auroc_over_shortcuts"]}
    order = [r["measure"] for r in out["ranking_mean_auroc_over_shortcuts"]]
    context = (2 + auc["cri_noise"]["neighbor"]["mean"]) / 3
    assert 0.5 < auc["cri_noise"]["neighbor"]["mean"] < 1
    assert set(order[:3]) == {"cri_noise", "drop_context_noise", "drop_cell_noise"}
    assert all(abs(ranking[m] - context) < 1e-12 for m in order[:3])
    assert set(order[3:]) == {"gc_stem_layercam", "cgc_stem_layercam"}
    assert all(abs(ranking[m] - 2.5 / 3) < 1e-12 for m in order[3:])


def test_marked_vs_unmarked_inside_the_neighbor_model():
    out = _summary()["marked_vs_unmarked"]
    # treated cells: marked CRI 0.1 < unmarked 0.9 → oriented AUROC 1
    assert out["cri_noise"]["treated"]["mean"] == 1.0
    assert out["cri_noise"]["treated_confident"]["mean"] == 1.0
    assert out["cri_noise"]["treated_correct"]["mean"] == 1.0
    # control cells' CRI is random, so all cells together separate less than treated ones
    assert 0.5 < out["cri_noise"]["all"]["mean"] < 1.0
    # a constant measure does not separate
    assert out["gc_stem_layercam"]["treated"]["mean"] == 0.5
    counts = out["cells"]["treated_confident"][0]
    assert counts["marked"] + counts["unmarked"] == 15  # 20 confident cells, 5 of them controls
    # the "correct" subset drops the first quarter (predicted wrong)
    c = out["cells"]["correct"][0]
    assert c["marked"] + c["unmarked"] == 30


def test_verdict_rule_set_on_the_first_seed_and_judged_on_the_others():
    out = _summary()["verdict"]
    v = out["cri_noise"]
    assert v["rule_seed"] == 0 and v["separable_on_rule_seed"]
    assert v["heldout_models"] == 2 * 5 and v["heldout_all_right"] and v["wrong"] == []
    # the threshold lies halfway between the cell model's mean oriented CRI (−CRI) and the highest
    # other model's on seed 0, here straight from the table
    seed0 = _study()
    seed0 = seed0[seed0["seed"] == 0]
    oriented = -seed0.groupby("mode")["cri_noise"].mean()
    assert oriented["cell"] > oriented.drop("cell").max()
    assert abs(v["threshold"] - (oriented["cell"] + oriented.drop("cell").max()) / 2) < 1e-12
    # Grad-CAMO: the site model scores exactly as the cell model, so seed 0 sets no rule and
    # every held-out cell model is missed
    g = out["gc_stem_layercam"]
    assert not g["separable_on_rule_seed"] and np.isnan(g["threshold"])
    assert g["wrong"] == ["cell seed 1", "cell seed 2"] and g["heldout_right"] == 8


def test_verdict_without_held_out_seeds_and_with_a_wrong_model():
    cells = _study(seeds=(0, 1))
    # on seed 1 the background model's CRI falls to the cell model's level: the rule must miss it
    sel = (cells["mode"] == "background") & (cells["seed"] == 1)
    cells.loc[sel, "cri_noise"] = 0.05
    v = audit.verdicts(audit.model_means(cells, ["cri_noise"]), ["cri_noise"])["cri_noise"]
    assert v["separable_on_rule_seed"] and not v["heldout_all_right"]
    assert v["wrong"] == ["background seed 1"] and v["heldout_right"] == 4
    one = cells[cells["seed"] == 0]
    v = audit.verdicts(audit.model_means(one, ["cri_noise"]), ["cri_noise"])["cri_noise"]
    assert v["heldout_models"] == 0 and not v["heldout_all_right"]


def test_model_means_are_oriented_once():
    """``models[mode]["mean"]``: over seeds, the model's mean *oriented* measure (context measures
    negated, as the verdict's values), not the raw one."""
    cells = _study()
    models, verdict = _summary()["models"], _summary()["verdict"]
    sign = {"gc_stem_layercam": 1, "cgc_stem_layercam": 1, "drop_cell_noise": 1, "drop_context_noise": -1, "cri_noise": -1}
    for mode, g in cells.groupby("mode"):
        for m, k in sign.items():
            per_seed = [k * s[m].mean() for _, s in g.groupby("seed")]
            got = models[mode]["mean"][m]
            assert got["n"] == 3 and abs(got["mean"] - np.mean(per_seed)) < 1e-12, (mode, m, got)
            assert abs(got["sd"] - np.std(per_seed, ddof=1)) < 1e-12, (mode, m, got)
            assert abs(got["mean"] - np.mean(list(verdict[m]["values"][mode].values()))) < 1e-12, (mode, m)
    # the cell model's CRI is 1 - Grad-CAMO, Grad-CAMO in (0.6, 0.9): oriented, between -0.4 and -0.1
    assert -0.4 < models["cell"]["mean"]["cri_noise"]["mean"] < -0.1
    assert models["untrained"]["mean"]["cri_noise"]["mean"] == -0.5


def test_spearman_inside_each_model_and_fill_sanity():
    out = _summary()
    assert out["spearman"]["cell"]["gc_stem_layercam vs cri_noise"]["per_seed"] == [-1.0, -1.0, -1.0]
    assert np.isnan(out["spearman"]["untrained"]["gc_stem_layercam vs cri_noise"]["mean"])  # constant CRI
    fs = out["fill_sanity"]
    assert fs["noise"]["too_strong_in"] == [] and len(fs["swap"]["too_strong_in"]) == 4
    assert abs(fs["swap"]["mean_abs_change"]["mean"] - 0.3) < 1e-12
    # each fill's sanity travels with the measures of that fill
    assert out["auroc_cell_model_vs"]["cri_noise"]["fill_too_strong_in"] == []
    assert audit.spearman([1, 2, 3, np.nan], [3, 2, 1, 0]) == -1.0
    assert np.isnan(audit.spearman([1, 2], [2, 1]))


def test_balanced_permutation_decouples_labels_from_classes():
    rng = np.random.default_rng(3)
    truth = np.repeat([0, 1, 2], 5)
    labels = audit.balanced_permutation(truth, 3, rng)
    table = pd.crosstab(truth, labels).to_numpy()
    assert np.bincount(labels, minlength=3).tolist() == [5, 5, 5]
    assert table.max() - table.min() <= 1  # each class spread over the labels as evenly as possible


def test_swap_donors_come_from_every_class_pool_and_vary_between_cells():
    pools = [5, 3, 7]
    idx = audit.swap_donor_index(10, pools, 2, seed=0)
    assert idx.shape == (10, 6)
    bounds = np.cumsum([0, *pools])
    for k in range(3):
        cols = idx[:, 2 * k:2 * k + 2]
        assert ((cols >= bounds[k]) & (cols < bounds[k + 1])).all()
        assert (cols[:, 0] != cols[:, 1]).all()  # two different donors of one class per cell
    # A pool of 3 dealt in slots of 2 covers all its cells within two test cells.
    assert set(idx[:2, 2:4].ravel()) == {5, 6, 7}
    np.testing.assert_array_equal(idx, audit.swap_donor_index(10, pools, 2, seed=0))
    assert not np.array_equal(idx, audit.swap_donor_index(10, pools, 2, seed=1))
    assert audit.orientation("swap_context") == -1 and audit.orientation("swap_cell") == 1
    assert audit.orientation("xri") == -1
    assert audit.measure_columns(pd.DataFrame(columns=["xri", "swap_valid", "swap_cell", "gc_stem_gradcam"])) == [
        "gc_stem_gradcam", "swap_cell", "xri"]


def test_unmarked_dataset_keeps_the_unmarked_cells_and_their_store_rows(tmp_path):
    from gradcamo_jax.data import formats

    root = tmp_path / "neighbor2" / "seed0"
    data = root / "data"
    (data / "crops.zarr").mkdir(parents=True)
    keys = {"Metadata_Plate": "P", "Metadata_Well": ["A01", "A01", "B02", "B02", "C03"],
            "Metadata_Site": 1, "Metadata_ObjectNumber": [1, 2, 1, 2, 1]}
    cells = pd.DataFrame({**keys, "Metadata_Row": np.arange(5), "Metadata_Class": [0, 0, 1, 1, 2]})
    formats.write_cells(cells, data)
    truth = pd.DataFrame(keys).assign(Marked=[True, False, False, True, False]).iloc[::-1]  # another row order
    formats.write_table(truth, root / "plate" / "ground_truth.parquet")
    out = audit.unmarked_dataset(root, data)
    kept = formats.read_cells(out)
    assert kept["Metadata_Row"].tolist() == [1, 2, 4]
    assert (out / "crops.zarr").resolve() == (data / "crops.zarr").resolve()
    assert (out.parent / "plate" / "ground_truth.parquet").exists()
    assert audit.kind_of("neighbor_only") == "unmarked" and audit.signal_of("neighbor_only") == audit.MODES["neighbor"]
    assert audit.kind_of("permuted") == "permuted" and audit.signal_of("untrained") == audit.MODES["cell"]
    assert audit.cells_of_interest(root, data, "neighbor") == data
