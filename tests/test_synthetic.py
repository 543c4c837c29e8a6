"""Synthetic plates: format, determinism, ground truth, and that each signal mode lands where it says."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from gradcamo_jax import cli
from gradcamo_jax.data import formats as F
from gradcamo_jax.data import synthetic as S

CH = {n: i for i, n in enumerate(F.CHANNELS)}


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_plate(tmp_path_factory):
    out = tmp_path_factory.mktemp("plate")
    config = S.make_config("tiny", signal={"cell": 1.0, "neighbor": 0.5}, empty_sites=1)
    return config, S.write_plate(config, out)


def test_plate_is_valid_input_format(tiny_plate):
    config, path = tiny_plate
    pm = F.read_plate_map(path)
    assert len(pm) == (len(config.doses) + 1) * config.wells_per_dose * config.sites_per_well
    assert sorted(pm["Metadata_Dose"].unique()) == [0.0, *config.doses]
    assert set(pm.loc[pm["Metadata_Dose"] == 0, "Metadata_Treatment"]) == {config.control}
    truth = F.read_table(path.parent / S.GROUND_TRUTH_TABLE)
    for row in pm.itertuples():
        stack = F.read_stack(row.FileName_Image, channels=F.CHANNELS)
        assert stack.shape == (config.field_shape[0], 5, *config.field_shape[1:])
        labels = F.read_labels(row.FileName_Labels, expect_shape=stack.shape)
        gt = truth[(truth.Metadata_Well == row.Metadata_Well) & (truth.Metadata_Site == row.Metadata_Site)]
        ids = np.unique(labels)[1:]
        # Ground truth lists exactly the labels present, numbered 1..n, with true volumes and centroids.
        np.testing.assert_array_equal(gt.Metadata_ObjectNumber, np.arange(1, len(ids) + 1))
        np.testing.assert_array_equal(ids, gt.Metadata_ObjectNumber)
        np.testing.assert_array_equal(gt.Volume, [np.sum(labels == i) for i in ids])
        if len(ids):
            com = np.array(ndimage.center_of_mass(labels > 0, labels, ids))
            np.testing.assert_allclose(gt[["Centroid_Z", "Centroid_Y", "Centroid_X"]], com, atol=1e-9)
        assert (gt.TrueClass == row.Metadata_TrueClass).all()
    last = pm.iloc[-1]
    assert F.read_labels(last.FileName_Labels).max() == 0  # the requested empty site
    meta = F.read_json(path.parent / S.GROUND_TRUTH_JSON)
    assert meta["config"]["signal"] == {"cell": 1.0, "neighbor": 0.5}
    assert [c["dose"] for c in meta["classes"]] == [0.0, *config.doses]


def test_same_seed_same_bytes_other_seed_differs(tmp_path, tiny_plate):
    config, path = tiny_plate
    S.write_plate(config, tmp_path / "again")
    assert _files(tmp_path / "again") == _files(path.parent)
    S.write_plate(dataclasses.replace(config, seed=1), tmp_path / "other")
    a, b = _files(path.parent), _files(tmp_path / "other")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.parts[0] == "images")


def test_signal_parsing():
    assert S.parse_signal("cell") == (("cell", 1.0),)
    assert S.parse_signal("cell=0.2, background=1") == (("background", 1.0), ("cell", 0.2))
    assert S.SynthConfig(signal={"site": 2}).strengths == {"cell": 0.0, "background": 0.0, "neighbor": 0.0, "site": 2.0}
    with pytest.raises(ValueError, match="unknown signal mode 'nucleus'"):
        S.parse_signal("nucleus")
    with pytest.raises(ValueError, match="≥ 0"):
        S.parse_signal({"cell": -1})
    with pytest.raises(ValueError, match="unknown channel"):
        S.SynthConfig(cell_channels=("Actin",))


def _pair(mode, site=0, **kw):
    """The same field (same seed and site) rendered as control and as the top dose."""
    config = S.make_config("demo", signal=mode, **kw)
    lo = S.synth_site(config, 0, site)
    hi = S.synth_site(config, len(config.doses), site)
    np.testing.assert_array_equal(lo[1], hi[1])  # geometry does not depend on dose
    return config, lo, hi


def _region_means(stack, region):
    return stack[:, :, :, :].transpose(1, 0, 2, 3)[:, region].mean(axis=1)  # (C,)


def test_cell_mode_changes_cells_not_background():
    _, (s0, lab, *_), (s5, *_) = _pair("cell")
    inside = ndimage.binary_erosion(lab > 0, iterations=1)
    far = ~ndimage.binary_dilation(lab > 0, iterations=3)
    r_in = _region_means(s5.astype(float), inside) / _region_means(s0.astype(float), inside)
    r_out = _region_means(s5.astype(float), far) / _region_means(s0.astype(float), far)
    assert r_in[CH["ER"]] > 1.4 and r_in[CH["Mito"]] > 1.4
    assert abs(r_in[CH["DNA"]] - 1) < 0.1
    np.testing.assert_allclose(r_out, 1, atol=0.05)


def test_background_mode_changes_only_background():
    _, (s0, lab, *_), (s5, *_) = _pair("background")
    inside = ndimage.binary_erosion(lab > 0, iterations=1)
    outside = lab == 0
    r_in = _region_means(s5.astype(float), inside) / _region_means(s0.astype(float), inside)
    r_out = _region_means(s5.astype(float), outside) / _region_means(s0.astype(float), outside)
    np.testing.assert_allclose(r_in, 1, atol=0.05)
    assert r_out[CH["ER"]] > 1.1 and r_out[CH["AGP"]] > 1.1
    assert abs(r_out[CH["DNA"]] - 1) < 0.05 and abs(r_out[CH["Mito"]] - 1) < 0.05


def test_neighbor_mode_marks_only_some_cells():
    _, (s0, lab, t0, _), (s5, _, t5, _) = _pair("neighbor", cells_per_site=24)
    assert (t0.Marked == t5.Marked).all() and 0 < t5.Marked.sum() < len(t5)
    core = ndimage.binary_erosion(lab > 0, iterations=1) * lab
    er0 = ndimage.mean(s0[:, CH["ER"]].astype(float), core, t5.Metadata_ObjectNumber)
    er5 = ndimage.mean(s5[:, CH["ER"]].astype(float), core, t5.Metadata_ObjectNumber)
    ratio = np.asarray(er5) / np.asarray(er0)
    marked = t5.Marked.to_numpy()
    assert ratio[marked].min() > 1.3
    # Unmarked cells carry no signal of their own (only light blurred in from marked neighbours).
    assert np.median(ratio[~marked]) < 1.1
    assert (t5.Signal_Neighbor[~marked] == 0).all() and (t5.Signal_Neighbor[marked] == 1).all()


def test_site_mode_is_a_field_wide_batch_effect():
    config, (s0, lab, _, e0), (s5, _, _, e5) = _pair("site")
    assert e0["bleed_DNA_to_ER"] == 0 and e5["bleed_DNA_to_ER"] > 0
    nuclei = s0[:, CH["DNA"]] > np.percentile(s0[:, CH["DNA"]], 97)
    # DNA bleeds into ER: ER becomes correlated with DNA.
    c0 = np.corrcoef(s0[:, CH["DNA"]].ravel(), s0[:, CH["ER"]].ravel())[0, 1]
    c5 = np.corrcoef(s5[:, CH["DNA"]].ravel(), s5[:, CH["ER"]].ravel())[0, 1]
    assert c5 > c0 + 0.2
    # Defocus: weaker edges in the DNA channel (gradients of a lightly smoothed image, so
    # shot noise does not dominate).
    edges = lambda s: np.abs(np.diff(ndimage.gaussian_filter(s[:, CH["DNA"]].astype(float), (0, 1, 1)), axis=-1)).mean()  # noqa: E731
    assert edges(s5) < 0.8 * edges(s0)
    assert nuclei.any()


def test_fields_are_crowded_and_z_falls_off():
    config = S.make_config("demo")
    stack, lab, table, _ = S.synth_site(config, 0, 3)
    assert len(table) >= 15
    touching = set()
    for i in table.Metadata_ObjectNumber:
        ring = ndimage.binary_dilation(lab == i) & (lab != i) & (lab > 0)
        if ring.any():
            touching.add(i)
    assert len(touching) / len(table) > 0.5
    # Intensity falls off away from the middle slices.
    prof = stack[:, CH["AGP"]].astype(float).mean(axis=(1, 2))
    assert prof[len(prof) // 2] > 1.5 * prof[0] and prof[len(prof) // 2] > 1.5 * prof[-1]


def test_cli_synth(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path / "p"), "--preset", "tiny", "--mode", "cell=0.2,background=1",
                     "--seed", "5", "--field", "4,40,40"]) == 0
    path = capsys.readouterr().out.strip()
    pm = F.read_plate_map(path)
    assert F.read_stack(pm.FileName_Image[0]).shape == (4, 5, 40, 40)
    assert F.read_json(tmp_path / "p" / S.GROUND_TRUTH_JSON)["config"]["seed"] == 5
