"""Crops: pieces against independent NumPy/SciPy references, then the plate run (shards, resume, bad input)."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _tools import load_tool
from scipy import ndimage

from gradcamo_jax.data import crop as C
from gradcamo_jax.data import formats as F
from gradcamo_jax.data import synthetic as S

CROP = (3, 16, 16)
CONFIG = C.CropConfig(crop_size=CROP, workers=0, min_volume=10)


# ----------------------------------------------------------------------------- pure pieces


def test_normalize_matches_np_percentile():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 100.0, (4, 3, 10, 12)).astype(np.float32)
    out, lo, hi = C.normalize(x, (1.0, 99.8))
    for c in range(3):
        p_lo, p_hi = np.percentile(x[:, c], [1.0, 99.8])
        np.testing.assert_allclose([lo[c], hi[c]], [p_lo, p_hi], rtol=1e-6)
        np.testing.assert_allclose(out[:, c], (x[:, c] - p_lo) / (p_hi - p_lo), rtol=1e-5, atol=1e-6)
    assert out.max() > 1  # not clipped by default
    clipped, _, _ = C.normalize(x, (1.0, 99.8), clip=True)
    assert clipped.min() == 0 and clipped.max() == 1
    # A fixed range: the same affine map for every channel, whatever the site's own percentiles.
    fixed, lo, hi = C.normalize(x, (1.0, 99.8), intensity_range=(50.0, 450.0))
    np.testing.assert_array_equal(lo, 50.0)
    np.testing.assert_array_equal(hi, 450.0)
    np.testing.assert_allclose(fixed, (x - 50.0) / 400.0, rtol=1e-6, atol=1e-6)
    brighter = x.copy()
    brighter[0, 0, 0, :3] *= 10  # a few bright voxels move the site's 99.8th percentile ...
    assert not np.allclose(C.normalize(brighter, (1.0, 99.8))[0][1:], out[1:])
    np.testing.assert_array_equal(C.normalize(brighter, intensity_range=(50.0, 450.0))[0][1:], fixed[1:])  # ... not this
    with pytest.raises(ValueError, match="intensity_range"):
        C.CropConfig(intensity_range=(5.0, 5.0))
    assert "intensity_range" not in C.CropConfig().crop_settings()
    assert C.CropConfig(intensity_range=(0, 4095)).crop_settings()["intensity_range"] == [0.0, 4095.0]


def test_measure_cells_matches_scipy():
    rng = np.random.default_rng(1)
    lab = ndimage.label(ndimage.gaussian_filter(rng.random((5, 20, 24)), 1.5) > 0.52)[0]
    lab[lab == 2] = 0  # a gap in the ids
    t = C.measure_cells(lab)
    ids = np.unique(lab)[1:]
    np.testing.assert_array_equal(t.Metadata_ObjectNumber, ids)
    np.testing.assert_allclose(t[["Metadata_Centroid_Z", "Metadata_Centroid_Y", "Metadata_Centroid_X"]],
                               ndimage.center_of_mass(np.ones_like(lab), lab, ids))
    np.testing.assert_array_equal(t.Metadata_Volume, [np.sum(lab == i) for i in ids])
    border = [bool(np.any(lab[:, [0, -1], :] == i) or np.any(lab[:, :, [0, -1]] == i)) for i in ids]
    np.testing.assert_array_equal(t.Metadata_TouchesBorder, border)
    assert len(C.measure_cells(np.zeros((2, 3, 3), np.int32))) == 0


def test_extract_crops_matches_slice_of_padded_stack():
    rng = np.random.default_rng(2)
    shape = (4, 20, 18)
    normed = rng.random((*shape, 2)).astype(np.float32)
    lab = rng.integers(0, 4, shape).astype(np.int32)
    ids = np.array([1, 2, 3, 1])
    centroids = np.array([[1.6, 0.2, 17.9], [2.0, 10.0, 9.0], [0.0, 19.4, 0.49], [3.5, 5.5, 12.5]])
    size = (3, 8, 7)
    starts = C.crop_starts(centroids, size, shape)
    np.testing.assert_array_equal(starts[1], [1, 6, 6])  # centre voxel at index size // 2
    np.testing.assert_array_equal(starts[3], [3, 2, 10])  # .5 rounds up
    image, mask, padded = C.extract_crops(normed, lab, ids, starts, size)
    p = np.array(size)
    pad_img = np.pad(normed, [(s, s) for s in size] + [(0, 0)])
    pad_lab = np.pad(lab, [(s, s) for s in size])
    for i in range(len(ids)):
        sl = tuple(slice(a + s, a + s + s) for a, s in zip(starts[i], size))
        np.testing.assert_array_equal(image[i], pad_img[sl])
        ref = np.where(pad_lab[sl] == ids[i], 1, np.where(pad_lab[sl] > 0, 2, 0))
        np.testing.assert_array_equal(mask[i], ref)
        inside = np.all(starts[i] >= 0) and np.all(starts[i] + p <= shape)
        assert padded[i] == (not inside)
    assert padded.tolist() == [True, False, True, True]
    # Stack-centred z: the window is the stack's middle, whatever the centroid.
    assert (C.crop_starts(centroids, (4, 8, 7), shape, center_z=False)[:, 0] == 0).all()


# ----------------------------------------------------------------------------- plate runs


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    root = tmp_path_factory.mktemp("crop")
    config = dataclasses.replace(S.PRESETS["tiny"], doses=(1.6, 8.0, 40.0), wells_per_dose=3, field_shape=(4, 32, 32),
                                 cell_radius=(1.5, 5.0, 5.0), cells_per_site=6, empty_sites=1)
    path = S.write_plate(config, root / "plate")
    ref = root / "ref"
    with pytest.warns(UserWarning, match="no cells"):
        C.crop_plate(path, ref, CONFIG)
    return path, ref


def _same_dataset(a, b):
    ca, cb = F.read_cells(a), F.read_cells(b)
    pd.testing.assert_frame_equal(ca, cb)
    sa, sb = F.open_crops(a), F.open_crops(b)
    np.testing.assert_array_equal(sa.image[:], sb.image[:])
    np.testing.assert_array_equal(sa.mask[:], sb.mask[:])


def test_dataset_matches_independent_reference(plate):
    path, ref = plate
    pm = F.read_plate_map(path)
    cells, store = F.read_cells(ref), F.open_crops(ref)
    assert len(store) == len(cells) > 0 and store.image.shape[1:] == (*CROP, 5)
    np.testing.assert_array_equal(cells.Metadata_Row, np.arange(len(cells)))
    assert store.channels == F.CHANNELS and store.image.dtype == np.float16
    for row in pm.itertuples():
        sub = cells[(cells.Metadata_Well == row.Metadata_Well) & (cells.Metadata_Site == row.Metadata_Site)]
        stack = F.read_stack(row.FileName_Image)
        lab = F.read_labels(row.FileName_Labels)
        ids = [i for i in np.unique(lab)[1:] if np.sum(lab == i) >= CONFIG.min_volume]
        assert sub.Metadata_ObjectNumber.tolist() == ids
        if not ids:
            continue
        lo = np.percentile(stack, 1.0, axis=(0, 2, 3))
        hi = np.percentile(stack, 99.8, axis=(0, 2, 3))
        normed = ((stack - lo[None, :, None, None]) / (hi - lo)[None, :, None, None]).transpose(0, 2, 3, 1)
        pad_img = np.pad(normed, [(s, s) for s in CROP] + [(0, 0)])
        pad_lab = np.pad(lab, [(s, s) for s in CROP])
        for cell in sub.itertuples():
            c = np.array(ndimage.center_of_mass(lab == cell.Metadata_ObjectNumber))
            start = np.floor(c + 0.5).astype(int) - np.array(CROP) // 2
            sl = tuple(slice(a + s, a + 2 * s) for a, s in zip(start, CROP))
            np.testing.assert_allclose(store.image[cell.Metadata_Row].astype(np.float32), pad_img[sl],
                                       rtol=2e-3, atol=2e-3)  # float16 storage
            central = pad_lab[sl] == cell.Metadata_ObjectNumber
            np.testing.assert_array_equal(store.mask[cell.Metadata_Row],
                                          np.where(central, 1, np.where(pad_lab[sl] > 0, 2, 0)))
            assert cell.Metadata_Volume == np.sum(lab == cell.Metadata_ObjectNumber)
    # Metadata carried through; classes sorted by dose with control 0; splits whole wells.
    assert {"Metadata_Treatment", "Metadata_Dose", "Metadata_TrueClass", "FileName_Image"} <= set(cells.columns)
    np.testing.assert_array_equal(cells.Metadata_Class, cells.Metadata_TrueClass)
    assert (cells.groupby("Metadata_Well").Metadata_Split.nunique() == 1).all()
    wells = pm.drop_duplicates("Metadata_Well")
    splits = C.assign_splits(pm)
    for k in range(4):  # 3 wells per class: one of each split
        ws = wells[wells.Metadata_TrueClass == k].Metadata_Well
        assert sorted(splits[("SYNTH1", w)] for w in ws) == ["test", "train", "val"]
    assert C.assign_splits(pm, seed=0) == splits
    summary = F.read_json(ref / C.SUMMARY_FILE)
    last = pm.iloc[-1]
    assert summary["n_cells"] == len(cells)
    assert summary["empty_sites"] == [F.site_id(last.Metadata_Plate, last.Metadata_Well, last.Metadata_Site)]
    assert summary["n_padded"] == int(cells.Metadata_Padded.sum()) > 0


def test_small_objects_filtered_and_reported(plate, tmp_path):
    path, ref = plate
    config = dataclasses.replace(CONFIG, min_volume=10**9)
    with pytest.warns(UserWarning, match="below min_volume"):
        C.crop_plate(path, tmp_path / "none", config)
    summary = F.read_json(tmp_path / "none" / C.SUMMARY_FILE)
    assert summary["n_cells"] == 0 and summary["n_filtered_small"] == len(F.read_cells(ref))
    assert len(F.open_crops(tmp_path / "none")) == 0


def test_sharded_and_merged_equals_unsharded(plate, tmp_path):
    path, ref = plate
    out = tmp_path / "sharded"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in (2, 0):
            C.crop_shard(path, out, CONFIG, shard=(i, 3))
        with pytest.raises(ValueError, match=r"site\(s\) not cropped yet: .*run every --shard"):
            C.merge(path, out, CONFIG)
        C.crop_shard(path, out, CONFIG, shard=(1, 3))
    C.merge(path, out, CONFIG)
    _same_dataset(ref, out)


def test_resume_after_kill(plate, tmp_path):
    path, ref = plate
    out = tmp_path / "resumed"
    shutil.copytree(ref, out)
    for p in ("cells.parquet", "crops.zarr", "summary.json"):
        (shutil.rmtree if (out / p).is_dir() else Path.unlink)(out / p)
    parts = sorted(p for p in (out / C.PARTS_DIR).iterdir())
    killed = parts[2]
    # Simulate a kill mid-write: the part never got its final name, a temporary remains.
    shutil.move(killed, killed.with_name(f".tmp-deadbeef-{killed.name}"))
    untouched = parts[0] / C.SUMMARY_FILE
    before = untouched.stat().st_mtime_ns
    reports = C.crop_shard(path, out, CONFIG)
    assert untouched.stat().st_mtime_ns == before  # finished sites are skipped
    assert not any(F.is_temporary(p) for p in (out / C.PARTS_DIR).iterdir())
    assert len(reports) == len(parts)
    C.merge(path, out, CONFIG)
    _same_dataset(ref, out)


def test_worker_processes_give_the_same_dataset(plate, tmp_path):
    path, ref = plate
    pm = F.read_plate_map(path).iloc[:6]
    C.crop_plate(pm, tmp_path / "serial", CONFIG)
    C.crop_plate(pm, tmp_path / "pool", dataclasses.replace(CONFIG, workers=2))
    _same_dataset(tmp_path / "serial", tmp_path / "pool")


def test_bad_site_fails_loudly_others_are_kept(plate, tmp_path):
    path, _ = plate
    pm = F.read_plate_map(path).iloc[:3].copy()
    bad = tmp_path / "bad_labels.tif"
    F.write_labels(bad, np.zeros((4, 32, 30), np.int32))
    pm.loc[1, "FileName_Labels"] = str(bad)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"(?s)1 site\(s\) failed.*SYNTH1_B01_s1: .*bad_labels\.tif: label volume shape "
                                         r"\(4, 32, 30\).*≠ image shape \(4, 32, 32\)"):
        C.crop_shard(pm, out, CONFIG)
    done = sorted(p.name for p in (out / C.PARTS_DIR).iterdir())
    assert done == ["SYNTH1_A01_s1", "SYNTH1_C01_s1"]  # no half-written part for the bad site
    pm2 = pm.drop(columns=["FileName_Labels"])
    with pytest.raises(ValueError, match=r"no labels .* tools/segment\.py or pass --labels-dir"):
        C.crop_shard(pm2, tmp_path / "out2", CONFIG)


def test_cli_shards_merge_and_labels_dir(plate, tmp_path, capsys):
    path, ref = plate
    tool = load_tool("crop")
    # Labels from a folder of <site id>_labels.tiff, as tools/segment.py and synth write them.
    labels_dir = tmp_path / "labels"
    shutil.copytree(Path(path).parent / "labels", labels_dir)
    pm = F.read_plate_map(path).drop(columns=["FileName_Labels"])
    F.write_plate_map(pm, tmp_path / "pm.parquet")
    args = [str(tmp_path / "pm.parquet"), "--out", str(tmp_path / "ds"), "--crop", "3,16,16", "--min-volume", "10",
            "--labels-dir", str(labels_dir), "--workers", "0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tool.main(args + ["--shard", "0/2"]) == 0
        assert tool.main(args + ["--merge"]) == 2
        assert "not cropped yet" in capsys.readouterr().err
        assert tool.main(args + ["--shard", "1/2"]) == 0
    assert tool.main(args + ["--merge"]) == 0
    a, b = F.read_cells(ref), F.read_cells(tmp_path / "ds")
    np.testing.assert_array_equal(F.open_crops(ref).image[:], F.open_crops(tmp_path / "ds").image[:])
    pd.testing.assert_frame_equal(a.drop(columns=["FileName_Labels"]), b.drop(columns=["FileName_Labels"]))
    assert b.FileName_Labels.str.startswith(str(labels_dir)).all()
    assert tool.main(args + ["--shard", "2/2"]) == 2
