"""The HTML report renders from a profile folder, and its headline numbers are the table's."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import blob_masks

from gradcamo_jax.data import formats
from gradcamo_jax.report import ReportConfig, headline, make_report, pick_examples
from gradcamo_jax.scoring import MANIFEST, PART

# The quick loop: the headline and example picks; the figures (UMAP compiles with numba) in `make test`.
FAST = {
    "test_headline_numbers_are_the_tables",
    "test_audit_table_and_headline_against_pandas",
    "test_examples_are_extremes_among_saved_cams",
    "test_missing_part_is_a_clear_error",
    "test_layer_diagnostics_flag_scores_that_restate_cell_size",
    "test_cam_overlay_keeps_stain_grey_and_heat_in_one_hue",
    "test_grey_image_is_the_named_channel_or_the_mean_and_names_a_wrong_one",
    "test_report_with_an_unknown_overlay_channel_fails_before_the_figures",
}

SPATIAL = (5, 24, 24)


def fake_profiles(n=120, seed=0):
    rng = np.random.default_rng(seed)
    dose = rng.choice([0.0, 0.32, 8.0], n)
    cell = np.clip(rng.beta(2, 3, n) + 0.2 * (dose > 0), 0, 1)
    nb = (1 - cell) * rng.uniform(0, 1, n)
    df = pd.DataFrame({
        "Metadata_Plate": "P1",
        "Metadata_Well": rng.choice(["A01", "A02", "B01", "B02"], n),
        "Metadata_Site": rng.integers(0, 4, n),
        "Metadata_Dose": dose,
        "Metadata_Row": np.arange(n),
        "Metadata_Class": (dose > 0).astype(int) + (dose > 1).astype(int),
        "Metadata_Split": rng.choice(["train", "val", "test"], n),
        "Metadata_GradCAMO": cell,
        "Metadata_GradCAMO_Neighbors": nb,
        "Metadata_GradCAMO_Background": 1 - cell - nb,
        "Metadata_GradCAMO_Chance": rng.uniform(0.05, 0.2, n),
        "Metadata_GradCAMO_Undefined": False,
        "Metadata_Predicted": rng.integers(0, 3, n),
    })
    df.loc[3, ["Metadata_GradCAMO", "Metadata_GradCAMO_Neighbors", "Metadata_GradCAMO_Background"]] = np.nan
    follow_context = rng.uniform(0, 0.8, n) + 0.2 * (dose > 1)
    follow_cell = rng.uniform(0.2, 1.0, n)
    df["Metadata_Audit_FollowContext"] = follow_context
    df["Metadata_Audit_FollowCell"] = follow_cell
    df["Metadata_Audit_InterchangeIndex"] = np.minimum(follow_context, 1) / (np.minimum(follow_context, 1) + follow_cell)
    df.loc[[5, 7], "Metadata_Audit_InterchangeIndex"] = np.nan
    df["Metadata_GradCAMO_Corrected"] = cell - 0.2
    feats = rng.normal(size=(n, 6)) + dose[:, None]
    for i in range(6):
        df[f"EfficientNetB0_stage5_{i:04d}"] = feats[:, i].astype(np.float32)
    return df


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    df = fake_profiles()
    n = len(df)
    formats.write_json({"n_cells": n, "rows_per_shard": 50}, base / "profiles" / MANIFEST)
    for k in range(3):
        formats.write_table(df.iloc[50 * k: 50 * (k + 1)], base / "profiles" / PART.format(k))
    rng = np.random.default_rng(1)
    masks = blob_masks(n, SPATIAL)
    formats.write_crop_store(base / "data" / "crops.zarr", rng.random((n, *SPATIAL, 5)).astype(np.float16), masks,
                             attrs={"channels": list(formats.CHANNELS)})
    rows = np.arange(0, n, 6)
    formats.write_arrays(base / "profiles" / "cams" / "part-00000.zarr",
                         {"cam": rng.random((len(rows), *SPATIAL)).astype(np.float16), "row": rows})
    return base, df


def test_headline_numbers_are_the_tables(folder):
    _, df = folder
    h = headline(df)
    valid = df["Metadata_GradCAMO"].dropna()
    assert h["cells"] == 120 and h["undefined_scores"] == 1
    assert h["mean_gradcamo"] == pytest.approx(valid.mean())
    assert h["frac_above_threshold"] == pytest.approx((valid > 0.5).mean())
    held = df["Metadata_Split"] != "train"
    assert h["accuracy_held_out_wells"] == pytest.approx((df.Metadata_Predicted == df.Metadata_Class)[held].mean())
    total = h["attention_cell"] + h["attention_neighbors"] + h["attention_background"]
    assert total == pytest.approx(1, abs=0.02)


def test_examples_are_extremes_among_saved_cams(folder):
    _, df = folder
    rows = np.arange(0, 120, 6)
    ex = pick_examples(df, rows, 3)
    sub = df.set_index("Metadata_Row").loc[rows, "Metadata_GradCAMO"].dropna()
    assert set(ex["highest Grad-CAMO"]) == set(sub.nlargest(3).index)
    assert set(ex["lowest Grad-CAMO"]) == set(sub.nsmallest(3).index)


def test_report_renders_every_figure(folder):
    base, _ = folder
    index = make_report(base / "profiles", base / "report", data_dir=base / "data",
                        config=ReportConfig(umap_neighbors=10), extra={"training_seconds": 12.5})
    text = index.read_text()
    for name in ("overlays", "scores_by_dose", "attention_split", "umap", "scores_by_site"):
        png = base / "report" / f"{name}.png"
        assert png.stat().st_size > 5000, name
        assert f"src='{name}.png'" in text
        from PIL import Image

        img = np.asarray(Image.open(png).convert("L"), float)
        assert img.std() > 5, f"{name}.png is blank"
    assert "accuracy_held_out_wells" in text and "training_seconds" in text
    # The audit section: its figure, the reading for a user, the tables by dose and site.
    assert (base / "report" / "audit.png").stat().st_size > 5000 and "src='audit.png'" in text
    assert "What you may conclude" in text and "Audit by dose" in text and "Audit by site" in text
    assert "mean_interchange_index" in text


def test_audit_table_and_headline_against_pandas(folder):
    from gradcamo_jax.report import audit_table

    _, df = folder
    x = df["Metadata_Audit_InterchangeIndex"]
    t = audit_table(df, "Metadata_Dose")
    for dose, g in df.groupby("Metadata_Dose"):
        xi = g["Metadata_Audit_InterchangeIndex"].dropna()
        assert t.loc[dose, "n_cells"] == len(g)
        assert t.loc[dose, "interchange_index"] == pytest.approx(xi.mean())
        assert t.loc[dose, "frac_follows_context"] == pytest.approx((xi > 0.5).mean())
        assert t.loc[dose, "follow_context"] == pytest.approx(g["Metadata_Audit_FollowContext"].mean())
        assert t.loc[dose, "gradcamo_corrected"] == pytest.approx(g["Metadata_GradCAMO_Corrected"].mean())
    assert t["n_undefined_index"].sum() == 2
    h = headline(df)
    assert h["mean_interchange_index"] == pytest.approx(x.dropna().mean())
    assert h["frac_cells_following_context"] == pytest.approx((x.dropna() > 0.5).mean())
    assert h["undefined_interchange_index"] == 2
    assert audit_table(df).loc["all", "n_cells"] == len(df)


def test_missing_part_is_a_clear_error(folder, tmp_path):
    base, df = folder
    formats.write_json({"n_cells": 120, "rows_per_shard": 50}, tmp_path / MANIFEST)
    formats.write_table(df.iloc[:50], tmp_path / PART.format(0))
    with pytest.raises(FileNotFoundError, match="2 of 3 profile parts missing"):
        make_report(tmp_path, tmp_path / "r")


def test_layer_diagnostics_flag_scores_that_restate_cell_size(folder, tmp_path):
    """The correlation of Grad-CAMO with the chance level, against NumPy on the defined scores;
    a score that is the volume fraction plus noise is flagged in the page, an independent one is not."""
    from gradcamo_jax.report import UNINFORMATIVE_CORR, layer_diagnostics

    _, df = folder
    manifest = {"layer": "stage2", "method": "gradcam", "layer_map_shape": [3, 8, 8]}
    d = layer_diagnostics(df, manifest)
    ok = df["Metadata_GradCAMO"].notna()
    want = np.corrcoef(df.loc[ok, "Metadata_GradCAMO"], df.loc[ok, "Metadata_GradCAMO_Chance"])[0, 1]
    assert d["corr_gradcamo_vs_chance"] == pytest.approx(want) and d["layer_map_shape"] == "3×8×8"
    assert abs(d["corr_gradcamo_vs_chance"]) < UNINFORMATIVE_CORR
    # Scores that only restate the volume fraction.
    rng = np.random.default_rng(2)
    size_only = df.assign(Metadata_GradCAMO=df["Metadata_GradCAMO_Chance"] * 1.05 + rng.normal(0, 0.002, len(df)))
    for name, table in (("independent", df), ("size_only", size_only)):
        out = tmp_path / name
        formats.write_json({"n_cells": len(table), "rows_per_shard": 200, **manifest}, out / "profiles" / MANIFEST)
        formats.write_table(table, out / "profiles" / PART.format(0))
        text = make_report(out / "profiles", out / "report", config=ReportConfig(sphering=None, umap=False)).read_text()
        assert ("mostly restate cell" in text) == (name == "size_only"), name
        assert "3×8×8" in text


def test_cam_overlay_keeps_stain_grey_and_heat_in_one_hue():
    """Where the CAM is 0 the picture is the dimmed grey image (R = G = B, so stain never looks
    like heat); at the CAM's maximum it is the CAM's hue whatever the stain; in between the
    opacity is CAM / max. A CAM that is 0 everywhere leaves the grey image."""
    from gradcamo_jax.report import CAM_RGB, cam_over_grey

    rng = np.random.default_rng(0)
    grey = rng.random((12, 10))
    cam = np.zeros((12, 10))
    cam[3:6, 4:8] = rng.uniform(0.2, 2.0, (3, 4))
    cam[4, 5] = 4.0
    rgb = cam_over_grey(grey, cam, dim=0.6)
    off = cam == 0
    np.testing.assert_allclose(rgb[off], np.repeat(0.6 * grey[off][:, None], 3, axis=1))
    np.testing.assert_allclose(rgb[4, 5], CAM_RGB)
    a = cam[3, 4] / 4.0
    np.testing.assert_allclose(rgb[3, 4], (1 - a) * 0.6 * grey[3, 4] + a * np.asarray(CAM_RGB))
    np.testing.assert_allclose(cam_over_grey(grey, np.zeros_like(cam), dim=1.0), np.repeat(grey[..., None], 3, axis=-1))


def test_grey_image_is_the_named_channel_or_the_mean_and_names_a_wrong_one():
    from gradcamo_jax.report import grey_image

    rng = np.random.default_rng(1)
    img = rng.random((16, 16, 3)) * np.array([1.0, 10.0, 100.0])
    channels = ("DNA", "ER", "Mito")
    er = grey_image(img, channels, "er")
    lo, hi = np.percentile(img[..., 1], [1, 99.5])
    np.testing.assert_allclose(er, np.clip((img[..., 1] - lo) / (hi - lo), 0, 1))
    # The mean of per-channel-scaled channels: channel 2's larger range does not dominate.
    mean = grey_image(img, channels)
    parts = [grey_image(img, channels, c) for c in channels]
    np.testing.assert_allclose(mean, np.mean(parts, axis=0))
    with pytest.raises(ValueError, match=r"'AGP'.*\['DNA', 'ER', 'Mito'\]"):
        grey_image(img, channels, "AGP")


def test_report_with_an_unknown_overlay_channel_fails_before_the_figures(folder, tmp_path):
    base, _ = folder
    with pytest.raises(ValueError, match="overlay channel 'Actin'"):
        make_report(base / "profiles", tmp_path / "r", data_dir=base / "data",
                    config=ReportConfig(overlay_channel="Actin", umap=False))
    assert not (tmp_path / "r" / "scores_by_dose.png").exists()
