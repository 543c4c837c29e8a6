"""Plate layouts read in place (gradcamo_jax.data.readers): each test writes a tiny plate in one
vendor's naming and metadata, with known pixels, imports it and reads every site back exactly."""

from __future__ import annotations

import argparse
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from gradcamo_jax.data import formats, readers

CH = formats.CHANNELS
WELLS = ("A01", "B02")
SITES = (1, 2)
SIZE = 16


def pixels(plate: str, well: str, site: int, nz: int = 3, nc: int = 5) -> np.ndarray:
    """The (Z, C, Y, X) uint16 pixels of one test site: random, different for every site and channel."""
    rng = np.random.default_rng(zlib.crc32(f"{plate}/{well}/{site}".encode()))
    return rng.integers(0, 4096, size=(nz, nc, SIZE, SIZE), dtype=np.uint16)


def write_tiff(path: Path, data: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data, photometric="minisblack", **kw)


def row_col(well: str) -> tuple[int, int]:
    return ord(well[0]) - ord("A") + 1, int(well[1:])


def assert_sites(df: pd.DataFrame, report: readers.ImportReport, plate: str, nz: int, base: Path | None = None,
                 nc: int = 5) -> None:
    """Every row reads back exactly the written pixels, through the descriptor when one was written."""
    assert list(zip(df["Metadata_Well"], df["Metadata_Site"])) == [(w, s) for w in WELLS for s in SITES]
    assert set(df["Metadata_Plate"]) == {plate}
    for (_, row), site in zip(df.iterrows(), report.sites):
        want = pixels(plate, row["Metadata_Well"], row["Metadata_Site"], nz)[:, :nc].astype(np.float32)
        got = readers.read_site(site)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        if base is not None:
            np.testing.assert_array_equal(readers.read_site_file(base / row["FileName_Image"], channels=CH[:nc]), want)


# ----------------------------------------------------------------------------- layout writers


def make_loaddata(tmp: Path, nz: int = 3, frames: bool = False, plate: str = "BR001",
                  illum: np.ndarray | None = None) -> tuple[Path, Path]:
    """A Cell Painting Gallery plate: images/, load_data_with_illum.csv-style load_data.csv (FileName_Illum<Ch>
    → illum/<plate>_Illum<Ch>.npy), barcode_platemap.csv → platemap/PM1.txt.

    ``illum``: (C, Y, X) illumination functions written for the five channels; default all ones, so
    the corrected pixels are the written ones exactly."""
    images = tmp / "images" / plate
    (tmp / "illum").mkdir(parents=True, exist_ok=True)
    for c, ch in enumerate(CH):
        np.save(tmp / "illum" / f"{plate}_Illum{ch}.npy", np.ones((SIZE, SIZE)) if illum is None else illum[c])
    rows = []
    for well in WELLS:
        for site in SITES:
            a = pixels(plate, well, site, nz)
            for z in range(nz):
                row = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site, "Metadata_Row": well[0]}
                if nz > 1:
                    row["Metadata_Plane"] = z + 1
                    row["Metadata_AbsPositionZ"] = 0.5 * z  # varies per plane: not carried
                for c, ch in enumerate((*CH, "Brightfield")):
                    plane = a[:, c] if c < 5 else np.full((nz, SIZE, SIZE), 7, np.uint16)
                    if frames:
                        name = f"{well}_s{site}_{ch}.tiff"
                        if z == 0:
                            write_tiff(images / name, plane)  # all planes as frames of one file
                        row[f"Frame_Orig{ch}"] = z
                    else:
                        name = f"r{well}_s{site}_z{z + 1}_{ch}.tiff"
                        write_tiff(images / name, plane[z])
                    row[f"FileName_Orig{ch}"] = name
                    row[f"PathName_Orig{ch}"] = str(images)
                for ch in CH:  # load_data_with_illum.csv columns: not images of the site
                    row[f"FileName_Illum{ch}"] = f"{plate}_Illum{ch}.npy"
                    row[f"PathName_Illum{ch}"] = str(tmp / "illum")
                rows.append(row)
    csv = tmp / "workspace" / "load_data_csv" / "batch1" / plate / "load_data.csv"
    csv.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(csv, index=False)
    pm = tmp / "metadata" / "platemaps" / "batch1"
    (pm / "platemap").mkdir(parents=True)
    pd.DataFrame({"Assay_Plate_Barcode": [plate], "Plate_Map_Name": ["PM1"]}).to_csv(pm / "barcode_platemap.csv", index=False)
    (pm / "platemap" / "PM1.txt").write_text(
        "well_position\tbroad_sample\tmmoles_per_liter\tsolvent\n"
        "A01\t\t\tDMSO\n"                     # the Gallery leaves the DMSO wells' broad_sample empty
        "B02\tBRD-K01\t10\tDMSO\n"
        "C03\tBRD-K02\t3.3\tDMSO\n"           # a platemap well without images
    )
    return csv, pm / "barcode_platemap.csv"


PHENIX_ORDER = (4, 0, 1, 2, 3)  # file channel k holds output channel PHENIX_ORDER[k]: ch1 = Mito, ch2 = DNA, …
PHENIX_NAMES = ("HOECHST 33342", "Concanavalin A 488", "SYTO14 488 long", "Phalloidin/WGA 568", "MitoTracker Deep Red")


def make_phenix(tmp: Path, xml: bool = True, nz: int = 3, plate: str = "P2") -> Path:
    """A Harmony export: <barcode>__<date>-Measurement 1/Images/r01c01f01p01-ch1sk1fk1fl1.tiff + Index.idx.xml."""
    folder = tmp / f"{plate}__2024-05-02T16_02_51-Measurement 1" / "Images"
    images = []
    for well in WELLS:
        r, c = row_col(well)
        for site in SITES:
            a = pixels(plate, well, site, nz)
            for z in range(nz):
                for k in range(6):  # ch6 = brightfield, not a Cell Painting channel
                    data = a[z, PHENIX_ORDER[k]] if k < 5 else np.full((SIZE, SIZE), 9, np.uint16)
                    name = f"r{r:02d}c{c:02d}f{site:02d}p{z + 1:02d}-ch{k + 1}sk1fk1fl1.tiff"
                    write_tiff(folder / name, data)
                    chname = PHENIX_NAMES[PHENIX_ORDER[k]] if k < 5 else "Brightfield"
                    images.append(
                        f'<Image Version="1"><id>{r:02d}{c:02d}K1F{site}P{z + 1}R{k + 1}</id><State>Ok</State>'
                        f"<URL>{name}</URL><Row>{r}</Row><Col>{c}</Col><FieldID>{site}</FieldID><PlaneID>{z + 1}</PlaneID>"
                        f"<TimepointID>0</TimepointID><FlimID>1</FlimID><ChannelID>{k + 1}</ChannelID>"
                        f"<ChannelName>{chname}</ChannelName>"
                        '<ImageResolutionX Unit="m">6.5E-07</ImageResolutionX><ImageResolutionY Unit="m">6.5E-07</ImageResolutionY>'
                        f'<ImageSizeX>{SIZE}</ImageSizeX><ImageSizeY>{SIZE}</ImageSizeY>'
                        f'<PositionZ Unit="m">{(z - 1) * 2e-6:.1E}</PositionZ></Image>'
                    )
    if xml:
        (folder / "Index.idx.xml").write_text(
            '<?xml version="1.0" encoding="utf-8"?>\n<EvaluationInputData xmlns:xsd="http://www.w3.org/2001/XMLSchema" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" Version="2" xmlns="http://www.perkinelmer.com/PEHH/HarmonyV6">'
            "<User>Harmony</User><InstrumentType>Phenix</InstrumentType>"
            f"<Plates><Plate><PlateID>1234</PlateID><Name>{plate}</Name><PlateRows>16</PlateRows><PlateColumns>24</PlateColumns>"
            "</Plate></Plates><Images>" + "".join(images) + "</Images></EvaluationInputData>"
        )
    return folder.parent


IX_WAVES = ("DAPI", "Concanavalin A", "SYTO 14", "Phalloidin", "MitoTracker")


def make_imagexpress(tmp: Path, nz: int = 3, plate: str = "IXP") -> Path:
    """A MetaXpress export: <plate>/TimePoint_1/ZStep_<k>/<plate>_<well>_s<site>_w<wave><GUID>.tif + <plate>.HTD."""
    folder = tmp / plate
    for well in WELLS:
        for site in SITES:
            a = pixels(plate, well, site, nz)
            for z in range(nz):
                for c in range(5):
                    # GUID glued to the wavelength (real MetaXpress) for A01, a short "_uuid" for B02.
                    tail = f"{c + 1}{zlib.crc32(f'{well}{site}{z}{c}'.encode()):08X}-1B2C-4D5E-8F90-A1B2C3D4E5F6" \
                        if well == "A01" else f"{c + 1}_AB{c}"
                    sub = folder / "TimePoint_1" / (f"ZStep_{z + 1}" if nz > 1 else "")
                    desc = ('<MetaData><PlaneInfo><prop id="spatial-calibration-x" type="float" value="0.325"/>'
                            '<prop id="spatial-calibration-y" type="float" value="0.325"/>'
                            '<prop id="spatial-calibration-units" type="string" value="um"/>'
                            f'<prop id="z-position" type="float" value="{1000 + 1.5 * z}"/></PlaneInfo></MetaData>')
                    write_tiff(sub / f"{plate}_{well}_s{site}_w{tail}.tif", a[z, c], description=desc,
                               software="MetaSeries", metadata=None)
    if nz > 1:  # MetaXpress also saves projections beside the ZStep folders, and thumbnails
        write_tiff(folder / "TimePoint_1" / f"{plate}_A01_s1_w1.tif", np.zeros((SIZE, SIZE), np.uint16))
    write_tiff(folder / "TimePoint_1" / f"{plate}_A01_s1_w1_thumb0A1B.tif", np.zeros((4, 4), np.uint16))
    (folder / f"{plate}.HTD").write_text('"HTSInfoFile", Version 1.0\n"NWavelengths", 5\n'
                                         + "".join(f'"WaveName{i + 1}", "{n}"\n' for i, n in enumerate(IX_WAVES)))
    return folder


OME_NAMES = ("Hoechst 33342", "ConA", "SYTO 14", "Phalloidin", "MitoTracker")


def make_ome_tiff(tmp: Path, nz: int = 3, plate: str = "OT1", px: dict | None = None) -> Path:
    """One OME-TIFF per site named <plate>_<well>_s<site>.ome.tif, stored CZYX with names and physical sizes."""
    folder = tmp / "ome"
    for well in WELLS:
        for site in SITES:
            a = pixels(plate, well, site, nz)
            size = (px or {}).get((well, site), 0.5)
            write_tiff(folder / f"{plate}_{well}_s{site}.ome.tif", np.ascontiguousarray(a.transpose(1, 0, 2, 3)), ome=True,
                       metadata={"axes": "CZYX", "Channel": {"Name": list(OME_NAMES)}, "PhysicalSizeX": size,
                                 "PhysicalSizeY": size, "PhysicalSizeZ": 1.0, "PhysicalSizeXUnit": "µm"})
    return folder


ZARR_ORDER = (4, 0, 1, 2, 3)  # stored channel k is output channel ZARR_ORDER[k]


def make_ome_zarr(tmp: Path, version: str = "0.5", nz: int = 3, plate: str = "ZP") -> Path:
    """An NGFF HCS plate: plate → A/1, B/2 → fields 0, 1 → multiscales levels 0 (full) and 1, axes tczyx."""
    import zarr

    path = tmp / f"{plate}.ome.zarr"
    root = zarr.open_group(path, mode="w", zarr_format=3 if version == "0.5" else 2)
    rows, cols = sorted({w[0] for w in WELLS}), sorted({int(w[1:]) for w in WELLS})
    wells = [{"path": f"{w[0]}/{int(w[1:])}", "rowIndex": rows.index(w[0]), "columnIndex": cols.index(int(w[1:]))} for w in WELLS]
    plate_meta = {"name": plate, "rows": [{"name": r} for r in rows], "columns": [{"name": str(c)} for c in cols],
                  "wells": wells, "field_count": len(SITES), "version": version}

    def put(group, meta):
        group.attrs.update({"ome": {"version": version, **meta}} if version == "0.5" else meta)

    put(root, {"plate": plate_meta})
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    for well, w in zip(WELLS, wells):
        wg = root.require_group(w["path"])
        put(wg, {"well": {"images": [{"path": str(k)} for k in range(len(SITES))]}})
        for k, site in enumerate(SITES):
            ig = wg.require_group(str(k))
            a = pixels(plate, well, site, nz)[:, list(ZARR_ORDER)]  # (Z, C, Y, X) in stored channel order
            full = np.ascontiguousarray(a.transpose(1, 0, 2, 3))[None]  # (T, C, Z, Y, X)
            for level, data in enumerate((full, full[..., ::2, ::2])):
                arr = ig.create_array(str(level), shape=data.shape, chunks=(1, 1, 1, *data.shape[-2:]), dtype=data.dtype)
                arr[...] = data
            put(ig, {"multiscales": [{"axes": axes, "datasets": [
                {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 2.0, 0.4 * 2**level, 0.4 * 2**level]}]}
                for level in range(2)]}],
                "omero": {"channels": [{"label": CH[i]} for i in ZARR_ORDER]}})
    return path


def simple_platemap(tmp: Path, wells: dict[str, tuple[str, float]]) -> Path:
    path = tmp / "platemap.csv"
    pd.DataFrame({"Metadata_Well": list(wells), "Metadata_Treatment": [t for t, _ in wells.values()],
                  "Metadata_Dose": [d for _, d in wells.values()]}).to_csv(path, index=False)
    return path


# ----------------------------------------------------------------------------- the five layouts


def test_loaddata_gallery_3d(tmp_path):
    csv, barcode = make_loaddata(tmp_path)
    out = tmp_path / "out" / "plate_map.csv"
    df, report = readers.import_plate("loaddata", csv.parents[2], platemap=barcode.parent, out=out)
    assert_sites(df, report, "BR001", 3, base=out.parent)
    # DMSO (empty broad_sample) → dose 0; treatments and doses from the platemap .txt.
    assert df.groupby("Metadata_Well")[["Metadata_Treatment", "Metadata_Dose"]].first().to_dict("index") == {
        "A01": {"Metadata_Treatment": "DMSO", "Metadata_Dose": 0.0},
        "B02": {"Metadata_Treatment": "BRD-K01", "Metadata_Dose": 10.0}}
    assert set(df["Metadata_solvent"]) == {"DMSO"} and set(df["Metadata_Row"]) == {"A", "B"}
    assert "Metadata_AbsPositionZ" not in df.columns
    assert report.channels == {c: f"Orig{c}" for c in CH} and report.unused_channels == ["OrigBrightfield"]
    assert report.planes == {3: 4} and report.treatment_columns == [("broad_sample", "mmoles_per_liter")]
    assert any("C03" in w and "no images" in w for w in report.warnings)
    assert any("OrigBrightfield" in w for w in report.warnings)
    # The CSV's FileName_Illum<Ch> columns are applied (all-ones functions here, so the pixels are unchanged).
    assert report.illum == {c: [str(tmp_path / "illum" / f"BR001_Illum{c}.npy")] for c in CH}
    # The written plate map passes formats' own validation (FileName_Image exists, relative to the map).
    pm = formats.read_plate_map(out)
    assert len(pm) == 4 and all(p.endswith(readers.SITE_SUFFIX) for p in pm["FileName_Image"])


def test_loaddata_2d_and_frames(tmp_path):
    csv, barcode = make_loaddata(tmp_path / "flat", nz=1)
    df, report = readers.import_plate("loaddata", csv, platemap=barcode)
    assert report.planes == {1: 4}
    assert_sites(df, report, "BR001", 1)  # a 2D plate reads as Z = 1
    # PathName from the Gallery bucket, mapped onto a local mirror.
    table = pd.read_csv(csv)
    local = str(tmp_path / "flat" / "images")
    for c in table.columns:
        if c.startswith("PathName_"):
            table[c] = table[c].str.replace(local, "s3://cellpainting-gallery/cpg0000/images", regex=False)
    table.to_csv(csv, index=False)
    with pytest.raises(readers.LayoutError, match="--path-map"):
        readers.import_plate("loaddata", csv, platemap=barcode)
    df, report = readers.import_plate("loaddata", csv, platemap=barcode, path_map={"s3://cellpainting-gallery/cpg0000/images": local})
    assert_sites(df, report, "BR001", 1)
    csv, barcode = make_loaddata(tmp_path / "frames", frames=True)
    df, report = readers.import_plate("loaddata", csv, platemap=barcode)
    assert {ref.frame for s in report.sites for plane in s.planes for ref in plane} == {0, 1, 2}
    assert_sites(df, report, "BR001", 3)


def test_loaddata_stack_files(tmp_path):
    """CellProfiler 3D: one row per site, each channel file a (Z, Y, X) stack read whole."""
    rows = []
    for well in WELLS:
        for site in SITES:
            a = pixels("S3D", well, site, 4)
            row = {"Metadata_Plate": "S3D", "Metadata_Well": well, "Metadata_Site": site}
            for c, ch in enumerate(CH):
                write_tiff(tmp_path / "img" / f"{well}_{site}_{ch}.tif", a[:, c])
                row |= {f"FileName_{ch}": f"{well}_{site}_{ch}.tif", f"PathName_{ch}": "img"}  # relative to the CSV
            rows.append(row)
    pd.DataFrame(rows).to_csv(tmp_path / "load_data.csv", index=False)
    df, report = readers.import_plate("loaddata", tmp_path / "load_data.csv")
    assert report.planes == {4: 4} and report.channels == {c: c for c in CH}
    assert_sites(df, report, "S3D", 4)


def test_phenix_with_index_xml(tmp_path):
    src = make_phenix(tmp_path)
    pm = simple_platemap(tmp_path, {"A1": ("DMSO", 0.1), "B2": ("drugX", 1.5)})
    df, report = readers.import_plate("phenix", src, platemap=pm)
    assert_sites(df, report, "P2", 3)  # channels reordered by name: ch2 (HOECHST) is DNA, ch1 is Mito
    assert report.channels["DNA"] == "HOECHST 33342" and report.channels["Mito"] == "MitoTracker Deep Red"
    assert report.unused_channels == ["Brightfield"]
    assert report.voxel_sizes == [(pytest.approx(2.0), pytest.approx(0.65), pytest.approx(0.65))]
    assert df[["Metadata_PhysicalSizeZ", "Metadata_PhysicalSizeY"]].iloc[0].tolist() == pytest.approx([2.0, 0.65])
    assert df.set_index(["Metadata_Well", "Metadata_Site"]).loc[("A01", 1), "Metadata_Dose"] == 0.0  # DMSO: dose 0
    assert df.set_index(["Metadata_Well", "Metadata_Site"]).loc[("B02", 2), "Metadata_Dose"] == 1.5
    # The descriptor round-trips through JSON.
    site = report.sites[0]
    readers.write_site_file(site, tmp_path / "s.site.json")
    assert readers.load_site(tmp_path / "s.site.json") == site


def test_phenix_without_xml_needs_channel_map(tmp_path):
    src = make_phenix(tmp_path, xml=False)
    with pytest.raises(readers.LayoutError, match=r"--channel-map DNA=ch1,ER=ch2") as e:
        readers.import_plate("phenix", src)
    assert "no channel found" in str(e.value)  # numbered channels are never guessed
    mapping = {CH[o]: f"ch{k + 1}" for k, o in enumerate(PHENIX_ORDER)}
    df, report = readers.import_plate("phenix", src, channel_map=mapping)
    assert report.channels == {c: mapping[c] for c in CH} and report.unused_channels == ["ch6"]
    assert set(df["Metadata_Treatment"]) == {"unknown"} and report.voxel_sizes == [(None, None, None)]
    assert_sites(df, report, "P2", 3)
    # An override beats the table too: call the brightfield "Mito" and Mito's file drops out.
    _, report = readers.import_plate("phenix", src, channel_map={**mapping, "Mito": "ch6"})
    assert report.channels["Mito"] == "ch6" and "ch1" in report.unused_channels


def test_imagexpress_zsteps(tmp_path):
    src = make_imagexpress(tmp_path)
    df, report = readers.import_plate("imagexpress", src, platemap=simple_platemap(tmp_path, {"A01": ("DMSO", 0), "B02": ("t", 2)}))
    assert_sites(df, report, "IXP", 3)
    assert report.channels == dict(zip(CH, IX_WAVES))
    assert report.voxel_sizes == [(pytest.approx(1.5), pytest.approx(0.325), pytest.approx(0.325))]
    assert any("projection" in n for n in report.notes) and any("thumbnail" in n for n in report.notes)


def test_imagexpress_2d_single_wavelength(tmp_path):
    folder = tmp_path / "plate7"
    for well in WELLS:
        for site in SITES:
            write_tiff(folder / f"{well}_s{site}.tif", pixels("plate7", well, site, 1)[0, 0])
    df, report = readers.import_plate("imagexpress", folder, channels=("DNA",), channel_map={"DNA": "w1"})
    assert report.planes == {1: 4}
    assert_sites(df, report, "plate7", 1, nc=1)


def test_ome_tiff_czyx(tmp_path):
    src = make_ome_tiff(tmp_path)
    df, report = readers.import_plate("ome-tiff", src, platemap=simple_platemap(tmp_path, {"A01": ("DMSO", 0), "B02": ("t", 2)}))
    assert_sites(df, report, "OT1", 3)
    assert report.channels == dict(zip(CH, OME_NAMES))
    assert report.voxel_sizes == [(1.0, 0.5, 0.5)] and report.sites[0].array.axes == "TCZYXS"


def test_ome_tiff_hcs_plate_metadata(tmp_path):
    """One OME-TIFF holding a plate: sites come from OME Plate/Well/WellSample, not from the name."""
    path = tmp_path / "whole_plate.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as w:
        for well in WELLS:
            for site in SITES:
                w.write(pixels("HP", well, site, 2), photometric="minisblack",
                        metadata={"axes": "ZCYX", "Channel": {"Name": list(CH)}})
    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
    samples = {well: "".join(f'<WellSample ID="WellSample:{i}:{s}" Index="{2 * i + s}"><ImageRef ID="Image:{2 * i + s}"/></WellSample>'
                             for s in range(2)) for i, well in enumerate(WELLS)}
    plate = '<Plate ID="Plate:0" Name="HP">' + "".join(
        f'<Well ID="Well:{i}" Row="{row_col(w)[0] - 1}" Column="{row_col(w)[1] - 1}">{samples[w]}</Well>' for i, w in enumerate(WELLS)
    ) + "</Plate>"
    tifffile.tiffcomment(path, re.sub(r"(<OME [^>]*>)", lambda m: m.group(1) + plate, xml, count=1).encode())
    df, report = readers.import_plate("ome-tiff", path)
    assert_sites(df, report, "HP", 2)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_hcs(tmp_path, version):
    src = make_ome_zarr(tmp_path, version)
    out = tmp_path / "pm.parquet"
    df, report = readers.import_plate("ome-zarr", src, platemap=simple_platemap(tmp_path, {"A01": ("DMSO", 0), "B02": ("t", 2)}),
                                      out=out)
    assert_sites(df, report, "ZP", 3, base=out.parent)
    assert report.voxel_sizes == [(2.0, 0.4, 0.4)] and report.sites[0].array.key == "A/1/0/0"
    assert report.unused_channels == []


# ----------------------------------------------------------------------------- bad inputs


def test_missing_channel_file_names_site_and_file(tmp_path):
    src = make_phenix(tmp_path)
    gone = "r02c02f02p02-ch3sk1fk1fl1.tiff"
    (src / "Images" / gone).unlink()
    (src / "Images" / "r01c01f01p01-ch6sk1fk1fl1.tiff").unlink()  # brightfield is not used: not a problem
    with pytest.raises(readers.LayoutError) as e:
        readers.import_plate("phenix", src)
    msg = str(e.value)
    assert "site P2 B02 s2" in msg and gone in msg and "--skip-incomplete" in msg
    assert len(e.value.problems) == 1
    df, report = readers.import_plate("phenix", src, skip_incomplete=True)
    assert len(df) == 3 and len(report.skipped) == 1 and gone in report.skipped[0]


def test_missing_loaddata_file_and_plane(tmp_path):
    csv, _ = make_loaddata(tmp_path)
    (tmp_path / "images" / "BR001" / "rA01_s2_z3_ER.tiff").unlink()
    table = pd.read_csv(csv)
    table = table.drop(index=table.index[(table.Metadata_Well == "B02") & (table.Metadata_Site == 1) & (table.Metadata_Plane == 2)])
    table.to_csv(csv, index=False)
    with pytest.raises(readers.LayoutError) as e:
        readers.import_plate("loaddata", csv)
    msg = str(e.value)
    assert "site BR001 A01 s2" in msg and "rA01_s2_z3_ER.tiff does not exist" in msg
    assert "site BR001 B02 s1" in msg and "no FileName_OrigDNA at Metadata_Plane=2" in msg


def test_image_well_in_no_platemap(tmp_path):
    src = make_phenix(tmp_path)
    pm = simple_platemap(tmp_path, {"A01": ("DMSO", 0), "H12": ("drugX", 1)})
    with pytest.raises(readers.LayoutError, match=r"plate P2 well B02: 2 site\(s\).*in no platemap"):
        readers.import_plate("phenix", src, platemap=pm)
    df, report = readers.import_plate("phenix", src, platemap=pm, skip_unmapped_wells=True)
    assert set(df["Metadata_Well"]) == {"A01"} and "B02" in report.skipped[0]
    assert any("H12" in w and "no images" in w for w in report.warnings)


def test_mixed_pixel_sizes(tmp_path):
    src = make_ome_tiff(tmp_path, px={("B02", 2): 0.65})
    with pytest.raises(readers.LayoutError, match="different voxel sizes") as e:
        readers.import_plate("ome-tiff", src)
    assert "site OT1 B02 s2" in str(e.value) and "OT1_B02_s2.ome.tif" in str(e.value)
    _, report = readers.import_plate("ome-tiff", src, allow_mixed_voxel_size=True)
    assert any("different voxel sizes" in w for w in report.warnings)


def test_platemap_problems_reported_together(tmp_path):
    csv, barcode = make_loaddata(tmp_path)
    (barcode.parent / "platemap" / "PM1.txt").write_text("well_position\tbroad_sample\tmmoles_per_liter\nA01\tBRD-1\tn/a\n")
    with pytest.raises(readers.LayoutError) as e:
        readers.import_plate("loaddata", csv, platemap=barcode)
    msg = str(e.value)
    assert "no numeric dose" in msg and "A01 (BRD-1" in msg and "well B02" in msg and "in no platemap" in msg
    assert "well A01" not in msg  # listed with a bad dose: reported once, as that
    pd.DataFrame({"Assay_Plate_Barcode": ["OTHER"], "Plate_Map_Name": ["PM1"]}).to_csv(barcode, index=False)
    with pytest.raises(readers.LayoutError, match=r"plate BR001: not in .*barcode_platemap.csv"):
        readers.import_plate("loaddata", csv, platemap=barcode)


def test_read_time_errors_name_the_file(tmp_path):
    src = make_phenix(tmp_path)
    _, report = readers.import_plate("phenix", src)
    site = report.sites[0]
    with pytest.raises(ValueError, match=r"channels .* differ from the expected"):
        readers.read_site(site, channels=("DNA", "ER"))
    f = Path(site.root) / site.planes[1][2].file
    good = f.read_bytes()
    f.write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match=re.escape(str(f))) as e:
        readers.read_site(site)
    # A bad header is a damaged file, not a bad Frame_ column (tifffile's TiffFileError is a ValueError).
    assert "not a readable TIFF" in str(e.value) and "corrupt or truncated" in str(e.value)
    assert site.label in str(e.value) and "Frame_" not in str(e.value)
    f.write_bytes(good[: len(good) // 2])  # header intact, pixel data cut off
    with pytest.raises(ValueError, match=re.escape(str(f))) as e:
        readers.read_site(site)
    assert "corrupt or truncated" in str(e.value) and site.label in str(e.value) and "Frame_" not in str(e.value)
    f.unlink()
    with pytest.raises(FileNotFoundError, match="re-run the import"):
        readers.read_site(site)
    # A frame beyond the file's pages is the Frame_ column's fault, and says so.
    write_tiff(tmp_path / "one.tif", pixels("F", "A01", 1, 1)[0, 0])
    framed = readers.Site("F", "A01", 1, "loaddata", ("DNA",), ("OrigDNA",), str(tmp_path),
                          planes=((readers.PlaneRef("one.tif", 3),),))
    with pytest.raises(ValueError, match=r"site F A01 s1: .*one\.tif frame 3: .*has 1 page\(s\); fix the Frame_ column"):
        readers.read_site(framed)


def test_timepoint_choice(tmp_path):
    """phenix and imagexpress choose a timepoint alike: several need --timepoint, an absent one is named."""
    ix = make_imagexpress(tmp_path / "ix", nz=1)
    with pytest.raises(readers.LayoutError, match=r"no files of timepoint TimePoint_2 \(found TimePoint_\[1\]\)"):
        readers.import_plate("imagexpress", ix, timepoint=2)
    phenix = make_phenix(tmp_path / "ph", nz=1)
    with pytest.raises(readers.LayoutError, match=r"no files of timepoint sk2 \(found sk\[1\]\)"):
        readers.import_plate("phenix", phenix, timepoint=2)
    (ix / "TimePoint_1").rename(ix / "TimePoint_2")
    write_tiff(ix / "TimePoint_1" / "IXP_A01_s1_w1.tif", np.ones((SIZE, SIZE), np.uint16))
    with pytest.raises(readers.LayoutError, match=r"2 timepoints \(TimePoint_\[1, 2\]\); choose one with --timepoint"):
        readers.import_plate("imagexpress", ix)
    df, report = readers.import_plate("imagexpress", ix, timepoint=2)
    assert_sites(df, report, "IXP", 1)


def test_site_ids_unique_after_sanitising(tmp_path):
    """Plates "P 1" and "P/1" are different plates but one descriptor name (P-1_A01_s1): refused, not overwritten."""
    a = pixels("P", "A01", 1, 1)
    rows = []
    for plate in ("P 1", "P/1"):
        row = {"Metadata_Plate": plate, "Metadata_Well": "A01", "Metadata_Site": 1}
        for c, ch in enumerate(CH):
            write_tiff(tmp_path / "img" / f"{ch}.tif", a[0, c])
            row |= {f"FileName_{ch}": f"{ch}.tif", f"PathName_{ch}": "img"}
        rows.append(row)
    pd.DataFrame(rows).to_csv(tmp_path / "load_data.csv", index=False)
    with pytest.raises(readers.LayoutError, match=r"site P 1 A01 s1, site P/1 A01 s1 would share the site descriptor "
                                                 r"P-1_A01_s1\.site\.json") as e:
        readers.import_plate("loaddata", tmp_path / "load_data.csv", out=tmp_path / "pm.csv")
    assert len(e.value.problems) == 1 and not (tmp_path / "pm.csv").exists()


def test_failed_plate_map_write_keeps_the_old_import(tmp_path, monkeypatch):
    """Descriptors and plate map land together: a plate map that cannot be written leaves the old pair intact."""
    src = make_ome_tiff(tmp_path, nz=1)
    out = tmp_path / "run" / "pm.csv"
    readers.import_plate("ome-tiff", src, out=out)
    folder = out.parent / "pm_sites"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    plate_map = out.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(formats, "write_plate_map", boom)
    with pytest.raises(OSError, match="disk full"):
        readers.import_plate("ome-tiff", src, out=out, plate="OTHER")  # other plate: other descriptor names
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and out.read_bytes() == plate_map
    assert not [p for p in out.parent.iterdir() if formats.is_temporary(p)]
    monkeypatch.undo()
    assert len(formats.read_plate_map(out)) == 4  # the old plate map still finds its descriptors


def test_well_names_and_channel_table():
    assert [readers.normalize_well(w) for w in ("a1", "A01", "B-12", "AF48")] == ["A01", "A01", "B12", "AF48"]
    assert readers.well_name(27, 3) == "AA03"
    m = readers.match_channels(["DAPI (405)", "ConA-488", "Alexa 568", "OrigRNA", "MitoTracker Orange"])
    assert m.mapping == {"DNA": "DAPI (405)", "RNA": "OrigRNA", "Mito": "MitoTracker Orange"}
    assert any("ER" in p for p in m.problems) and any("AGP" in p for p in m.problems)
    m = readers.match_channels(["DAPI (405)", "ConA-488", "Alexa 568", "OrigRNA", "MitoTracker Orange"],
                               channel_map={"ER": "ConA-488", "AGP": "Alexa 568"})
    assert not m.problems and m.unused == ()


# ----------------------------------------------------------------------------- illumination correction


def illum_fields(nc: int = 5) -> np.ndarray:
    """(C, Y, X) float64 multiplicative fields, as CellProfiler saves them: a vignetting bowl and a tilt,
    different per channel, all in (0, 1.5)."""
    y, x = (np.mgrid[:SIZE, :SIZE] / (SIZE - 1) - 0.5)
    fields = np.stack([1.0 - 0.8 * (1 + 0.1 * c) * (y**2 + x**2) + 0.1 * (c + 1) * x for c in range(nc)])
    assert 0 < fields.min() and fields.max() < 1.5
    return fields


def write_illum(folder: Path, plate: str, fields: dict[str, np.ndarray]) -> Path:
    """The Gallery's illum/<plate>/<plate>_Illum<Ch>.npy; returns the illum/ folder."""
    (folder / plate).mkdir(parents=True, exist_ok=True)
    for ch, f in fields.items():
        np.save(folder / plate / f"{plate}_Illum{ch}.npy", f)
    return folder


def corrected(raw: np.ndarray, fields: np.ndarray) -> np.ndarray:
    """raw (Z, C, Y, X) / fields (C, Y, X), in float32 as read_site computes it."""
    return raw.astype(np.float32) / fields.astype(np.float32)[None]


def test_illum_folder_divides_every_channel_and_plane(tmp_path, capsys):
    """A 3D Harmony plate + a Gallery-style illum/ folder (Cell Painting channel names matched to the
    Harmony stain names by the channel table), through the CLI: every site reads back as raw / illum."""
    src = make_phenix(tmp_path)
    fields = illum_fields()
    illum = write_illum(tmp_path / "illum", "P2", {ch: fields[c] for c, ch in enumerate(CH)}
                        | {"Brightfield": np.ones((SIZE, SIZE))})  # not an output channel: unused
    readers._load_illum_cached.cache_clear()
    parser = argparse.ArgumentParser()
    readers.add_import_arguments(parser)
    out = tmp_path / "run" / "plate_map.csv"
    assert readers.run_import(parser.parse_args([str(src), "--layout", "phenix", "--out", str(out),
                                                 "--illum", str(illum)])) == 0
    assert "illumination correction: DNA ← P2_IllumDNA.npy" in capsys.readouterr().out
    df = formats.read_plate_map(out)
    for row in df.itertuples():
        got = formats.read_stack(row.FileName_Image, channels=CH)  # crop and segment read this way
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, corrected(pixels("P2", row.Metadata_Well, row.Metadata_Site), fields))
        doc = formats.read_json(row.FileName_Image)
        assert doc["version"] == 2 and doc["illum"] == [str(illum / "P2" / f"P2_Illum{ch}.npy") for ch in CH]
    # Each function was read once for the plate's 4 sites.
    info = readers._load_illum_cached.cache_info()
    assert (info.misses, info.hits) == (5, 15)


def test_illum_loaddata_columns(tmp_path):
    """A 2D Gallery plate whose load_data.csv names the illumination functions (FileName_Illum<Ch>)."""
    fields = illum_fields()
    csv, barcode = make_loaddata(tmp_path, nz=1, illum=fields)
    df, report = readers.import_plate("loaddata", csv, platemap=barcode)
    for row, site in zip(df.itertuples(), report.sites):
        want = corrected(pixels("BR001", row.Metadata_Well, row.Metadata_Site, 1), fields)
        np.testing.assert_array_equal(readers.read_site(site), want)
    # --illum none reads the raw pixels, says so, and writes descriptors older readers can read.
    df, report = readers.import_plate("loaddata", csv, platemap=barcode, illum="none")
    assert_sites(df, report, "BR001", 1)
    assert any("--illum none" in n for n in report.notes) and not any(s.illum for s in report.sites)
    assert report.sites[0].to_dict()["version"] == 1 and "illum" not in report.sites[0].to_dict()
    # A site whose FileName_Illum cells are empty while the others have functions: named, not read raw.
    table = pd.read_csv(csv)
    blank = (table.Metadata_Well == "B02") & (table.Metadata_Site == 2)
    table.loc[blank, [f"FileName_Illum{ch}" for ch in CH]] = ""
    table.to_csv(tmp_path / "blank.csv", index=False)
    with pytest.raises(readers.LayoutError, match=r"plate BR001: 1 site\(s\) \(B02 s2\) have no illumination functions "
                                                  r"\(others do\) in the FileName_Illum<Ch> columns"):
        readers.import_plate("loaddata", tmp_path / "blank.csv", platemap=barcode)
    # A function the CSV names but that is gone: named at import, before any pixel is read.
    (tmp_path / "illum" / "BR001_IllumRNA.npy").unlink()
    with pytest.raises(readers.LayoutError, match=r"BR001_IllumRNA\.npy: does not exist; .*--illum none"):
        readers.import_plate("loaddata", csv, platemap=barcode)


def test_illum_errors_name_the_file_and_the_fix(tmp_path):
    src = make_phenix(tmp_path, nz=1)
    fields = illum_fields()
    good = {ch: fields[c] for c, ch in enumerate(CH)}
    raw = pixels("P2", WELLS[0], SITES[0], 1)

    # A channel without a function: refused, naming it and the opt-out; --illum-skip reads it uncorrected.
    no_mito = write_illum(tmp_path / "no_mito", "P2", {ch: f for ch, f in good.items() if ch != "Mito"})
    with pytest.raises(readers.LayoutError) as e:
        readers.import_plate("phenix", src, illum=no_mito)
    msg = str(e.value)
    assert "plate P2: 4 site(s)" in msg and "output channel(s) ['Mito']" in msg and "--illum-skip Mito" in msg
    _, report = readers.import_plate("phenix", src, illum=no_mito, illum_skip=["Mito"])
    want = corrected(raw, np.concatenate([fields[:4], np.ones((1, SIZE, SIZE))]))
    np.testing.assert_array_equal(readers.read_site(report.sites[0]), want)
    assert report.illum["Mito"] == [] and any("--illum-skip" in w for w in report.warnings)

    # Not the images' Y×X: found at import from the image header.
    small = write_illum(tmp_path / "small", "P2", good | {"DNA": np.ones((8, 8))})
    with pytest.raises(readers.LayoutError, match=r"P2_IllumDNA\.npy: has shape \(Y, X\) = \(8, 8\) but the images "
                                                  r"of site P2 A01 s1 are \(16, 16\)"):
        readers.import_plate("phenix", src, illum=small)
    # ... or when a function is replaced after the import: found when the site is read.
    ok = write_illum(tmp_path / "ok", "P2", good)
    _, report = readers.import_plate("phenix", src, illum=ok)
    np.save(ok / "P2" / "P2_IllumER.npy", np.ones((8, 16)))
    with pytest.raises(ValueError, match=r"site P2 A01 s1: illumination function .*P2_IllumER\.npy has shape "
                                         r"\(Y, X\) = \(8, 16\) but the image is \(16, 16\);.*--illum none"):
        readers.read_site(report.sites[0])

    # Non-finite or non-positive values: found when the function is first read, before the image is.
    for name, value, text in (("nan", np.nan, r"1 non-finite value\(s\) \(NaN/inf\), the first at \(y, x\) = \(2, 3\)"),
                              ("zero", 0.0, r"1 value\(s\) ≤ 0 \(min 0, the first at \(y, x\) = \(2, 3\)\)")):
        bad = fields[2].copy()
        bad[2, 3] = value
        folder = write_illum(tmp_path / name, "P2", good | {"RNA": bad})
        _, report = readers.import_plate("phenix", src, illum=folder)
        with pytest.raises(ValueError, match=re.escape(str(folder / "P2" / "P2_IllumRNA.npy")) + ": " + text
                           + ".*CorrectIlluminationCalculate.*--illum none"):
            readers.read_site(report.sites[0])

    # A folder without the plate's functions, and a skipped channel that does not exist.
    (tmp_path / "empty").mkdir()
    with pytest.raises(readers.LayoutError) as e:
        readers.import_plate("phenix", src, illum=tmp_path / "empty", illum_skip=["Nuclei"])
    assert "plate P2: no illumination functions" in str(e.value) and "P2_Illum<Ch>.npy" in str(e.value)
    assert "--illum-skip Nuclei: not output channel(s)" in str(e.value)


def test_correct_illumination_divides_in_place():
    stack = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4) + 1
    field = np.full((3, 4), 2.0)
    out = readers.correct_illumination(stack, [field, None])
    assert out is stack  # in place: no second copy of a large 3D site
    np.testing.assert_array_equal(out[:, 0], (np.arange(48, dtype=np.float32).reshape(2, 2, 3, 4)[:, 0] + 1) / 2)
    np.testing.assert_array_equal(out[:, 1], np.arange(48, dtype=np.float32).reshape(2, 2, 3, 4)[:, 1] + 1)
    with pytest.raises(ValueError, match=r"f\.npy has shape \(Y, X\) = \(4, 3\) but the image is \(3, 4\)"):
        readers.correct_illumination(stack, [np.ones((4, 3)), None], ["f.npy", "g.npy"])
    assert readers.illum_problem(np.ones((2, 3, 4))) == "expected a 2-D (Y, X) array, got shape (2, 3, 4)"
    assert readers.illum_problem(np.ones((3, 4))) is None


# ----------------------------------------------------------------------------- command line


def test_cli_import(tmp_path, capsys):
    src = make_imagexpress(tmp_path, nz=2)
    pm = simple_platemap(tmp_path, {"A01": ("DMSO", 0), "B02": ("drugX", 2)})
    parser = argparse.ArgumentParser()
    readers.add_import_arguments(parser)
    out = tmp_path / "run" / "plate_map.csv"
    args = parser.parse_args([str(src), "--layout", "imagexpress", "--out", str(out), "--platemap", str(pm),
                              "--channel-map", "DNA=DAPI", "--report", str(tmp_path / "run" / "import.json")])
    assert readers.run_import(args) == 0
    printed = capsys.readouterr().out
    assert "4 site(s)" in printed and "DNA ← 'DAPI'" in printed
    df = formats.read_plate_map(out)
    for _, row in df.iterrows():
        want = pixels("IXP", row["Metadata_Well"], row["Metadata_Site"], 2).astype(np.float32)
        np.testing.assert_array_equal(readers.read_site_file(row["FileName_Image"], channels=CH), want)
    assert formats.read_json(tmp_path / "run" / "import.json")["n_sites"] == 4
    # A bad layout: exit code 2 and the problems on stderr, nothing written.
    (src / "TimePoint_1" / "ZStep_2").rename(src / "TimePoint_1" / "ZStep_9")
    bad = parser.parse_args([str(src), "--layout", "phenix", "--out", str(tmp_path / "x.csv")])
    assert readers.run_import(bad) == 2
    assert "no images found" in capsys.readouterr().err and not (tmp_path / "x.csv").exists()


def test_formats_read_stack_dispatches_to_descriptors(tmp_path):
    """Once formats.read_stack dispatches *.site.json to readers.read_site_file, crop and segment read imported plates."""
    out = tmp_path / "pm.csv"
    readers.import_plate("ome-tiff", make_ome_tiff(tmp_path, nz=2), out=out)
    df = formats.read_plate_map(out)
    assert len(df) == len(WELLS) * len(SITES)
    for row in df.itertuples():
        want = pixels("OT1", row.Metadata_Well, row.Metadata_Site, 2).astype(np.float32)  # the pixels the test wrote
        got = formats.read_stack(row.FileName_Image, axes="ZCYX", channels=CH)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
    # read_stack's checks apply to descriptors too, and their errors name the descriptor.
    with pytest.raises(ValueError, match=re.escape(df.FileName_Image.iloc[0]) + r": .*channels .* differ from the expected"):
        formats.read_stack(df.FileName_Image.iloc[0], channels=CH[:2])
