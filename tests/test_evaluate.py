"""copairs evaluation of profiles: mAP per dose against controls, checked against hand and
scikit-learn computations, with clear errors for tables it cannot evaluate."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control
from sklearn.metrics import average_precision_score

from gradcamo_jax.data import formats
from gradcamo_jax.evaluate import CONTROL, COUNT, EvaluateConfig, evaluate_profiles, write_evaluation
from gradcamo_jax.scoring import MANIFEST, PART
from gradcamo_jax.sphering import SpherizeConfig, spherize

# The quick loop: everything but the files (matplotlib figures, the CLI and the HTML report).
FAST = {
    "test_perfect_retrieval_gives_map_1_and_the_smallest_p_value",
    "test_shuffled_profiles_sit_at_the_null_and_are_not_significant",
    "test_well_aggregation_is_a_groupby_median_and_sphering_the_modules",
    "test_sphering_on_fewer_control_wells_than_features_is_noted",
    "test_average_precision_and_corrected_p_match_sklearn_and_scipy",
    "test_retrieved_fraction_matches_the_table",
    "test_results_are_deterministic_and_leave_the_home_folder_alone",
    "test_bad_input_is_a_clear_error_naming_the_fix",
    "test_bad_settings_are_refused_at_construction",
    "test_consistency_retrieves_groups_sharing_an_annotation",
}

NULL = 2000  # copairs' null size in the tests: the smallest p-value is 1 / 2001


def make_profiles(effects: dict[float, np.ndarray | None], *, control_wells=12, wells_per_dose=3, cells_per_well=4,
                  features=5, noise=1.0, seed=0) -> pd.DataFrame:
    """A plate of cells: dose 0 (controls) plus one dose per key of `effects`, whose value is
    the shift of its cells' features (None = no shift). Cells carry the score columns the
    report reads."""
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    doses = [0.0, *effects]
    for dose in doses:
        shift = np.zeros(features) if dose == 0 or effects[dose] is None else np.asarray(effects[dose], float)
        for w in range(control_wells if dose == 0 else wells_per_dose):
            for c in range(cells_per_well):
                rows.append({"Metadata_Plate": "P1", "Metadata_Well": f"d{dose:g}w{w:02d}", "Metadata_Site": c % 2,
                             "Metadata_Treatment": "DMSO" if dose == 0 else "cmpd", "Metadata_Dose": dose})
                feats.append(shift + noise * rng.normal(size=features))
    df = pd.DataFrame(rows)
    n = len(df)
    cell = rng.uniform(0.2, 0.8, n)
    df = df.assign(Metadata_Row=np.arange(n), Metadata_GradCAMO=cell, Metadata_GradCAMO_Neighbors=(1 - cell) / 2,
                   Metadata_GradCAMO_Background=(1 - cell) / 2, Metadata_GradCAMO_Chance=rng.uniform(0.05, 0.2, n))
    x = np.asarray(feats, np.float32)
    return pd.concat([df, pd.DataFrame(x, columns=[f"EfficientNetB0_stage5_{i:04d}" for i in range(features)])], axis=1)


def axis(i, size=8.0, features=5):
    v = np.zeros(features)
    v[i] = size
    return v


def feats_of(df):
    return [c for c in df.columns if not c.startswith("Metadata_")]


def exact_null_ap(n_pos: int, total: int) -> float:
    """Expected AP of a random ranking of `n_pos` positives among `total` items, by enumeration."""
    aps = []
    for ranks in itertools.combinations(range(1, total + 1), n_pos):
        aps.append(np.mean([(k + 1) / r for k, r in enumerate(ranks)]))
    return float(np.mean(aps))


def test_perfect_retrieval_gives_map_1_and_the_smallest_p_value():
    """Each dose shifted far along its own feature axis: every well ranks its replicates above
    every control, so AP = 1 for each well, mAP = 1 and p = 1/(null+1), the smallest copairs gives."""
    df = make_profiles({1.0: axis(0), 2.0: axis(1), 4.0: axis(2)})
    for sphere_on in ("wells", "cells"):
        r = evaluate_profiles(df, EvaluateConfig(null_size=NULL, sphere_on=sphere_on))
        a = r.activity
        assert len(a) == 3 and (a["n_wells"] == 3).all()
        np.testing.assert_allclose(a["mean_average_precision"], 1.0)
        np.testing.assert_allclose(r.ap["average_precision"], 1.0)
        np.testing.assert_allclose(a["p_value"], 1 / (NULL + 1), rtol=1e-6)
        assert (a["corrected_p_value"] < 0.05).all() and r.summary["fraction_retrieved"] == 1.0
        # The null: 2 replicates among 2 + 12 controls per well, its mean known exactly.
        np.testing.assert_allclose(a["null_mean_average_precision"], exact_null_ap(2, 14), atol=0.01)
        assert r.summary["control_wells"] == 12 and r.summary["treated_wells"] == 9 and r.summary["cells"] == len(df)


def test_shuffled_profiles_sit_at_the_null_and_are_not_significant():
    """The same strong plate with its feature rows permuted across cells: no dose information
    is left, so the mAPs scatter around the null's mean and no dose is retrieved."""
    df = make_profiles({d: axis(i % 5) for i, d in enumerate((0.5, 1.0, 2.0, 4.0, 8.0, 16.0))}, seed=1)
    feats = feats_of(df)
    shuffled = df.copy()
    shuffled[feats] = np.random.default_rng(2).permutation(df[feats].to_numpy())
    r = evaluate_profiles(shuffled, EvaluateConfig(null_size=NULL))
    a = r.activity
    null = exact_null_ap(2, 14)
    np.testing.assert_allclose(a["null_mean_average_precision"], null, atol=0.01)
    assert abs(a["mean_average_precision"].mean() - null) < 0.12, a["mean_average_precision"].tolist()
    assert (a["p_value"] > 0.05).all() and (a["corrected_p_value"] > 0.05).all()
    assert r.summary["fraction_retrieved"] == 0.0 and r.summary["groups_retrieved"] == 0
    # The unshuffled plate: all six retrieved.
    assert evaluate_profiles(df, EvaluateConfig(null_size=NULL)).summary["fraction_retrieved"] == 1.0


def test_well_aggregation_is_a_groupby_median_and_sphering_the_modules():
    df = make_profiles({1.0: axis(0, 2.0), 2.0: None}, cells_per_well=5, seed=3)
    feats = feats_of(df)
    r = evaluate_profiles(df, EvaluateConfig(null_size=NULL, sphering=None))
    want = df.groupby(["Metadata_Plate", "Metadata_Well"])[feats].median()
    got = r.wells.set_index(["Metadata_Plate", "Metadata_Well"])
    assert list(got.index) == list(want.index)
    np.testing.assert_allclose(got[feats].to_numpy(), want.to_numpy(), rtol=1e-6)
    assert (got[COUNT] == df.groupby(["Metadata_Plate", "Metadata_Well"]).size()).all()
    assert (got[CONTROL] == (got["Metadata_Dose"] == 0)).all()
    # Default: the cells sphered on the control cells by the sphering module, then the median.
    sph = evaluate_profiles(df, EvaluateConfig(null_size=NULL)).wells
    ref = spherize(df, SpherizeConfig(), feats).groupby(["Metadata_Plate", "Metadata_Well"])[feats].median()
    np.testing.assert_allclose(sph[feats].to_numpy(), ref.to_numpy(), rtol=1e-9, atol=1e-9)
    # sphere_on="wells": the sphering module applied to the medians, fitted on the control wells.
    sph = evaluate_profiles(df, EvaluateConfig(null_size=NULL, sphere_on="wells")).wells
    ref = spherize(want.reset_index().assign(Metadata_Dose=got["Metadata_Dose"].to_numpy()), SpherizeConfig(), feats)
    np.testing.assert_allclose(sph[feats].to_numpy(), ref[feats].to_numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sph.loc[sph[CONTROL], feats].mean(), 0, atol=1e-9)


def test_sphering_on_fewer_control_wells_than_features_is_noted():
    """4 control wells span 3 of 8 feature directions: sphering the well medians can keep only
    those, and the summary says so; sphering the cells (the default) fits on 16 control cells."""
    df = make_profiles({1.0: axis(0, features=8), 2.0: axis(1, features=8)}, control_wells=4, features=8, seed=12)
    wells = evaluate_profiles(df, EvaluateConfig(null_size=NULL, sphere_on="wells")).summary
    assert wells["notes"] and "4 control wells span at most 3 of 8" in wells["notes"][0]
    assert evaluate_profiles(df, EvaluateConfig(null_size=NULL)).summary["notes"] == []


def test_average_precision_and_corrected_p_match_sklearn_and_scipy():
    """Per treated well: scikit-learn's AP of its replicates (positives) against the controls
    (negatives) by cosine similarity of the well profiles; mAP = their mean per dose; the
    corrected p-values = Benjamini-Hochberg of the p-values (scipy)."""
    df = make_profiles({1.0: axis(0, 0.8), 2.0: axis(1, 1.2), 4.0: None}, control_wells=6, wells_per_dose=4, seed=4)
    r = evaluate_profiles(df, EvaluateConfig(null_size=NULL))
    w = r.wells
    x = w[feats_of(w)].to_numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    ctrl = w[CONTROL].to_numpy()
    want = {}
    for i in np.flatnonzero(~ctrl):
        reps = np.flatnonzero((w["Metadata_Dose"] == w["Metadata_Dose"][i]).to_numpy() & ~ctrl)
        reps = reps[reps != i]
        others = np.concatenate([reps, np.flatnonzero(ctrl)])
        labels = np.r_[np.ones(len(reps)), np.zeros(ctrl.sum())]
        want[w["Metadata_Well"][i]] = average_precision_score(labels, x[others] @ x[i])
    got = r.ap.set_index("Metadata_Well")["average_precision"]
    assert set(got.index) == set(want)
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-6)
    assert (r.ap["n_pos_pairs"] == 3).all() and (r.ap["n_total_pairs"] == 3 + 6).all()
    per_dose = r.ap.groupby("Metadata_Dose")["average_precision"].mean()
    np.testing.assert_allclose(r.activity.set_index("Metadata_Dose")["mean_average_precision"], per_dose, rtol=1e-9)
    np.testing.assert_allclose(r.activity["corrected_p_value"], false_discovery_control(r.activity["p_value"]),
                               rtol=1e-9)
    assert r.activity["p_value"].min() >= 1 / (NULL + 1) - 1e-12


def test_retrieved_fraction_matches_the_table():
    """Two strong doses and two without effect: the summary counts the table's corrected p < 0.05."""
    df = make_profiles({1.0: axis(0), 2.0: None, 4.0: axis(1), 8.0: None}, seed=5)
    r = evaluate_profiles(df, EvaluateConfig(null_size=NULL))
    hit = r.activity["corrected_p_value"] < 0.05
    assert (hit == r.activity["below_corrected_p"]).all()
    assert r.summary["groups_retrieved"] == hit.sum() and r.summary["fraction_retrieved"] == pytest.approx(hit.mean())
    assert set(r.activity.loc[hit, "Metadata_Dose"]) == {1.0, 4.0}
    assert r.summary["mean_map"] == pytest.approx(r.activity["mean_average_precision"].mean())


def test_results_are_deterministic_and_leave_the_home_folder_alone(tmp_path, monkeypatch):
    """copairs caches nulls under ~/.copairs by default; each call here uses a fresh
    temporary cache, so equal inputs give equal p-values and nothing lands in the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    df = make_profiles({1.0: axis(0, 0.6), 2.0: axis(1, 0.6)}, seed=6)
    a = evaluate_profiles(df, EvaluateConfig(null_size=NULL, seed=3)).activity
    b = evaluate_profiles(df, EvaluateConfig(null_size=NULL, seed=3)).activity
    pd.testing.assert_frame_equal(a, b)
    c = evaluate_profiles(df, EvaluateConfig(null_size=NULL, seed=4)).activity
    np.testing.assert_allclose(a["mean_average_precision"], c["mean_average_precision"])
    assert not (tmp_path / ".copairs").exists()


def _drop_wells(df, wells):
    out = df[~df["Metadata_Well"].isin(wells)].reset_index(drop=True)
    return out.assign(Metadata_Row=np.arange(len(out)))


def bad_inputs() -> dict:
    """{case: (profiles, config, the error message's pattern)}."""
    df = make_profiles({1.0: axis(0), 2.0: axis(1)}, control_wells=4, seed=7)
    feats = feats_of(df)
    cfg = EvaluateConfig(null_size=NULL)
    return {
        "no controls": (df, EvaluateConfig(null_size=NULL, control_query="Metadata_Dose < 0"),
                        r"0 well\(s\) match control_query.*Fix the query"),
        "one control well": (_drop_wells(df, ["d0w01", "d0w02", "d0w03"]), cfg, r"1 well\(s\) match.*>= 2 control wells"),
        "bad query": (df, EvaluateConfig(control_query="Metadata_Nope == 0"), "control_query .* failed"),
        "single well per dose": (_drop_wells(df, ["d1w01", "d1w02"]), cfg,
                                 r"fewer than 2 replicate wells: cmpd 1 \(1 well\).*drop those groups"),
        "NaN features": (df.assign(**{feats[2]: df[feats[2]].where(df.index != 5)}), cfg,
                         r"1 cell\(s\) have NaN/inf.*dropna"),
        "no feature columns": (df.drop(columns=feats), cfg, "no feature columns.*EvaluateConfig.features"),
        "no group column": (df.drop(columns=["Metadata_Treatment", "Metadata_Dose"]),
                            EvaluateConfig(control_query="Metadata_Site == 0"), "none of the group_by columns"),
        "well mixing doses": (df.assign(Metadata_Well=df["Metadata_Well"].str[-3:]), cfg,
                              "holds cells with different Metadata_(Treatment|Dose)"),
        "missing well column": (df.drop(columns="Metadata_Well"), cfg, r"lack the well_by column.*Metadata_Well"),
        "one plate without control cells": (df.assign(Metadata_Plate=np.where(df["Metadata_Dose"] == 0, "P1", "P2")),
                                            cfg, r"sphering per \['Metadata_Plate'\] needs >= 2 control cells.*globally"),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_is_a_clear_error_naming_the_fix(case):
    table, config, match = bad_inputs()[case]
    with pytest.raises(ValueError, match=match):
        evaluate_profiles(table, config)


def test_bad_settings_are_refused_at_construction():
    with pytest.raises(ValueError, match="sphere_on"):
        EvaluateConfig(sphere_on="plates")
    with pytest.raises(ValueError, match="method"):
        EvaluateConfig(sphering="whiten")
    with pytest.raises(ValueError, match="min_replicates"):
        EvaluateConfig(min_replicates=1)


def test_consistency_retrieves_groups_sharing_an_annotation():
    """Doses 1 and 2 share a mechanism (same direction), 4 and 8 another: each mechanism's
    consensus profiles retrieve each other (mAP 1); with no annotation shared the summary says why."""
    df = make_profiles({1.0: axis(0), 2.0: axis(0, 9.0), 4.0: axis(1), 8.0: axis(1, 9.0)}, seed=8)
    df["Metadata_MoA"] = np.where(df["Metadata_Dose"] == 0, "none", np.where(df["Metadata_Dose"] < 3, "A", "B"))
    r = evaluate_profiles(df, EvaluateConfig(null_size=NULL, annotation="Metadata_MoA"))
    c = r.consistency.set_index("Metadata_MoA")
    assert set(c.index) == {"A", "B"} and (c["n_groups"] == 2).all()
    np.testing.assert_allclose(c["mean_average_precision"], 1.0)
    assert r.summary["consistency_skipped"] is None and "fraction_consistent" in r.summary
    alone = df.assign(Metadata_MoA=df["Metadata_Dose"].astype(str))
    r = evaluate_profiles(alone, EvaluateConfig(null_size=NULL, annotation="Metadata_MoA"))
    assert r.consistency is None and "sharing an annotation" in r.summary["consistency_skipped"]
    with pytest.raises(ValueError, match="annotation column"):
        evaluate_profiles(df, EvaluateConfig(null_size=NULL, annotation="Metadata_Target"))


def write_profile_folder(df: pd.DataFrame, folder, rows_per_shard=100):
    n = len(df)
    formats.write_json({"n_cells": n, "rows_per_shard": rows_per_shard}, folder / MANIFEST)
    for k, start in enumerate(range(0, n, rows_per_shard)):
        formats.write_table(df.iloc[start: start + rows_per_shard], folder / PART.format(k))
    return folder


def test_cli_writes_table_summary_and_figure(tmp_path, capsys):
    from PIL import Image

    from gradcamo_jax.cli import main

    df = make_profiles({1.0: axis(0), 2.0: None}, seed=9)
    write_profile_folder(df, tmp_path / "profiles")
    assert main(["evaluate", "--profiles", str(tmp_path / "profiles"), "--out", str(tmp_path / "eval"),
                 "--null-size", str(NULL)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "eval"
    summary = json.loads((out / "summary.json").read_text())
    assert summary == printed and summary["groups"] == 2 and summary["null_size"] == NULL
    table = pd.read_parquet(out / "map_activity.parquet")
    csv = pd.read_csv(out / "map_activity.csv")
    np.testing.assert_allclose(csv["mean_average_precision"], table["mean_average_precision"])
    assert summary["fraction_retrieved"] == pytest.approx(table["below_corrected_p"].mean())
    assert len(pd.read_parquet(out / "wells.parquet")) == 12 + 2 * 3
    img = np.asarray(Image.open(out / "map_activity.png").convert("L"), float)
    assert img.std() > 5
    # The library writes the same files.
    r = evaluate_profiles(df, EvaluateConfig(null_size=NULL))
    paths = write_evaluation(r, tmp_path / "lib", figure=False)
    pd.testing.assert_frame_equal(pd.read_parquet(paths["map_activity"]), table)
    # Bad input: the command exits with the library's message.
    with pytest.raises(SystemExit, match="gradcamo evaluate: 0 well"):
        main(["evaluate", "--profiles", str(tmp_path / "profiles"), "--out", str(tmp_path / "bad"),
              "--control-query", "Metadata_Dose < 0"])


def test_report_shows_the_map_table_and_figure_or_says_why_not(tmp_path):
    from gradcamo_jax.report import ReportConfig, make_report

    good = make_profiles({1.0: axis(0), 2.0: None}, seed=10)
    single = _drop_wells(good, ["d1w01", "d1w02"])
    config = ReportConfig(umap=False, evaluate=EvaluateConfig(null_size=NULL))
    for name, df in (("good", good), ("single", single)):
        write_profile_folder(df, tmp_path / name / "profiles")
        text = make_report(tmp_path / name / "profiles", tmp_path / name / "report", config=config).read_text()
        assert "copairs mAP per dose" in text
        if name == "good":
            assert "src='evaluation/map_activity.png'" in text and "mean_average_precision" in text
            assert (tmp_path / name / "report" / "evaluation" / "map_activity.png").stat().st_size > 5000
            summary = json.loads((tmp_path / name / "report" / "evaluation" / "summary.json").read_text())
            assert f"{summary['groups_retrieved']} of 2 doses retrieved" in text
        else:
            assert "Not computed:" in text and "fewer than 2 replicate wells" in text
            assert not (tmp_path / name / "report" / "evaluation").exists()
    off = make_report(tmp_path / "good" / "profiles", tmp_path / "off", config=ReportConfig(umap=False, evaluate=None))
    assert "copairs" not in off.read_text()
