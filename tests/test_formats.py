"""File formats: round trips, bad input (each error names the file), atomic writes, crop stores."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import tifffile

from gradcamo_jax.data import formats as F


def _stack(rng, z=3, c=5, y=8, x=9):
    return rng.integers(50, 4000, (z, c, y, x)).astype(np.uint16)


def _plate(tmp_path, rng, n=3, labels=True):
    rows = []
    for i in range(n):
        F.write_stack(tmp_path / "img" / f"s{i}.tif", _stack(rng), F.CHANNELS)
        row = {"Metadata_Plate": "P1", "Metadata_Well": f"A0{i + 1}", "Metadata_Site": 1,
               "Metadata_Treatment": "DMSO" if i == 0 else "cpd", "Metadata_Dose": 0.0 if i == 0 else float(i),
               "Metadata_Extra": f"x{i}", "FileName_Image": f"img/s{i}.tif"}
        if labels:
            F.write_labels(tmp_path / "lab" / f"s{i}.tif", np.zeros((3, 8, 9), np.int32))
            row["FileName_Labels"] = f"lab/s{i}.tif"
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- plate maps


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_plate_map_round_trip_resolves_relative_paths(tmp_path, suffix):
    df = _plate(tmp_path, np.random.default_rng(0))
    df.loc[0, "Metadata_Well"] = "01"  # a numeric-looking well stays a string
    path = F.write_plate_map(df, tmp_path / f"pm{suffix}")
    back = F.read_plate_map(path)
    assert back["Metadata_Well"].tolist() == ["01", "A02", "A03"]
    assert back["FileName_Image"].tolist() == [str((tmp_path / "img" / f"s{i}.tif").resolve()) for i in range(3)]
    assert back["FileName_Labels"][2] == str((tmp_path / "lab" / "s2.tif").resolve())
    assert back["Metadata_Extra"].tolist() == ["x0", "x1", "x2"]
    assert back.attrs["plate_map"] == str(path.resolve())


def test_plate_map_missing_files_named_by_row(tmp_path):
    df = _plate(tmp_path, np.random.default_rng(0))
    (tmp_path / "img" / "s1.tif").unlink()
    (tmp_path / "lab" / "s2.tif").unlink()
    F.write_plate_map(df, tmp_path / "pm.csv")
    with pytest.raises(FileNotFoundError, match=r"FileName_Image missing for 1 row\(s\): row 2: .*s1\.tif"):
        F.read_plate_map(tmp_path / "pm.csv")
    df2 = df.drop(index=1)
    F.write_plate_map(df2, tmp_path / "pm2.csv")
    with pytest.raises(FileNotFoundError, match=r"FileName_Labels missing .*row 2: .*s2\.tif"):
        F.read_plate_map(tmp_path / "pm2.csv")
    assert len(F.read_plate_map(tmp_path / "pm.csv", check_files=False)) == 3


def test_plate_map_duplicate_sites_and_missing_columns(tmp_path):
    df = _plate(tmp_path, np.random.default_rng(0))
    dup = pd.concat([df, df.iloc[[1]]], ignore_index=True)
    dup.to_csv(tmp_path / "dup.csv", index=False)  # bypass write_plate_map's own check
    with pytest.raises(ValueError, match=r"dup\.csv: duplicate \(plate, well, site\) in row\(s\) \[2, 4\]"):
        F.read_plate_map(tmp_path / "dup.csv")
    with pytest.raises(ValueError, match="duplicate"):
        F.write_plate_map(dup, tmp_path / "never.csv")
    assert not (tmp_path / "never.csv").exists()
    df.drop(columns=["Metadata_Dose"]).to_csv(tmp_path / "nodose.csv", index=False)
    with pytest.raises(ValueError, match=r"nodose\.csv: plate map lacks required column\(s\) \['Metadata_Dose'\]"):
        F.read_plate_map(tmp_path / "nodose.csv")
    bad = df.astype({"Metadata_Dose": object})
    bad.loc[2, "Metadata_Dose"] = "lots"
    bad.to_csv(tmp_path / "baddose.csv", index=False)
    with pytest.raises(ValueError, match=r"Metadata_Dose must be numeric; bad row\(s\) \[3\]"):
        F.read_plate_map(tmp_path / "baddose.csv")


# ----------------------------------------------------------------------------- stacks


def test_stack_round_trip_and_axes(tmp_path):
    rng = np.random.default_rng(1)
    a = _stack(rng)
    F.write_stack(tmp_path / "s.tif", a, F.CHANNELS)
    got = F.read_stack(tmp_path / "s.tif", channels=F.CHANNELS)
    assert got.dtype == np.float32 and got.shape == (3, 5, 8, 9)
    np.testing.assert_array_equal(got, a)
    # A file without axis metadata in another documented order is transposed to ZCYX.
    tifffile.imwrite(tmp_path / "zyxc.tif", a.transpose(0, 2, 3, 1), photometric="minisblack")
    np.testing.assert_array_equal(F.read_stack(tmp_path / "zyxc.tif", axes="ZYXC", channels=5), a)
    assert F.stack_shape(tmp_path / "s.tif") == (3, 5, 8, 9)


def test_stack_is_byte_identical_for_equal_input(tmp_path):
    a = _stack(np.random.default_rng(2))
    F.write_stack(tmp_path / "a.tif", a, F.CHANNELS)
    F.write_stack(tmp_path / "b.tif", a.copy(), F.CHANNELS)
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()


def test_corrupt_and_truncated_tiff(tmp_path):
    a = _stack(np.random.default_rng(3), y=32, x=32)
    F.write_stack(tmp_path / "ok.tif", a)
    data = (tmp_path / "ok.tif").read_bytes()
    (tmp_path / "trunc.tif").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all" * 10)
    for name in ("trunc.tif", "junk.tif"):
        with pytest.raises(ValueError, match=rf"{name}: .*corrupt or truncated"):
            F.read_stack(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        F.read_stack(tmp_path / "nope.tif")


def test_wrong_axis_order_or_channel_count(tmp_path):
    a = _stack(np.random.default_rng(4), z=4)
    F.write_stack(tmp_path / "czyx.tif", a.transpose(1, 0, 2, 3))  # recorded as ZCYX, really CZYX
    with pytest.raises(ValueError, match=r"czyx\.tif: expected 5 channels .* found 4.*axis Z has size 5"):
        F.read_stack(tmp_path / "czyx.tif", channels=F.CHANNELS)
    tifffile.imwrite(tmp_path / "meta.tif", a, metadata={"axes": "ZCYX"}, photometric="minisblack")
    with pytest.raises(ValueError, match=r"meta\.tif: the file records axes 'ZCYX' but 'CZYX'"):
        F.read_stack(tmp_path / "meta.tif", axes="CZYX")
    F.write_stack(tmp_path / "names.tif", a, ("DNA", "ER", "RNA", "Mito", "AGP"))
    with pytest.raises(ValueError, match=r"names\.tif: channel names .* differ"):
        F.read_stack(tmp_path / "names.tif", channels=F.CHANNELS)
    tifffile.imwrite(tmp_path / "3d.tif", a[:, 0], photometric="minisblack")
    with pytest.raises(ValueError, match=r"3d\.tif: expected a 4-D ZCYX stack, got shape \(4, 8, 9\)"):
        F.read_stack(tmp_path / "3d.tif")


def test_nan_and_constant_images(tmp_path):
    a = np.random.default_rng(5).random((2, 5, 6, 6)).astype(np.float32)
    b = a.copy()
    b[1, 2, 3, 4] = np.nan
    F.write_stack(tmp_path / "nan.tif", b)
    with pytest.raises(ValueError, match=r"nan\.tif: 1 NaN/inf voxel\(s\), first at \(z, c, y, x\) = \(1, 2, 3, 4\)"):
        F.read_stack(tmp_path / "nan.tif")
    c = a.copy()
    c[:, 3] = 7.0
    F.write_stack(tmp_path / "flat.tif", c, F.CHANNELS)
    with pytest.raises(ValueError, match=r"flat\.tif: channel\(s\) \['AGP'\] are constant"):
        F.read_stack(tmp_path / "flat.tif")


# ----------------------------------------------------------------------------- labels


def test_labels_round_trip_and_checks(tmp_path):
    lab = np.random.default_rng(6).integers(0, 70000, (3, 8, 9))
    F.write_labels(tmp_path / "big.tif", lab)
    assert tifffile.imread(tmp_path / "big.tif").dtype == np.uint32
    got = F.read_labels(tmp_path / "big.tif", expect_shape=(3, 5, 8, 9))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, lab)
    F.write_labels(tmp_path / "small.tif", lab % 100)
    assert tifffile.imread(tmp_path / "small.tif").dtype == np.uint16
    with pytest.raises(ValueError, match=r"small\.tif: label volume shape \(3, 8, 9\).*≠ image shape \(3, 8, 10\)"):
        F.read_labels(tmp_path / "small.tif", expect_shape=(3, 5, 8, 10))
    tifffile.imwrite(tmp_path / "float.tif", (lab % 100).astype(np.float32) + 0.5, photometric="minisblack")
    with pytest.raises(ValueError, match=r"float\.tif: labels must be integers"):
        F.read_labels(tmp_path / "float.tif")
    tifffile.imwrite(tmp_path / "4d.tif", np.zeros((2, 2, 3, 4), np.uint16), photometric="minisblack")
    with pytest.raises(ValueError, match=r"4d\.tif: labels must be a 3-D"):
        F.read_labels(tmp_path / "4d.tif")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    F.write_labels(tmp_path / "l.tif", np.ones((2, 3, 3), np.int32))
    before = (tmp_path / "l.tif").read_bytes()
    with pytest.raises(RuntimeError):
        with F.atomic_path(tmp_path / "l.tif") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert (tmp_path / "l.tif").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.tif"]
    # Folders are swapped whole.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_text("x")
    with F.atomic_path(tmp_path / "d") as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["new"]
    assert not any(F.is_temporary(p) for p in tmp_path.iterdir())


# ----------------------------------------------------------------------------- cells and crops


def test_cells_round_trip(tmp_path):
    df = pd.DataFrame({"Metadata_Well": ["A01", "B02"], "Metadata_Row": [0, 1], "Metadata_Padded": [True, False]})
    F.write_cells(df, tmp_path)
    pd.testing.assert_frame_equal(F.read_cells(tmp_path), df)
    with pytest.raises(FileNotFoundError, match="run tools/crop.py"):
        F.read_cells(tmp_path / "nowhere")


def test_crop_store_indexing_pickling_and_linking(tmp_path):
    rng = np.random.default_rng(7)
    im = rng.random((5, 2, 3, 4, 5)).astype(np.float16)
    m = rng.integers(0, 3, (5, 2, 3, 4)).astype(np.uint8)
    m[3] = 0  # an all-fill chunk that zarr never writes
    F.write_crop_store(tmp_path / "a.zarr", im, m, {"channels": list(F.CHANNELS)})
    with F.crop_store_writer(tmp_path / "b.zarr", 2, (2, 3, 4), 5, "float16") as w:
        w.write(0, im[:1], m[:1])
        w.write(1, im[1:2], m[1:2])
    F.write_crop_store(tmp_path / "e.zarr", im[:0], m[:0])
    F.link_crop_stores([tmp_path / "a.zarr", tmp_path / "e.zarr", tmp_path / "b.zarr"], tmp_path / "all.zarr")
    s = F.open_crops(tmp_path / "all.zarr")
    assert len(s) == 7 and s.channels == F.CHANNELS and s.image.dtype == np.float16
    ref_im, ref_m = np.concatenate([im, im[:2]]), np.concatenate([m, m[:2]])
    np.testing.assert_array_equal(s.image[:], ref_im)
    np.testing.assert_array_equal(s.mask[:], ref_m)
    np.testing.assert_array_equal(s.image[3], ref_im[3])
    idx = [6, 0, 3, 0, -1]
    np.testing.assert_array_equal(s.image[idx], ref_im[idx])
    np.testing.assert_array_equal(s.mask[np.array(idx)], ref_m[idx])
    np.testing.assert_array_equal(s.mask[2:5], ref_m[2:5])
    s2 = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(s2.mask[[1, 4]], ref_m[[1, 4]])
    with pytest.raises(ValueError, match="read-only"):
        s.image.zarr[0] = 0  # read-only
    with pytest.raises(ValueError, match="differs"):
        F.write_crop_store(tmp_path / "c.zarr", im[:, :1], m[:, :1])
        F.link_crop_stores([tmp_path / "a.zarr", tmp_path / "c.zarr"], tmp_path / "bad.zarr")
    assert not (tmp_path / "bad.zarr").exists()
