"""Physical voxel size (µm) from the plate map into segmentation settings and the cell table.

tools/segment.py's `resolve_physical_settings` is pure (plate-map rows in, pixel settings out),
so it is tested here without Cellpose. The crop step's µm columns are tested on their own and
on a plate imported from OME-TIFF (whose metadata give the voxel size) and cropped.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from _tools import load_tool
from test_readers import make_ome_tiff

from gradcamo_jax.data import crop as C
from gradcamo_jax.data import formats, readers

segment = load_tool("segment")


def plate_map(sizes: list[tuple[float, float, float]] | None) -> pd.DataFrame:
    """Plate-map rows (one per site, wells A01, A02, …) with the given (z, y, x) µm, or no size columns."""
    n = 3 if sizes is None else len(sizes)
    df = pd.DataFrame({"Metadata_Plate": "P1", "Metadata_Well": [f"A{i + 1:02d}" for i in range(n)],
                       "Metadata_Site": 1, "Metadata_Treatment": "DMSO", "Metadata_Dose": 0.0,
                       "FileName_Image": [f"s{i}.site.json" for i in range(n)]})
    if sizes is not None:
        for k, a in enumerate("ZYX"):
            df[f"Metadata_PhysicalSize{a}"] = [s[k] for s in sizes]
    return df


# ----------------------------------------------------------------------------- segmentation settings


def test_do3d_anisotropy_from_plate_map():
    pm = plate_map([(2.0, 0.65, 0.65)] * 3)
    cfg = segment.resolve_physical_settings(segment.SegmentConfig(do_3d=True), pm)
    assert cfg.anisotropy == pytest.approx(2.0 / 0.65) and cfg.voxel_size_um == (2.0, 0.65, 0.65)
    assert cfg.diameter is None  # pixels stay the model's unless --diameter(-um) is given
    assert segment.resolve_physical_settings(cfg, pm) == cfg  # resolving twice changes nothing
    assert cfg.to_json()["voxel_size_um"] == [2.0, 0.65, 0.65]
    # A user's --anisotropy wins, and then the sizes are not needed (mixed ones are no problem).
    mixed = plate_map([(2.0, 0.65, 0.65), (1.0, 0.65, 0.65)])
    given = segment.resolve_physical_settings(segment.SegmentConfig(do_3d=True, anisotropy=4.0), mixed)
    assert given.anisotropy == 4.0 and given.voxel_size_um is None
    # 2D mode (slices + stitching) does not use anisotropy; no sizes: left to Cellpose (isotropic).
    assert segment.resolve_physical_settings(segment.SegmentConfig(), pm).anisotropy is None
    assert segment.resolve_physical_settings(segment.SegmentConfig(do_3d=True), plate_map(None)).anisotropy is None
    # Z unknown (a 2D import): no anisotropy from it, the XY size is still recorded.
    flat = segment.resolve_physical_settings(segment.SegmentConfig(do_3d=True), plate_map([(np.nan, 0.65, 0.65)] * 2))
    assert flat.anisotropy is None and flat.voxel_size_um == (None, 0.65, 0.65)


def test_diameter_um_converts_with_xy_size():
    pm = plate_map([(1.0, 0.65, 0.65)] * 2)
    cfg = segment.resolve_physical_settings(segment.SegmentConfig(diameter_um=13.0), pm)
    assert cfg.diameter == pytest.approx(20.0) and cfg.voxel_size_um == (None, 0.65, 0.65)
    assert cfg.to_json()["diameter_um"] == 13.0 and cfg.to_json()["diameter"] == pytest.approx(20.0)
    with pytest.raises(segment.SegmentError, match=r"--diameter 30 \(pixels\) and --diameter-um 13 .*give one"):
        segment.resolve_physical_settings(segment.SegmentConfig(diameter=30.0, diameter_um=13.0), pm)
    for no_xy in (plate_map(None), plate_map([(1.0, np.nan, np.nan)] * 2)):
        with pytest.raises(segment.SegmentError, match=r"--diameter-um 13: the plate map has no XY pixel size .*"
                                                       r"--voxel-size Z,Y,X, or give --diameter in pixels"):
            segment.resolve_physical_settings(segment.SegmentConfig(diameter_um=13.0), no_xy)
    with pytest.raises(segment.SegmentError, match="not square"):
        segment.resolve_physical_settings(segment.SegmentConfig(diameter_um=13.0), plate_map([(1.0, 0.5, 0.65)]))
    with pytest.raises(segment.SegmentError, match="--diameter-um must be a positive number"):
        segment.SegmentConfig(diameter_um=0.0)


def test_mixed_sizes_are_refused_naming_the_sites():
    pm = plate_map([(2.0, 0.65, 0.65), (2.0, 0.65, 0.65), (2.0, 0.325, 0.325), (2.0, np.nan, np.nan)])
    with pytest.raises(segment.SegmentError) as e:
        segment.resolve_physical_settings(segment.SegmentConfig(diameter_um=10.0), pm)
    msg = str(e.value)
    assert "Metadata_PhysicalSizeY differs between sites" in msg
    assert "0.65 µm: 2 site(s) (P1_A01_s1, P1_A02_s1)" in msg and "0.325 µm: 1 site(s) (P1_A03_s1)" in msg
    assert "unknown: 1 site(s) (P1_A04_s1)" in msg and "segment the groups separately" in msg
    pm = plate_map([(2.0, 0.65, 0.65), (1.0, 0.65, 0.65)])
    with pytest.raises(segment.SegmentError, match=r"PhysicalSizeZ differs .*2 µm: 1 site\(s\) \(P1_A01_s1\)"):
        segment.resolve_physical_settings(segment.SegmentConfig(do_3d=True), pm)
    # Sizes equal to 4 significant digits (µm ↔ m round trips) are one size.
    close = plate_map([(1.0, 0.65, 0.65), (1.0, 0.6500001, 0.6500001)])
    assert segment.resolve_physical_settings(segment.SegmentConfig(diameter_um=6.5), close).diameter == pytest.approx(10.0)


def test_cli_flag_and_recorded_config(tmp_path):
    args = segment._build_parser().parse_args(["run", "--plate-map", "pm.csv", "--out", "o", "--diameter-um", "13",
                                               "--do-3d"])
    cfg = segment.config_from_args(args)
    assert cfg.diameter_um == 13.0 and cfg.anisotropy is None
    resolved = segment.resolve_physical_settings(cfg, plate_map([(2.0, 0.65, 0.65)]))
    segment._check_config(tmp_path, resolved, overwrite=False)
    doc = formats.read_json(tmp_path / "segment_config.json")
    assert doc["voxel_size_um"] == [2.0, 0.65, 0.65] and doc["diameter"] == pytest.approx(20.0)
    assert doc["anisotropy"] == pytest.approx(2.0 / 0.65) and doc["diameter_um"] == 13.0
    # Without physical settings the record has exactly the keys it had before they existed.
    assert set(segment.SegmentConfig().to_json()) == {f.name for f in dataclasses.fields(segment.SegmentConfig)} - {
        "diameter_um", "voxel_size_um"}


# ----------------------------------------------------------------------------- cell table


def test_physical_measures():
    table = pd.DataFrame({"Metadata_Centroid_Z": [0.0, 2.0], "Metadata_Centroid_Y": [1.0, 3.5],
                          "Metadata_Centroid_X": [4.0, 0.5], "Metadata_Volume": [10, 3]})
    m = C.physical_measures(table, np.array([2.0, 0.5, 0.25]))
    np.testing.assert_allclose(m.Metadata_Centroid_Z_um, [0.0, 4.0])
    np.testing.assert_allclose(m.Metadata_Centroid_Y_um, [0.5, 1.75])
    np.testing.assert_allclose(m.Metadata_Centroid_X_um, [1.0, 0.125])
    np.testing.assert_allclose(m.Metadata_Volume_um3, [10 * 0.25, 3 * 0.25])
    np.testing.assert_allclose(m.Metadata_PhysicalSizeY, [0.5, 0.5])
    unknown_z = C.physical_measures(table, np.array([np.nan, 0.5, 0.5]))
    assert unknown_z.Metadata_Centroid_Z_um.isna().all() and unknown_z.Metadata_Volume_um3.isna().all()
    np.testing.assert_allclose(unknown_z.Metadata_Centroid_Y_um, [0.5, 1.75])
    for row, want in (({}, [np.nan] * 3), ({"Metadata_PhysicalSizeZ": "2", "Metadata_PhysicalSizeY": np.nan,
                                            "Metadata_PhysicalSizeX": 0.0}, [2.0, np.nan, np.nan])):
        np.testing.assert_array_equal(C.site_voxel_size(row), want)


def test_imported_plate_voxel_size_reaches_segment_and_cells(tmp_path):
    """OME-TIFF metadata (z 1 µm, xy 0.5 µm) → plate map → segment settings and µm columns per cell."""
    out = tmp_path / "pm.csv"
    readers.import_plate("ome-tiff", make_ome_tiff(tmp_path, nz=3), out=out)
    pm = formats.read_plate_map(out)
    cfg = segment.resolve_physical_settings(segment.SegmentConfig(do_3d=True, diameter_um=5.0), pm)
    assert (cfg.anisotropy, cfg.diameter, cfg.voxel_size_um) == (2.0, 10.0, (1.0, 0.5, 0.5))
    labels = np.zeros((3, 16, 16), np.int32)
    labels[0:2, 2:6, 3:8] = 1
    labels[1:3, 9:14, 8:12] = 2
    for row in pm.itertuples():
        formats.write_labels(tmp_path / "labels" / formats.labels_name(
            formats.site_id(row.Metadata_Plate, row.Metadata_Well, row.Metadata_Site)), labels)
    config = C.CropConfig(crop_size=(3, 8, 8), workers=0, min_volume=1, labels_dir=str(tmp_path / "labels"))
    cells = formats.read_cells(C.crop_plate(pm, tmp_path / "ds", config))
    assert len(cells) == 2 * len(pm)
    assert (cells.Metadata_PhysicalSizeZ == 1.0).all() and (cells.Metadata_PhysicalSizeX == 0.5).all()
    np.testing.assert_allclose(cells.Metadata_Volume_um3, cells.Metadata_Volume * 1.0 * 0.5 * 0.5)
    for a, s in zip("ZYX", (1.0, 0.5, 0.5)):
        np.testing.assert_allclose(cells[f"Metadata_Centroid_{a}_um"], cells[f"Metadata_Centroid_{a}"] * s)
    # A plate map without sizes: the same columns, NaN (unknown), never a silent 1 µm.
    bare = pm.drop(columns=[f"Metadata_PhysicalSize{a}" for a in "ZYX"])
    cells = formats.read_cells(C.crop_plate(bare, tmp_path / "ds_bare", config))
    for col in ("Metadata_PhysicalSizeZ", "Metadata_Centroid_X_um", "Metadata_Volume_um3"):
        assert cells[col].isna().all()
