"""Readers for the plate layouts labs actually have, read in place (DESIGN.md §3 "Formats at the doors").

A lab's plate is rarely one ZCYX TIFF per site. This module turns five common layouts
into plate-map rows that point at the ORIGINAL files, and reads a site as a float32
(Z, C, Y, X) array only when it is asked for (a plane file is opened only when its site
is read; nothing is copied or converted).

Layouts (``layout=`` here, ``gradcamo import --layout`` on the command line):

  loaddata     CellProfiler LoadData CSV / Cell Painting Gallery ``load_data.csv``: one
               row per site (per site and plane for stacks: `PLANE_COLUMNS`, e.g.
               ``Metadata_Plane``), ``FileName_<Ch>`` + ``PathName_<Ch>`` per channel (one
               2D TIFF per channel and plane), ``Frame_<Ch>`` for multi-frame files;
               ``FileName_Illum<Ch>`` + ``PathName_Illum<Ch>`` name illumination functions.
               SRC is the CSV or a folder searched for ``load_data.csv`` files.
  phenix       Opera Phenix / Operetta Harmony export: ``rXXcYYfZZpWW-chNskTfk1fl1.tiff``
               (row, column, field, plane, channel, timepoint) in SRC or SRC/Images, with
               ``Index.idx.xml`` (channel names, pixel size, plane positions) when present;
               without it the channels are ``ch1`` … ``chN``.
  imagexpress  MetaXpress export: ``[<plate>_]<well>_s<site>_w<wave>[<uuid>].tif``
               (``_s``/``_w`` absent for one site/one wavelength), z-planes under
               ``ZStep_<k>/``, optionally under ``TimePoint_<t>/``; channel names from the
               plate's ``.HTD`` file (``WaveName<k>``), else ``w1`` … ``wN``; pixel size from
               the MetaSeries tags.
  ome-tiff     OME-TIFF files (SRC: a folder or one file): channel names and
               PhysicalSizeX/Y/Z from the OME-XML, any dimension order; plate/well/field from
               the OME ``Plate`` elements when present, else from the file name
               (`OME_TIFF_NAME_PATTERN`, e.g. ``P1_B03_s2.ome.tif``).
  ome-zarr     OME-Zarr HCS plate (NGFF 0.4 on Zarr v2, 0.5 on Zarr v3): plate → well →
               field image groups; the first multiscales dataset (full resolution, ``0``),
               axes and scales from the multiscales metadata, names from ``omero``.

Design: the plate map's ``FileName_Image`` names a small JSON *site descriptor*
(``<plate>_<well>_s<site>.site.json``, written by `import_plate` into a folder beside the
plate map) that lists the site's original files per plane and channel (or one file/array
+ its axes), the channel mapping and the voxel size. Descriptors keep every existing
contract: `formats.read_plate_map` checks that FileName_Image exists, rows pickle to
worker processes as plain strings, and ``formats.read_stack`` only needs to dispatch on
the ``.site.json`` suffix to `read_site_file` to serve crop and segment unchanged.

Illumination correction: a site may carry one CellProfiler illumination function per
channel (a (Y, X) ``.npy``; from LoadData's ``FileName_Illum<Ch>`` columns, or from
``illum=``/``--illum DIR`` in the Gallery's ``<plate>/<plate>_Illum<Ch>.npy`` naming);
`read_site` divides each channel by it, broadcast over Z, so every later step
(segmentation, crop normalisation) sees corrected pixels. Each function is read once per
process (`load_illum`). At import, files, 2-D headers and Y×X are checked; values
(finite, > 0) when first read.

Channels: output channels are `formats.CHANNELS` (DNA, ER, RNA, AGP, Mito) unless
``channels=`` says otherwise, matched to the vendor's channel names by
`DEFAULT_CHANNEL_ALIASES` (exact names) and `STAIN_KEYWORDS` (stain names inside longer
labels, e.g. "HOECHST 33342"); ``channel_map={"DNA": "ch1", ...}`` overrides. Numbered
channels (``ch1``, ``w1``) are never matched by default: their order is the lab's
choice, and a silent guess would swap stains. Unknown channels are reported, not used.

Public API (axis orders are part of the contract):
  import_plate(layout, src, *, platemap=None, channel_map=None, out=None, ...)
      -> (plate map DataFrame, ImportReport); raises `LayoutError` (a ValueError)
      listing every problem, site by site, before any pixel is read.
  read_site(site, *, channels=None) -> np.ndarray float32 (Z, C, Y, X)
  read_site_file(path, *, channels=None) -> np.ndarray float32 (Z, C, Y, X)
  load_illum(path) -> np.ndarray float32 (Y, X), read-only, cached
  correct_illumination(stack_zcyx, fields) -> the stack divided per channel (in place)
  find_illum_files(folder, plate) -> {<Ch>: path};  match_illum_channels(names, mapping) -> {channel: <Ch>}
  load_site(path) -> Site;  write_site_file(site, path) -> Path
  match_channels(names, channels=formats.CHANNELS, channel_map=None, aliases=None) -> ChannelMatch
  normalize_well("a1") -> "A01";  well_name(row=2, col=3) -> "B03"  (1-based)
  add_import_arguments(parser);  run_import(args) -> int     (`gradcamo import`)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradcamo_jax.data import formats

LAYOUTS: tuple[str, ...] = ("loaddata", "phenix", "imagexpress", "ome-tiff", "ome-zarr")
SITE_SUFFIX = ".site.json"
"""Suffix of a site descriptor; `formats.read_stack` dispatches on it to `read_site_file`."""

_DESCRIPTOR_FORMAT = "gradcamo-site"
_DESCRIPTOR_VERSION = 2
# Version 2 added "illum" (illumination functions). A descriptor without them is still written as
# version 1, so an older gradcamo keeps reading it; one with them is refused by an older gradcamo
# (which would silently read the raw pixels) instead of being read uncorrected.

ILLUM_CACHE_SIZE = 16
"""Illumination functions kept in memory per process (one per plate and channel: a 2160×2160
float32 function is 18.7 MB, so 16 of them bound the cache at ~300 MB)."""

DEFAULT_CHANNEL_ALIASES: dict[str, tuple[str, ...]] = {
    "DNA": ("DNA", "OrigDNA", "Hoechst", "Hoechst 33342", "HOECHST 33342", "H33342", "DAPI", "Nuclei"),
    "ER": ("ER", "OrigER", "Concanavalin", "Concanavalin A", "ConA", "Endoplasmic reticulum"),
    "RNA": ("RNA", "OrigRNA", "SYTO14", "SYTO 14", "Nucleoli"),
    "AGP": ("AGP", "OrigAGP", "Phalloidin", "WGA", "Phalloidin/WGA", "Actin", "Golgi", "Actin/Golgi/PM"),
    "Mito": ("Mito", "OrigMito", "MitoTracker", "MitoTracker Deep Red", "Mitochondria"),
}
"""Output channel → vendor channel names that mean it (compared without case, spaces or
punctuation). Override per channel with ``channel_map`` or replace with ``aliases``."""

STAIN_KEYWORDS: dict[str, tuple[str, ...]] = {
    "DNA": ("hoechst", "dapi"),
    "ER": ("concanavalin",),
    "RNA": ("syto14",),
    "AGP": ("phalloidin", "wga"),
    "Mito": ("mitotracker",),
}
"""Stain names that identify a channel inside a longer label ("HOECHST 33342 (405)").
Fluorophore names (Alexa 488, Cy5) are deliberately absent: labs use them for different stains."""

TREATMENT_COLUMNS = ("Metadata_Treatment", "pert_iname", "broad_sample", "jcp2022", "treatment", "compound")
DOSE_COLUMNS = ("Metadata_Dose", "mmoles_per_liter", "dose", "concentration", "mg_per_ml")
WELL_COLUMNS = ("well_position", "Metadata_Well", "Well", "well")
PLATE_COLUMNS = ("Metadata_Plate", "Assay_Plate_Barcode", "Plate", "plate")
PLANE_COLUMNS = ("Metadata_Plane", "Metadata_Z", "Metadata_ZPlane", "Metadata_PlaneID", "Metadata_ZStep")
SITE_COLUMNS = ("Metadata_Site", "Metadata_Field", "Metadata_FieldID")
"""Column names tried in this order (platemaps and LoadData CSVs); the first present is used."""

OME_TIFF_NAME_PATTERN = (
    r"^(?:(?P<plate>.+?)[_-])?(?P<well>[A-Za-z]{1,2}\d{1,2})(?:[_-](?:s|f|site|field)(?P<site>\d+))?\.ome\.tiff?$"
)
"""How an OME-TIFF file without OME Plate metadata names its site: ``[plate_]well[_s<site>].ome.tif``."""

_PHENIX_RE = re.compile(r"^r(\d+)c(\d+)f(\d+)p(\d+)-ch(\d+)sk(\d+)fk(\d+)fl(\d+)\.tiff?$", re.IGNORECASE)
_IX_RE = re.compile(r"^(?:(?P<prefix>.*?)_)?(?P<well>[A-Za-z]{1,2}\d{2})(?:_s(?P<site>\d+))?(?:_w(?P<wtail>.+))?$")
_IX_GUID_RE = re.compile(r"^(\d+?)([0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12})$", re.IGNORECASE)
_WELL_RE = re.compile(r"^\s*([A-Za-z]{1,2})[\s_-]?0*(\d{1,3})\s*$")
_UNIT_UM = {
    "m": 1e6, "meter": 1e6, "cm": 1e4, "centimeter": 1e4, "mm": 1e3, "millimeter": 1e3,
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micrometer": 1.0, "micron": 1.0, "microns": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "pixel": None, "": 1.0,
}
_MAX_LISTED = 40


# ----------------------------------------------------------------------------- small helpers


def normalize_well(value: Any) -> str:
    """``"a1"``, ``"A01"``, ``"A-1"`` → ``"A01"`` (row letters upper case, column ≥ 2 digits)."""
    m = _WELL_RE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a well name like A01 or A1")
    return f"{m.group(1).upper()}{int(m.group(2)):02d}"


def well_name(row: int, col: int) -> str:
    """Well name of a 1-based (row, column): (1, 1) → "A01", (27, 3) → "AA03" (1536-well plates)."""
    if row < 1 or col < 1:
        raise ValueError(f"row and column are 1-based, got ({row}, {col})")
    letters = ""
    while row:
        row, rem = divmod(row - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return f"{letters}{col:02d}"


def _norm(name: Any) -> str:
    return re.sub(r"[^0-9a-z]", "", str(name).casefold())


def _to_um(value: Any, unit: str | None, default_unit: str = "µm") -> float | None:
    """A length in µm, or None when absent, non-positive or in pixels."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    factor = _UNIT_UM.get((unit if unit is not None else default_unit).strip().casefold(), _UNIT_UM.get(default_unit))
    if factor is None or not math.isfinite(v) or v <= 0:
        return None
    return v * factor


def _fmt_voxel(v: Sequence[float | None]) -> str:
    return "(" + ", ".join("?" if x is None else f"{x:.4g}" for x in v) + ")"


def _listing(items: Sequence[Any], n: int = 8) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _site_label(plate: str, well: str, site: int) -> str:
    return f"site {plate} {well} s{site}"


class LayoutError(ValueError):
    """A plate layout that cannot be imported; ``.problems`` lists every problem (site by site)."""

    def __init__(self, src: Any, layout: str, problems: Sequence[str]):
        self.problems = list(problems)
        head = f"{src}: cannot import as layout {layout!r}: {len(self.problems)} problem(s), found before reading any pixels:"
        lines = [f"  - {p}" for p in self.problems[:_MAX_LISTED]]
        if len(self.problems) > _MAX_LISTED:
            lines.append(f"  … and {len(self.problems) - _MAX_LISTED} more")
        super().__init__("\n".join([head, *lines]))


# ----------------------------------------------------------------------------- site descriptors


@dataclasses.dataclass(frozen=True)
class PlaneRef:
    """One 2D image of a site: a file (relative to `Site.root`) and a frame in it.

    ``frame`` is the page of a multi-frame TIFF (LoadData ``Frame_<Ch>``); None reads
    the file's first series whole, which must be (Y, X) or a (Z, Y, X) stack.
    """

    file: str
    frame: int | None = None


@dataclasses.dataclass(frozen=True)
class ArrayRef:
    """One N-D array holding a whole site (OME-TIFF series or OME-Zarr level).

    Attributes:
      kind: "tiff" (``key`` = series index) or "zarr" (``key`` = array path in the store).
      path: the TIFF file or the Zarr store folder, relative to `Site.root`.
      axes: the stored array's axes, upper case, unsqueezed (e.g. "TCZYX", "TCZYXS").
      shape: the stored shape, one entry per axis (checked at read time).
      channel_index: stored C index of each output channel, in output order.
      fixed: (axis, index) for every axis other than Z, C, Y, X (e.g. ("T", 0)).
    """

    kind: str
    path: str
    key: str
    axes: str
    shape: tuple[int, ...]
    channel_index: tuple[int, ...] = ()
    fixed: tuple[tuple[str, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class Site:
    """Where one imaged site's pixels are, and what they mean; no pixels.

    Exactly one of ``planes`` (plane-per-file layouts: ``planes[z][c]``, C in the order of
    ``channels``) and ``array`` (one-array layouts) is set. ``voxel_size`` is (z, y, x)
    in µm, None where the metadata do not say. ``source_channels[c]`` is the vendor's
    name of output channel ``channels[c]``. ``metadata`` holds extra ``Metadata_*``
    values carried into the plate map (e.g. LoadData columns). ``illum[c]`` is the absolute
    path of the illumination function (a (Y, X) ``.npy``, CellProfiler's) that divides
    channel ``channels[c]`` when the site is read, None for a channel read uncorrected on
    request (``--illum-skip``); ``illum`` is empty when the site is not corrected.
    """

    plate: str
    well: str
    site: int
    layout: str
    channels: tuple[str, ...]
    source_channels: tuple[str, ...]
    root: str
    planes: tuple[tuple[PlaneRef, ...], ...] = ()
    array: ArrayRef | None = None
    voxel_size: tuple[float | None, float | None, float | None] = (None, None, None)
    metadata: tuple[tuple[str, Any], ...] = ()
    illum: tuple[str | None, ...] = ()

    @property
    def site_id(self) -> str:
        """``formats.site_id`` of the site, e.g. "P1_A01_s2" (descriptor and labels file names)."""
        return formats.site_id(self.plate, self.well, self.site)

    @property
    def label(self) -> str:
        return _site_label(self.plate, self.well, self.site)

    def files(self) -> list[str]:
        """Absolute paths of every file the site reads (a Zarr store counts as one)."""
        root = Path(self.root)
        if self.array is not None:
            return [str(root / self.array.path)]
        seen: dict[str, None] = {}
        for plane in self.planes:
            for ref in plane:
                seen.setdefault(str(root / ref.file))
        return list(seen)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "format": _DESCRIPTOR_FORMAT, "version": _DESCRIPTOR_VERSION if self.illum else 1, "layout": self.layout,
            "plate": self.plate, "well": self.well, "site": int(self.site),
            "channels": list(self.channels), "source_channels": list(self.source_channels),
            "root": self.root, "voxel_size_um": list(self.voxel_size), "metadata": dict(self.metadata),
        }
        if self.array is not None:
            a = self.array
            d["array"] = {"kind": a.kind, "path": a.path, "key": a.key, "axes": a.axes, "shape": list(a.shape),
                          "channel_index": list(a.channel_index), "fixed": {k: v for k, v in a.fixed}}
        else:
            d["planes"] = [[[r.file, r.frame] for r in plane] for plane in self.planes]
        if self.illum:
            d["illum"] = list(self.illum)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Site:
        if d.get("format") != _DESCRIPTOR_FORMAT or int(d.get("version", 0)) > _DESCRIPTOR_VERSION:
            raise ValueError(f"not a gradcamo site descriptor of version ≤ {_DESCRIPTOR_VERSION} "
                             f"(format={d.get('format')!r}, version={d.get('version')!r})")
        array = None
        if d.get("array") is not None:
            a = d["array"]
            array = ArrayRef(a["kind"], a["path"], str(a["key"]), a["axes"], tuple(int(s) for s in a["shape"]),
                             tuple(int(i) for i in a["channel_index"]), tuple((k, int(v)) for k, v in a["fixed"].items()))
        planes = tuple(tuple(PlaneRef(f, None if fr is None else int(fr)) for f, fr in plane) for plane in d.get("planes", ()))
        vs = tuple(None if v is None else float(v) for v in d.get("voxel_size_um", (None, None, None)))
        illum = tuple(None if f is None else str(f) for f in d.get("illum", ()))
        if illum and len(illum) != len(d["channels"]):
            raise ValueError(f"{len(illum)} illumination entries for {len(d['channels'])} channels")
        return cls(plate=str(d["plate"]), well=str(d["well"]), site=int(d["site"]), layout=str(d["layout"]),
                   channels=tuple(d["channels"]), source_channels=tuple(d["source_channels"]), root=str(d["root"]),
                   planes=planes, array=array, voxel_size=vs,  # type: ignore[arg-type]
                   metadata=tuple(sorted(d.get("metadata", {}).items())), illum=illum)


def write_site_file(site: Site, path: str | os.PathLike) -> Path:
    """Write a site descriptor (compact key-sorted JSON, atomically)."""
    # Compact: a 21-plane × 5-channel site lists 105 files; indentation would make it 500 lines.
    return formats.write_json(site.to_dict(), path, indent=None)


def load_site(path: str | os.PathLike) -> Site:
    """Read a site descriptor written by `write_site_file` / `import_plate` (no pixels)."""
    path = Path(path)
    doc = formats.read_json(path)
    try:
        return Site.from_dict(doc)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid site descriptor ({type(e).__name__}: {e}); re-run `gradcamo import`") from e


# ----------------------------------------------------------------------------- reading pixels


def read_site_file(path: str | os.PathLike, *, channels: int | Sequence[str] | None = None) -> np.ndarray:
    """Read the site a descriptor points at, as float32 (Z, C, Y, X).

    The target of ``formats.read_stack`` for ``*.site.json`` paths: same result contract
    and checks (see `read_site`); errors name the descriptor and the original file.
    """
    path = Path(path)
    site = load_site(path)
    try:
        return read_site(site, channels=channels)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: {e}") from e
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def read_site(site: Site, *, channels: int | Sequence[str] | None = None) -> np.ndarray:
    """Read one site's pixels from its original files as float32 (Z, C, Y, X).

    C follows ``site.channels``; Z is the plane order of the acquisition (a 2D site is
    Z = 1). Only this site's files are opened. The checks are `formats.read_stack`'s
    (`formats.check_channel_names`, `formats.check_channel_count`, `formats.check_zcyx`).

    Args:
      channels: expected channel count or names (as in `formats.read_stack`), checked
        against ``site.channels`` before any file is opened.

    When the site has illumination functions (``site.illum``), each channel is divided by
    its (Y, X) function, broadcast over Z (`correct_illumination`), before anything else
    sees the pixels: crop's percentile normalisation and segmentation get corrected
    images. The functions are read once per file and process (`load_illum`).

    Raises:
      FileNotFoundError: a file of the site is gone (moved since the import).
      ValueError (naming the site and file): unreadable/corrupt file, planes of
        different sizes, an array whose shape changed since the import, channel
        count/names ≠ ``channels``, NaN/inf voxels, a constant channel (blank or
        saturated acquisition); an illumination function that is unreadable, not the
        image's Y×X, or has non-finite or non-positive values.
    """
    fix = "re-run `gradcamo import` with --channels in that order (or change the expected channels)"
    formats.check_channel_names(site.channels, channels, site.label, noun="channels", fix=fix)
    formats.check_channel_count(len(site.channels), channels, site.label, fix=fix)
    if site.illum and len(site.illum) != len(site.channels):
        raise ValueError(f"{site.label}: {len(site.illum)} illumination functions for {len(site.channels)} channels; "
                         "re-run `gradcamo import`")
    # Loaded (and checked) before the pixels: a bad function fails fast, and costs no image read.
    fields = [None if f is None else load_illum(f, where=site.label) for f in site.illum]
    out = _read_array_site(site) if site.array is not None else _read_plane_site(site)
    if fields:
        correct_illumination(out, fields, [f"{site.label}: illumination function {f}" for f in site.illum])
    formats.check_zcyx(out, f"{site.label} ({_listing(site.files(), 2)})", site.channels)
    return out


# ----------------------------------------------------------------------------- illumination correction

_ILLUM_FIX = ("recompute it (CellProfiler CorrectIlluminationCalculate), or import without it: `gradcamo import "
              "--illum none` (no correction) or `--illum-skip <channel>` (that channel uncorrected)")


def load_illum(path: str | os.PathLike, *, where: str = "") -> np.ndarray:
    """One illumination function, as CellProfiler saves it: a (Y, X) array in a ``.npy`` file.

    Returned as read-only float32 (Y, X), checked: 2-D, every value finite and > 0 (it
    divides the image). Cached per process by path, modification time and size
    (`ILLUM_CACHE_SIZE` entries), so the sites of a plate share one read per channel
    and a rewritten file is read again.

    Raises:
      FileNotFoundError: no such file (the message names it and the fix).
      ValueError (naming the file and the fix): not a readable ``.npy``, not 2-D,
        non-finite or non-positive values.
    """
    path = os.path.abspath(os.fspath(path))
    head = f"{where}: " if where else ""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{head}illumination function {path} not found; restore it, or {_ILLUM_FIX}") from None
    try:
        return _load_illum_cached(path, st.st_mtime_ns, st.st_size)
    except ValueError as e:
        raise ValueError(f"{head}{e}") from None


@functools.lru_cache(maxsize=ILLUM_CACHE_SIZE)
def _load_illum_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    del mtime_ns, size  # cache key only: a rewritten file is a new entry
    try:
        data = np.load(path, allow_pickle=False)  # never unpickle: a .npy from elsewhere must not run code
    except Exception as e:
        raise ValueError(f"illumination function {path}: not a readable .npy array ({type(e).__name__}: {e}); "
                         f"{_ILLUM_FIX}") from None
    problem = illum_problem(data)
    if problem:
        raise ValueError(f"illumination function {path}: {problem}; {_ILLUM_FIX}")
    out = np.asarray(data, np.float32)
    out.flags.writeable = False  # shared by every site of the plate: nobody may change it in place
    return out


def illum_problem(field: np.ndarray) -> str | None:
    """Why `field` cannot divide an image (None when it can): it must be a numeric (Y, X)
    array whose values are all finite and > 0 (also after rounding to float32)."""
    field = np.asarray(field)
    if field.ndim != 2:
        return f"expected a 2-D (Y, X) array, got shape {field.shape}"
    if not (np.issubdtype(field.dtype, np.floating) or np.issubdtype(field.dtype, np.integer)):
        return f"expected numbers, got dtype {field.dtype}"
    f32 = field.astype(np.float32)
    bad = ~np.isfinite(f32)
    if bad.any():
        y, x = np.argwhere(bad)[0]
        return f"{int(bad.sum())} non-finite value(s) (NaN/inf), the first at (y, x) = ({y}, {x})"
    bad = f32 <= 0
    if bad.any():
        y, x = np.argwhere(bad)[0]
        return (f"{int(bad.sum())} value(s) ≤ 0 (min {float(f32.min()):.4g}, the first at (y, x) = ({y}, {x})); "
                "an illumination function divides the image and must be > 0")
    return None


def correct_illumination(stack_zcyx: np.ndarray, fields: Sequence[np.ndarray | None],
                         names: Sequence[str] | None = None) -> np.ndarray:
    """Divide each channel of a site by its illumination function: ``out[z, c] = raw[z, c] / fields[c]``.

    CellProfiler's CorrectIlluminationApply "Divide" method; one (Y, X) function per
    channel, broadcast over Z (the functions are estimated per plate from 2-D images).

    Args:
      stack_zcyx: (Z, C, Y, X) float32, divided IN PLACE (it is freshly read; a copy
        would double the memory of a 3-D site, ~2 GB at 21×5×2160×2160) and returned.
      fields: C entries, each a (Y, X) array or None (that channel is left as it is).
      names: C labels for errors (e.g. the function's file), default "channel c".

    Raises:
      ValueError: a field whose shape is not the stack's (Y, X) (the message names it).
    """
    if len(fields) != stack_zcyx.shape[1]:
        raise ValueError(f"{len(fields)} illumination functions for {stack_zcyx.shape[1]} channels")
    yx = stack_zcyx.shape[2:]
    for c, field in enumerate(fields):
        if field is None:
            continue
        if field.shape != yx:
            name = names[c] if names is not None else f"channel {c}"
            raise ValueError(f"{name} has shape (Y, X) = {tuple(field.shape)} but the image is {tuple(yx)}; use the "
                             "function made for these images (same camera binning and field size), or " + _ILLUM_FIX)
        np.divide(stack_zcyx[:, c], np.asarray(field, np.float32), out=stack_zcyx[:, c])
    return stack_zcyx


def _read_tiff_plane(path: Path, frame: int | None, site: Site, handles: dict | None = None) -> np.ndarray:
    """(k, Y, X) pixels of one plane reference: k = 1 for a 2D image, k = Z for a stack file.

    ``handles`` (path → open TiffFile) keeps multi-frame files open across the site's planes.
    """
    if not path.exists():
        raise FileNotFoundError(f"{site.label}: image file {path} not found; it moved since `gradcamo import` — "
                                "re-run the import (with --path-map if the data moved)")
    if handles is not None and path in handles:
        tif = handles[path]
    else:
        try:
            tif = formats._open_tiff(path)  # "not a readable TIFF …: corrupt or truncated", naming the file
        except ValueError as e:
            raise ValueError(f"{site.label}: {e}") from e
        if handles is not None:
            handles[path] = tif
    with contextlib.nullcontext() if handles is not None else tif:
        try:
            n_pages = len(tif.pages)
            problem = None if n_pages else "no image pages"  # tifffile opens a bad first-page offset with a warning
        except Exception as e:  # a damaged page chain
            problem = f"{type(e).__name__}: {e}"
        if problem:
            raise ValueError(f"{site.label}: {path}: not a readable TIFF ({problem}); the file is corrupt or "
                             "truncated — re-copy it")
        if frame is not None and frame >= n_pages:
            raise ValueError(f"{site.label}: {path} frame {frame}: frame {frame} requested but the file has "
                             f"{n_pages} page(s); fix the Frame_ column or re-export the file")
        try:
            if frame is not None:
                data = tif.pages[frame].asarray()
            else:
                # One-page files (nearly all plane files) skip tifffile's series detection: ~30% faster per file.
                data = tif.pages.first.asarray() if n_pages == 1 else tif.series[0].asarray()
        except Exception as e:  # tifffile raises several types (ValueError among them) for truncated data
            raise ValueError(f"{site.label}: {path}" + (f" frame {frame}" if frame is not None else "")
                             + f": cannot read pixel data ({type(e).__name__}: {e}); the file is corrupt or "
                             "truncated — re-copy it") from e
    while data.ndim > 2 and data.shape[-1] == 1:  # a trailing sample axis of size 1
        data = data[..., 0]
    if data.ndim == 2:
        return data[None]
    if data.ndim == 3 and frame is None:
        return data
    raise ValueError(f"{site.label}: {path}: expected a 2-D plane (or a Z×Y×X stack), got shape {data.shape}; "
                     "multi-channel or RGB files need the Frame_<Ch> columns (loaddata) or the ome-tiff layout")


def _read_plane_site(site: Site) -> np.ndarray:
    root = Path(site.root)
    # Files named by several references (Frame_ columns: one file per channel or per site) are opened once.
    uses = Counter(ref.file for plane in site.planes for ref in plane)
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}
        stack.callback(lambda: [h.close() for h in handles.values()])
        return _fill_planes(site, root, lambda ref: _read_tiff_plane(
            root / ref.file, ref.frame, site, handles if uses[ref.file] > 1 else None))


def _fill_planes(site: Site, root: Path, read: Callable[[PlaneRef], np.ndarray]) -> np.ndarray:
    out: np.ndarray | None = None
    first = ""
    z0 = 0
    for plane in site.planes:
        depth = None
        for c, ref in enumerate(plane):
            data = read(ref)
            if out is None:
                # Most sites are 2D planes (k = 1); allocate once, grow only for stack files.
                out = np.empty((data.shape[0] * len(site.planes), len(plane), *data.shape[1:]), np.float32)
                first = str(root / ref.file)
            if data.shape[1:] != out.shape[2:] or (depth is not None and data.shape[0] != depth):
                raise ValueError(
                    f"{site.label}: {root / ref.file} has shape {data.shape[1:]} (Y, X) × {data.shape[0]} plane(s), "
                    f"unlike {first} {out.shape[2:]}; all channels and planes of a site must match — re-export the site"
                )
            depth = data.shape[0]
            if z0 + depth > out.shape[0]:
                out = np.concatenate([out, np.empty((z0 + depth - out.shape[0], *out.shape[1:]), np.float32)])
            out[z0:z0 + depth, c] = data
        z0 += depth or 0
    if out is None:
        raise ValueError(f"{site.label}: the descriptor lists no planes; re-run `gradcamo import`")
    return out[:z0]


def _to_zcyx(data: np.ndarray, axes: str, channel_index: Sequence[int]) -> np.ndarray:
    """A selected array whose axes are a subset of ZCYX (+ leftover size-1 axes) → float32 (Z, C', Y, X)."""
    axes = list(axes)
    for i in reversed(range(len(axes))):
        if axes[i] not in "ZCYX":
            data = data.take(0, axis=i)  # size-1 leftovers (S, unsqueezed T, …)
            del axes[i]
    for a in "CZ":
        if a not in axes:
            data = data[None]
            axes.insert(0, a)
    data = np.transpose(data, [axes.index(a) for a in "ZCYX"])
    idx = list(channel_index)
    if idx != list(range(data.shape[1])):
        data = data[:, idx]
    return data.astype(np.float32)


def _fixed_selection(ref: ArrayRef) -> tuple[tuple, str]:
    fixed = dict(ref.fixed)
    sel = tuple(slice(None) if a in "ZCYX" else fixed.get(a, 0) for a in ref.axes)
    kept = "".join(a for a in ref.axes if a in "ZCYX")
    return sel, kept


def _tiff_series_unsqueezed(tif) -> list[tuple[str, tuple[int, ...]]]:
    """(axes, shape) of each series of an open tifffile.TiffFile, length-1 axes kept, in tif.series order.

    Compat: tifffile up to 2026.3 gives these as TiffPageSeries.get_axes/get_shape(False); later releases (e.g.
    2026.11, which a fresh Python 3.12 install picks) removed those and return the unsqueezed series from calling
    tif.series(squeeze=False) instead. Both are supported because CI and the GPU image may carry either.
    """
    if callable(tif.series):
        return [(s.axes, tuple(s.shape)) for s in tif.series(squeeze=False)]
    return [(s.get_axes(False), tuple(s.get_shape(False))) for s in tif.series]


def _read_array_site(site: Site) -> np.ndarray:
    ref = site.array
    assert ref is not None
    path = Path(site.root) / ref.path
    if not path.exists():
        raise FileNotFoundError(f"{site.label}: {path} not found; it moved since `gradcamo import` — re-run the import")
    sel, kept = _fixed_selection(ref)
    changed = (f"{site.label}: {path}" + (f" [{ref.key}]" if ref.kind == "zarr" else f" series {ref.key}")
               + " has axes {axes} shape {shape}, but {want_axes} {want_shape} at import; the data changed — "
               "re-run `gradcamo import`")
    if ref.kind == "tiff":
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[int(ref.key)]
                axes, shape = _tiff_series_unsqueezed(tif)[int(ref.key)]
                if axes != ref.axes or shape != ref.shape:
                    raise LookupError(changed.format(axes=axes, shape=shape, want_axes=ref.axes, want_shape=ref.shape))
                data = series.asarray().reshape(shape)[sel]
        except LookupError as e:
            raise ValueError(str(e)) from None
        except Exception as e:
            raise ValueError(f"{site.label}: {path}: not a readable OME-TIFF ({type(e).__name__}: {e}); "
                             "the file is corrupt or truncated — re-copy it") from e
    elif ref.kind == "zarr":
        import zarr

        try:
            arr = zarr.open_array(str(path), path=ref.key, mode="r")
        except Exception as e:
            raise ValueError(f"{site.label}: {path} [{ref.key}]: not a readable Zarr array ({type(e).__name__}: {e}); "
                             "re-run `gradcamo import`") from e
        if tuple(arr.shape) != ref.shape:
            raise ValueError(changed.format(axes=ref.axes, shape=tuple(arr.shape), want_axes=ref.axes, want_shape=ref.shape))
        data = np.asarray(arr[sel])  # only the chunks of the selected timepoint are read
    else:
        raise ValueError(f"{site.label}: unknown array kind {ref.kind!r} in the descriptor; re-run `gradcamo import`")
    return _to_zcyx(data, kept, ref.channel_index)


# ----------------------------------------------------------------------------- channel matching


@dataclasses.dataclass(frozen=True)
class ChannelMatch:
    """Result of `match_channels`: ``mapping`` output channel → vendor name (output order),
    ``unused`` vendor channels nobody asked for, ``problems`` (empty when usable)."""

    mapping: dict[str, str]
    unused: tuple[str, ...]
    problems: tuple[str, ...]


def match_channels(
    names: Sequence[str],
    channels: Sequence[str] = formats.CHANNELS,
    channel_map: Mapping[str, str] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> ChannelMatch:
    """Match vendor channel names to output channels.

    ``channel_map`` (output → vendor name) wins; the rest go through ``aliases``
    (default `DEFAULT_CHANNEL_ALIASES`, exact after dropping case, spaces and
    punctuation) and, with the default table, `STAIN_KEYWORDS` inside longer labels.
    An output channel with no or several candidates is a problem (the message lists
    the vendor names and the ``--channel-map`` to pass); vendor channels left over
    are ``unused`` (reported, never guessed).
    """
    names = list(dict.fromkeys(str(n) for n in names))
    user = {str(k): str(v) for k, v in (channel_map or {}).items()}
    table = dict(DEFAULT_CHANNEL_ALIASES if aliases is None else aliases)
    keywords = STAIN_KEYWORDS if aliases is None else {}
    by_norm: dict[str, list[str]] = defaultdict(list)
    for n in names:
        by_norm[_norm(n)].append(n)
    problems: list[str] = []
    mapping: dict[str, str] = {}
    for target, source in user.items():
        if target not in channels:
            problems.append(f"--channel-map {target}={source}: {target!r} is not an output channel {list(channels)}")
            continue
        hits = by_norm.get(_norm(source), [])
        if len(hits) != 1:
            problems.append(f"--channel-map {target}={source}: no channel named {source!r}" if not hits
                            else f"--channel-map {target}={source}: several channels match ({hits})")
            problems[-1] += f"; the channels found are {names}"
            continue
        mapping[target] = hits[0]
    taken = set(mapping.values())
    for target in channels:
        if target in mapping or target in user:
            continue
        alias = {_norm(a) for a in table.get(target, ())} | {_norm(target)}
        words = tuple(_norm(k) for k in keywords.get(target, ()))
        cands = [n for n in names if n not in taken and (_norm(n) in alias or any(w and w in _norm(n) for w in words))]
        if len(cands) == 1:
            mapping[target] = cands[0]
            taken.add(cands[0])
        elif not cands:
            problems.append(
                f"output channel {target}: no channel found for it among {names}; name it with "
                f"--channel-map {target}=<channel> (channel_map={{{target!r}: ...}})"
            )
        else:
            problems.append(f"output channel {target}: several channels could be it ({cands}); choose one with "
                            f"--channel-map {target}=<channel>")
    twice = [n for n, k in Counter(mapping.values()).items() if k > 1]
    for n in twice:
        problems.append(f"channel {n!r} is mapped to several output channels "
                        f"({[t for t, s in mapping.items() if s == n]}); fix --channel-map")
    ordered = {t: mapping[t] for t in channels if t in mapping}
    unused = tuple(n for n in names if n not in set(mapping.values()))
    if problems and all(t not in ordered for t in channels) and not user:
        problems.append(
            "no output channel matched a vendor channel name; for numbered channels give the acquisition order, e.g. "
            "--channel-map " + ",".join(f"{t}={n}" for t, n in zip(channels, names))
        )
    return ChannelMatch(ordered, unused, tuple(problems))


# ----------------------------------------------------------------------------- scanning layouts


@dataclasses.dataclass
class _Options:
    """What the scanners need of `import_plate`'s arguments (channel matching happens after the scan)."""

    plate: str | None
    timepoint: int | None
    plane_column: str | None
    path_map: dict[str, str]
    name_pattern: str | None
    check_files: bool


@dataclasses.dataclass
class _Raw:
    """One site as scanned, before channel matching and completeness checks."""

    plate: str
    well: str
    site: int
    origin: str
    root: str
    planes: dict[tuple[float, str], PlaneRef] = dataclasses.field(default_factory=dict)
    array: ArrayRef | None = None
    array_channels: tuple[str, ...] = ()
    voxel_size: tuple[float | None, float | None, float | None] = (None, None, None)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    # (plane, channel) → why its image is missing; counted only for channels that are used.
    missing: dict[tuple[float, str], str] = dataclasses.field(default_factory=dict)
    expected: Callable[[float, str], str] | None = None
    # LoadData FileName_Illum<Ch>/PathName_Illum<Ch>: <Ch> → absolute path of the function.
    illum: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.plate, self.well, self.site)

    @property
    def label(self) -> str:
        return _site_label(self.plate, self.well, self.site)


@dataclasses.dataclass
class _Scan:
    sites: list[_Raw]
    channel_order: list[str]
    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def _pick_timepoint(where: Any, found: Iterable[int], wanted: int | None, tag: str, scan: _Scan) -> int | None:
    """The timepoint to read among those `found` (file-name numbers, shown as ``{tag}{numbers}``).

    None after adding a problem to `scan`: several timepoints and none chosen, or the
    chosen one (`wanted`, ``--timepoint``) not among them. One timepoint (or none) and
    no choice: that one (1 when there are no files).
    """
    timepoints = sorted(set(found))
    if wanted is None:
        if len(timepoints) > 1:
            scan.problems.append(f"{where}: {len(timepoints)} timepoints ({tag}{timepoints}); choose one with --timepoint")
            return None
        return timepoints[0] if timepoints else 1
    if wanted not in timepoints:
        scan.problems.append(f"{where}: no files of timepoint {tag}{wanted} (found {tag}{timepoints})")
        return None
    return wanted


def _plate_from_folder(folder: Path) -> str:
    """Plate name of an export folder: Harmony's "<barcode>__<date>-Measurement 1" → "<barcode>"."""
    name = folder.name
    if name.lower() in ("images", "timepoint_1") and folder.parent != folder:
        name = folder.parent.name
    return name.split("__")[0] or name


def _scan_loaddata(src: Path, o: _Options) -> _Scan:
    csvs = [src] if src.is_file() else sorted(src.rglob("load_data.csv"))
    scan = _Scan([], [])
    if not csvs:
        scan.problems.append(f"{src}: no load_data.csv found; give the LoadData CSV itself or a folder holding load_data.csv files")
        return scan
    sites: dict[tuple[str, str, int], _Raw] = {}
    varying: set[str] = set()
    for csv in csvs:
        try:
            df = pd.read_csv(csv, dtype=str, keep_default_na=False)
        except Exception as e:
            scan.problems.append(f"{csv}: not a readable CSV ({type(e).__name__}: {e})")
            continue
        cols = set(df.columns)
        names = [c[len("FileName_"):] for c in df.columns if c.startswith("FileName_")]
        lonely = [n for n in names if f"PathName_{n}" not in cols]
        if lonely:
            scan.problems.append(f"{csv}: FileName_{lonely[0]} has no PathName_{lonely[0]} column (also: {lonely[1:]}); "
                                 "LoadData needs both per channel")
        # FileName_Illum<Ch> (the Gallery's load_data_with_illum.csv) name illumination functions, not images.
        illum = [n for n in names if n.lower().startswith("illum") and n not in lonely]
        names = [n for n in names if n not in lonely and not n.lower().startswith("illum")]
        if not names:
            scan.problems.append(f"{csv}: no FileName_<Channel>/PathName_<Channel> column pairs; is this a LoadData CSV?")
            continue
        for n in names:
            if n not in scan.channel_order:
                scan.channel_order.append(n)
        need = [c for c in ("Metadata_Plate", "Metadata_Well") if c not in cols]
        site_col = next((c for c in SITE_COLUMNS if c in cols), None)
        if need or site_col is None:
            scan.problems.append(f"{csv}: lacks column(s) {need + ([] if site_col else ['Metadata_Site'])}; "
                                 "add them (CellProfiler's Metadata module or the Gallery's load_data.csv have them)")
            continue
        if o.plane_column and o.plane_column not in cols:
            scan.problems.append(f"{csv}: plane column {o.plane_column!r} not found; columns: {sorted(cols)}")
            continue
        plane_col = o.plane_column or next((c for c in PLANE_COLUMNS if c in cols), None)
        skip_meta = {"Metadata_Plate", "Metadata_Well", site_col, plane_col}
        meta_cols = [c for c in df.columns if c.startswith("Metadata_") and c not in skip_meta]
        for i, row in enumerate(df.to_dict("records")):
            line = i + 2  # header is line 1
            where = f"{csv} line {line}"
            try:
                well = normalize_well(row["Metadata_Well"])
                site_no = int(float(row[site_col]))
                plane = float(row[plane_col]) if plane_col else 0.0
            except ValueError as e:
                scan.problems.append(f"{where}: {e}; fix Metadata_Well/{site_col}" + (f"/{plane_col}" if plane_col else ""))
                continue
            plate = o.plate or str(row["Metadata_Plate"]).strip()
            key = (plate, well, site_no)
            raw = sites.get(key)
            if raw is None:
                raw = sites[key] = _Raw(plate, well, site_no, origin=str(csv), root="/", expected=_loaddata_expected(csv, plane_col))
                raw.metadata = {c: row[c] for c in meta_cols}
            else:
                for c in meta_cols:
                    if c in raw.metadata and raw.metadata[c] != row[c]:
                        varying.add(c)
                        del raw.metadata[c]
            for n in names:
                fname, pname = str(row[f"FileName_{n}"]).strip(), str(row[f"PathName_{n}"]).strip()
                if not fname:
                    raw.missing[(plane, n)] = f"{where}: FileName_{n} is empty"
                    continue
                full = _map_path(os.path.join(pname, fname) if pname else fname, o.path_map)
                if "://" in full:
                    raw.missing[(plane, n)] = (f"{where}: {full} is not a local path; mirror the data and map the "
                                               "prefix with --path-map s3://bucket/prefix=/local/folder")
                    continue
                p = Path(os.path.abspath(csv.parent / full))  # an absolute `full` stays as it is
                if o.check_files and not p.exists():
                    raw.missing[(plane, n)] = f"{where}: {p} does not exist (FileName_{n})"
                    continue
                frame_txt = str(row.get(f"Frame_{n}", "")).strip()
                frame = int(float(frame_txt)) if frame_txt not in ("", "nan") else None
                if (plane, n) in raw.planes:
                    scan.problems.append(f"{where}: {raw.label} plane {plane:g} channel {n} appears twice; "
                                         "remove the duplicate row")
                raw.planes[(plane, n)] = PlaneRef(str(p), frame)
            for n in illum:
                _loaddata_illum(raw, n[len("Illum"):], row, n, csv, where, o, scan)
    if varying:
        scan.notes.append(f"per-plane columns not carried into the plate map: {sorted(varying)}")
    for raw in sites.values():
        files = [r.file for r in raw.planes.values()]
        if files:
            raw.root = os.path.commonpath([os.path.dirname(f) for f in files])
            raw.planes = {k: PlaneRef(os.path.relpath(r.file, raw.root), r.frame) for k, r in raw.planes.items()}
    scan.sites = list(sites.values())
    return scan


def _loaddata_illum(raw: _Raw, ch: str, row: Mapping[str, Any], col: str, csv: Path, where: str, o: _Options,
                    scan: _Scan) -> None:
    """Record a LoadData row's illumination function of channel ``ch`` (column ``FileName_<col>``) on its site."""
    fname, pname = str(row[f"FileName_{col}"]).strip(), str(row[f"PathName_{col}"]).strip()
    if not fname:
        return  # no function for this channel: reported (or accepted) when the channels are matched
    full = _map_path(os.path.join(pname, fname) if pname else fname, o.path_map)
    path = full if "://" in full else os.path.abspath(csv.parent / full)
    old = raw.illum.setdefault(ch, path)
    if old != path:
        scan.problems.append(f"{where}: {raw.label} FileName_{col} is {path} but {old} on another of its rows; "
                             "one illumination function per site and channel — fix the CSV")


def _loaddata_expected(csv: Path, plane_col: str | None) -> Callable[[float, str], str]:
    def expected(plane: float, ch: str) -> str:
        where = f" at {plane_col}={plane:g}" if plane_col else ""
        return f"no FileName_{ch}{where} in {csv.name}"
    return expected


def _map_path(path: str, path_map: Mapping[str, str]) -> str:
    # The longest matching prefix wins, so a specific mapping can refine a general one.
    for old in sorted(path_map, key=len, reverse=True):
        if path.startswith(old):
            return path_map[old] + path[len(old):]
    return path


def _xml_text(el: ET.Element | None, tag: str) -> str | None:
    child = None if el is None else el.find(f"{{*}}{tag}")
    return child.text.strip() if child is not None and child.text else None


def _xml_length(el: ET.Element | None, tag: str) -> float | None:
    child = None if el is None else el.find(f"{{*}}{tag}")
    if child is None or not child.text:
        return None
    return _to_um(child.text, child.get("Unit"), default_unit="m")


def _xml_position(el: ET.Element, tag: str) -> float | None:
    """A stage position in µm; unlike a pixel size it may be 0 or negative (relative to the focus)."""
    child = el.find(f"{{*}}{tag}")
    if child is None or not child.text:
        return None
    factor = _UNIT_UM.get((child.get("Unit") or "m").strip().casefold()) or 1e6
    try:
        return float(child.text) * factor
    except ValueError:
        return None


def parse_harmony_index(path: str | os.PathLike) -> dict:
    """What gradcamo needs from a Harmony ``Index.idx.xml`` (any Harmony namespace version).

    Returns a dict: ``plate`` (name or id, or None), ``channels`` {channel id: name},
    ``pixel_size`` {channel id: (y, x) µm}, ``z`` {(row, col, field, timepoint):
    {plane: PositionZ µm}}, ``files`` {file name: (row, col, field, plane, channel, timepoint)};
    timepoints count from 1, like the file names' ``sk`` (the XML's TimepointID + 1).
    """
    root = ET.parse(path).getroot()
    plate_el = root.find("{*}Plates/{*}Plate")
    info: dict[str, Any] = {"plate": _xml_text(plate_el, "Name") or _xml_text(plate_el, "PlateID"),
                            "channels": {}, "pixel_size": {}, "z": defaultdict(dict), "files": {}}
    for entry in root.iterfind(".//{*}Maps/{*}Map/{*}Entry"):
        cid, name = entry.get("ChannelID"), _xml_text(entry, "ChannelName")
        if cid is not None and name:
            info["channels"].setdefault(int(cid), name)
        if cid is not None and _xml_length(entry, "ImageResolutionX"):
            info["pixel_size"].setdefault(int(cid), (_xml_length(entry, "ImageResolutionY"), _xml_length(entry, "ImageResolutionX")))
    for im in root.iterfind("{*}Images/{*}Image"):
        try:
            ids = [int(_xml_text(im, t) or 0) for t in ("Row", "Col", "FieldID", "PlaneID", "ChannelID", "TimepointID")]
        except ValueError:
            continue
        r, c, f, p, ch, t = ids
        t += 1  # TimepointID counts from 0, the file names' sk from 1
        name = _xml_text(im, "ChannelName")
        if name:
            info["channels"].setdefault(ch, name)
        if _xml_length(im, "ImageResolutionX"):
            info["pixel_size"].setdefault(ch, (_xml_length(im, "ImageResolutionY"), _xml_length(im, "ImageResolutionX")))
        z = _xml_position(im, "PositionZ")
        if z is not None:
            info["z"][(r, c, f, t)][p] = z
        url = _xml_text(im, "URL")
        if url:
            info["files"][url] = (r, c, f, p, ch, t)
    return info


def _z_spacing(positions: Mapping[Any, Mapping[int, float]]) -> tuple[float | None, list[float]]:
    """The plane spacing (µm) of Harmony plane positions, and every distinct spacing seen."""
    steps: set[float] = set()
    for planes in positions.values():
        zs = [planes[p] for p in sorted(planes)]
        steps.update(round(abs(b - a), 4) for a, b in zip(zs, zs[1:]))
    steps.discard(0.0)
    if not steps:
        return None, []
    return float(np.median(sorted(steps))), sorted(steps)


def _scan_phenix(src: Path, o: _Options) -> _Scan:
    scan = _Scan([], [])
    folder = src / "Images" if (src / "Images").is_dir() else src
    if not folder.is_dir():
        scan.problems.append(f"{src}: not a folder; give the Harmony export folder (holding Images/ or the TIFFs)")
        return scan
    index = next((p for p in (folder / "Index.idx.xml", src / "Index.idx.xml", folder / "Index.xml", src / "Index.xml")
                  if p.exists()), None)
    meta: dict = {"plate": None, "channels": {}, "pixel_size": {}, "z": {}, "files": {}}
    if index is not None:
        try:
            meta = parse_harmony_index(index)
            scan.notes.append(f"metadata from {index}")
        except ET.ParseError as e:
            scan.problems.append(f"{index}: not valid XML ({e}); re-export it from Harmony or delete it (channels "
                                 "are then ch1..chN and need --channel-map)")
            return scan
    else:
        scan.notes.append(f"no Index.idx.xml in {folder}: channels are ch1..chN, pixel size unknown")
    entries = []
    other = 0
    for p in sorted(folder.iterdir()):
        m = _PHENIX_RE.match(p.name)
        if m is None:
            other += p.suffix.lower() in (".tif", ".tiff")
            continue
        entries.append((tuple(int(g) for g in m.groups()), p.name))
    if other:
        scan.warnings.append(f"{other} TIFF file(s) in {folder} do not follow rXXcYYfZZpWW-chNskTfkKflL.tiff and were not used")
    tp = _pick_timepoint(folder, (e[0][5] for e in entries), o.timepoint, "sk", scan)
    if tp is None:
        return scan
    extra = sorted({(e[0][6], e[0][7]) for e in entries})
    if len(extra) > 1:
        scan.problems.append(f"{folder}: several fk/fl (FLIM or multi-pass) variants {extra}; export one per folder")
        return scan
    fk, fl = extra[0] if extra else (1, 1)
    plate = o.plate or meta["plate"] or _plate_from_folder(folder)
    # Channels the index lists count even without files, so their absence is reported file by file.
    names = {ch: meta["channels"].get(ch, f"ch{ch}") for ch in sorted({e[0][4] for e in entries} | set(meta["channels"]))}
    if len(set(names.values())) < len(names):
        names = {ch: f"{n} (ch{ch})" for ch, n in names.items()}  # two channels share a name in the XML
    scan.channel_order = [names[ch] for ch in sorted(names)]
    sizes = {meta["pixel_size"][ch] for ch in names if ch in meta["pixel_size"]}
    if len(sizes) > 1:
        scan.problems.append(f"{index}: channels have different pixel sizes {sorted(sizes)} (binning per channel?); "
                             "a site needs one pixel size — re-acquire or export channels with equal binning")
    yx = next(iter(sizes)) if len(sizes) == 1 else (None, None)
    z_positions = {k: v for k, v in meta["z"].items() if k[3] == tp}
    dz, steps = _z_spacing(z_positions)
    if len(steps) > 1:
        scan.warnings.append(f"{index}: uneven plane spacing {steps} µm; using the median {dz:g} µm")
    sites: dict[tuple[int, int, int], _Raw] = {}
    for (r, c, f, p, ch, sk, *_), name in entries:
        if sk != tp:
            continue
        raw = sites.get((r, c, f))
        if raw is None:
            raw = sites[(r, c, f)] = _Raw(plate, well_name(r, c), f, origin=str(folder), root=str(folder.resolve()),
                                          expected=_phenix_expected(r, c, f, sk, fk, fl, names))
            raw.voxel_size = (dz, *yx)
        raw.planes[(float(p), names[ch])] = PlaneRef(name)
    # Images the index lists but the folder lacks are named exactly.
    on_disk = {name for _, name in entries}
    for url, (r, c, f, p, ch, t) in meta["files"].items():
        if t == tp and url not in on_disk and (r, c, f) in sites:
            sites[(r, c, f)].missing[(float(p), names.get(ch, f"ch{ch}"))] = f"{url} (listed in Index.idx.xml)"
    absent = sorted({(r, c, f) for url, (r, c, f, _, _, t) in meta["files"].items() if t == tp and (r, c, f) not in sites})
    if absent:
        scan.warnings.append(f"Index.idx.xml lists {len(absent)} field(s) with no files on disk: "
                             + _listing([f"{well_name(r, c)} f{f}" for r, c, f in absent]))
    scan.sites = list(sites.values())
    return scan


def _phenix_expected(r: int, c: int, f: int, sk: int, fk: int, fl: int, names: Mapping[int, str]) -> Callable[[float, str], str]:
    by_name = {n: ch for ch, n in names.items()}

    def expected(plane: float, ch: str) -> str:
        return f"r{r:02d}c{c:02d}f{f:02d}p{int(plane):02d}-ch{by_name.get(ch, '?')}sk{sk}fk{fk}fl{fl}.tiff"
    return expected


def _parse_htd(folder: Path) -> dict[int, str]:
    """Wavelength names from a MetaXpress .HTD plate file (``"WaveName1", "DAPI"``), if any."""
    names: dict[int, str] = {}
    for htd in sorted(p for p in folder.glob("*") if p.suffix.lower() == ".htd"):
        for line in htd.read_text(errors="replace").splitlines():
            m = re.match(r'\s*"WaveName(\d+)"\s*,\s*"(.*)"\s*$', line)
            if m and m.group(2).strip():
                names[int(m.group(1))] = m.group(2).strip()
        if names:
            break
    return names


def _metaseries_plane_info(path: Path) -> dict:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_metaseries:
                return dict(tif.metaseries_metadata.get("PlaneInfo", {}))
    except Exception:  # metadata are optional; the pixels are checked when read
        pass
    return {}


def _scan_imagexpress(src: Path, o: _Options) -> _Scan:
    scan = _Scan([], [])
    if not src.is_dir():
        scan.problems.append(f"{src}: not a folder; give the MetaXpress plate folder")
        return scan
    entries = []  # (plate, well, site, t, z, wave, relative path)
    thumbs, unmatched = 0, []
    for p in sorted(src.rglob("*")):
        if p.suffix.lower() not in (".tif", ".tiff") or not p.is_file():
            continue
        rel = p.relative_to(src)
        if "_thumb" in p.stem.lower():
            thumbs += 1
            continue
        m = _IX_RE.match(p.stem)
        if m is None:
            unmatched.append(str(rel))
            continue
        t = z = None
        for part in rel.parts[:-1]:
            if mt := re.fullmatch(r"TimePoint_(\d+)", part, re.IGNORECASE):
                t = int(mt.group(1))
            elif mz := re.fullmatch(r"ZStep_(\d+)", part, re.IGNORECASE):
                z = int(mz.group(1))
        wave = 1
        if m.group("wtail"):
            g = _IX_GUID_RE.match(m.group("wtail")) or re.match(r"^(\d+)", m.group("wtail"))
            if g is None:
                unmatched.append(str(rel))
                continue
            wave = int(g.group(1))
        plate = o.plate or (m.group("prefix") or _plate_from_folder(src))
        entries.append((plate, normalize_well(m.group("well")), int(m.group("site") or 1), t or 1, z, wave, rel))
    if thumbs:
        scan.notes.append(f"{thumbs} thumbnail file(s) ignored")
    if unmatched:
        scan.warnings.append(f"{len(unmatched)} TIFF file(s) do not follow <well>_s<site>_w<wave>.tif and were not used: "
                             + _listing(unmatched, 5))
    tp = _pick_timepoint(src, (e[3] for e in entries), o.timepoint, "TimePoint_", scan)
    if tp is None:
        return scan
    entries = [e for e in entries if e[3] == tp]
    # With ZStep_<k> folders, images beside them (no ZStep) are MetaXpress projections.
    stacked = {e[0] for e in entries if e[4] is not None}
    projections = [e for e in entries if e[0] in stacked and e[4] is None]
    if projections:
        scan.notes.append(f"{len(projections)} projection image(s) beside the ZStep_ folders ignored "
                          f"(e.g. {projections[0][6]}); the planes are read")
        entries = [e for e in entries if not (e[0] in stacked and e[4] is None)]
    htd = _parse_htd(src) or _parse_htd(src.parent)
    waves = sorted({e[5] for e in entries})
    names = {w: htd.get(w, f"w{w}") for w in waves}
    if len(set(names.values())) < len(names):
        names = {w: f"{n} (w{w})" for w, n in names.items()}
    scan.channel_order = [names[w] for w in waves]
    if htd:
        scan.notes.append("channel names from the plate's .HTD file")
    sites: dict[tuple[str, str, int], _Raw] = {}
    for plate, well, site_no, _t, z, wave, rel in entries:
        raw = sites.get((plate, well, site_no))
        if raw is None:
            raw = sites[(plate, well, site_no)] = _Raw(plate, well, site_no, origin=str(src), root=str(src.resolve()),
                                                      expected=_ix_expected(well, site_no, names, z is not None))
        key = (float(z or 0), names[wave])
        if key in raw.planes:
            scan.problems.append(f"{raw.label}: two files for wavelength {wave}"
                                 + (f" ZStep_{z}" if z else "") + f": {raw.planes[key].file} and {rel}; remove one")
        raw.planes[key] = PlaneRef(str(rel))
    # Pixel size and z step from the MetaSeries tags of a few files (headers only).
    yx: tuple[float | None, float | None] = (None, None)
    dz = None
    if entries:
        first = entries[0]
        info = _metaseries_plane_info(src / first[6])
        unit = str(info.get("spatial-calibration-units", "um"))
        yx = (_to_um(info.get("spatial-calibration-y"), unit), _to_um(info.get("spatial-calibration-x"), unit))
        same = sorted((e for e in entries if e[:3] == first[:3] and e[5] == first[5] and e[4] is not None), key=lambda e: e[4])
        if len(same) > 1:
            z1, z2 = (_metaseries_plane_info(src / e[6]).get("z-position") for e in same[:2])
            if z1 is not None and z2 is not None and z1 != z2:
                dz = abs(float(z2) - float(z1)) / (same[1][4] - same[0][4])
    for raw in sites.values():
        raw.voxel_size = (dz, *yx)
    scan.sites = list(sites.values())
    return scan


def _ix_expected(well: str, site: int, names: Mapping[int, str], stacked: bool) -> Callable[[float, str], str]:
    by_name = {n: w for w, n in names.items()}

    def expected(plane: float, ch: str) -> str:
        z = f"ZStep_{int(plane)}/" if stacked else ""
        return f"{z}{well}_s{site}_w{by_name.get(ch, '?')}*.tif"
    return expected


def _ome_hcs(ome: ET.Element) -> dict[str, tuple[str, str, int]]:
    """OME Image ID → (plate name, well, field number) from OME-XML Plate/Well/WellSample elements."""
    out: dict[str, tuple[str, str, int]] = {}
    for plate in ome.iterfind("{*}Plate"):
        pname = plate.get("Name") or plate.get("ID") or "plate"
        for w in plate.iterfind("{*}Well"):
            try:
                well = well_name(int(w.get("Row", "0")) + 1, int(w.get("Column", "0")) + 1)
            except ValueError:
                continue
            for k, ws in enumerate(w.iterfind("{*}WellSample")):
                ref = ws.find("{*}ImageRef")
                if ref is not None and ref.get("ID"):
                    out[ref.get("ID")] = (pname, well, k + 1)
    return out


def _scan_ome_tiff(src: Path, o: _Options) -> _Scan:
    import tifffile

    scan = _Scan([], [])
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if re.search(r"\.ome\.tiff?$", p.name, re.IGNORECASE))
    if not files:
        scan.problems.append(f"{src}: no *.ome.tif / *.ome.tiff files")
        return scan
    try:
        pattern = re.compile(o.name_pattern or OME_TIFF_NAME_PATTERN, re.IGNORECASE)
    except re.error as e:
        scan.problems.append(f"--name-pattern {o.name_pattern!r}: not a regular expression ({e})")
        return scan
    root = src.parent if src.is_file() else src
    for f in files:
        try:
            with tifffile.TiffFile(f) as tif:
                xml = tif.ome_metadata
                series = _tiff_series_unsqueezed(tif)
        except Exception as e:
            scan.problems.append(f"{f}: not a readable TIFF ({type(e).__name__}: {e}); re-copy or re-export it")
            continue
        if not xml:
            scan.problems.append(f"{f}: no OME-XML in the file; it is a plain TIFF — use another layout or re-save as OME-TIFF")
            continue
        ome = ET.fromstring(xml)
        images = ome.findall("{*}Image")
        if len(images) != len(series):
            scan.problems.append(f"{f}: {len(images)} OME Image element(s) but {len(series)} series; the OME-XML does not "
                                 "describe the file — re-export it")
            continue
        hcs = _ome_hcs(ome)
        m = pattern.search(f.name)
        for i, ((axes, shape), img) in enumerate(zip(series, images)):
            if img.get("ID") in hcs:
                plate, well, site_no = hcs[img.get("ID")]
                plate = o.plate or plate
            elif m is not None and m.groupdict().get("well"):
                gd = m.groupdict()
                plate = o.plate or gd.get("plate") or f.parent.name
                well = normalize_well(gd["well"])
                if gd.get("site") and len(series) > 1:
                    scan.problems.append(f"{f}: {len(series)} series but the name gives one site; give one site per file "
                                         "or OME Plate metadata")
                    break
                site_no = int(gd["site"]) if gd.get("site") else i + 1
            else:
                scan.problems.append(f"{f.name}: cannot tell plate/well/site: no OME Plate metadata and the name does not "
                                     f"match {pattern.pattern!r}; rename it or pass --name-pattern with (?P<well>…) (?P<site>…)")
                break
            raw = _ome_tiff_site(f, root, i, axes, shape, img, plate, well, site_no, o, scan)
            if raw is not None:
                scan.sites.append(raw)
    return scan


def _ome_tiff_site(f: Path, root: Path, i: int, axes: str, shape: tuple[int, ...], img: ET.Element, plate: str, well: str,
                   site_no: int, o: _Options, scan: _Scan) -> _Raw | None:
    pixels = img.find("{*}Pixels")
    sizes = dict(zip(axes, shape))
    n_c = sizes.get("C", 1)
    chans = [] if pixels is None else pixels.findall("{*}Channel")
    names = [c.get("Name") or c.get("Fluor") or f"ch{k + 1}" for k, c in enumerate(chans)]
    if len(names) != n_c:
        names = [f"ch{k + 1}" for k in range(n_c)]
    fixed, problem = _fixed_axes(axes, shape, o.timepoint)
    label = _site_label(plate, well, site_no)
    if problem:
        scan.problems.append(f"{label}: {f} series {i}: {problem}")
        return None
    for n in names:
        if n not in scan.channel_order:
            scan.channel_order.append(n)

    def phys(ax: str) -> float | None:
        if pixels is None:
            return None
        return _to_um(pixels.get(f"PhysicalSize{ax}"), pixels.get(f"PhysicalSize{ax}Unit"))

    raw = _Raw(plate, well, site_no, origin=f"{f}" + (f" series {i}" if i else ""), root=str(root.resolve()))
    raw.array = ArrayRef("tiff", str(f.resolve().relative_to(root.resolve())), str(i), axes, shape, fixed=fixed)
    raw.array_channels = tuple(names)
    raw.voxel_size = (phys("Z"), phys("Y"), phys("X"))
    return raw


def _fixed_axes(axes: str, shape: Sequence[int], timepoint: int | None) -> tuple[tuple[tuple[str, int], ...], str | None]:
    """Indices for the axes other than ZCYX; a problem text when one cannot be chosen."""
    fixed = []
    for a, n in zip(axes, shape):
        if a in "ZCYX":
            continue
        if a == "T":
            t = timepoint if timepoint is not None else 0
            if n > 1 and timepoint is None:
                return (), f"{n} timepoints; choose one with --timepoint (0-based for array layouts)"
            if t >= n:
                return (), f"timepoint {t} out of range (T = {n})"
            fixed.append((a, t))
        elif n > 1:
            return (), f"axis {a} of size {n} (axes {axes}) cannot be mapped to Z, C, Y, X; RGB/tiled data are not supported"
        else:
            fixed.append((a, 0))
    for a in "YX":
        if a not in axes:
            return (), f"no {a} axis (axes {axes})"
    return tuple(fixed), None


def _ngff(attrs: Mapping[str, Any]) -> dict:
    """NGFF metadata of a group: 0.5 nests them under "ome", 0.4 keeps them at the top."""
    attrs = dict(attrs)
    return dict(attrs.get("ome", attrs))


def _scale(transforms: Any, n: int) -> np.ndarray:
    out = np.ones(n)
    for t in transforms or ():
        if t.get("type") == "scale" and "scale" in t and len(t["scale"]) == n:
            out = out * np.asarray(t["scale"], float)
    return out


def _scan_ome_zarr(src: Path, o: _Options) -> _Scan:
    import zarr

    scan = _Scan([], [])
    try:
        group = zarr.open_group(str(src), mode="r")
    except Exception as e:
        scan.problems.append(f"{src}: not a readable Zarr group ({type(e).__name__}: {e})")
        return scan
    meta = _ngff(group.attrs)
    plate_meta = meta.get("plate")
    if not plate_meta:
        scan.problems.append(f"{src}: no NGFF 'plate' metadata; it is not an OME-Zarr HCS plate (give the plate's root "
                             "folder, or use the ome-tiff layout for single images)")
        return scan
    scan.notes.append(f"OME-Zarr (NGFF {meta.get('version') or plate_meta.get('version') or '?'})")
    rows = [r["name"] for r in plate_meta.get("rows", [])]
    cols = [c["name"] for c in plate_meta.get("columns", [])]
    plate = o.plate or plate_meta.get("name") or re.sub(r"(\.ome)?\.zarr$", "", src.name)
    root = src.resolve().parent
    for w in plate_meta.get("wells", []):
        wpath = w["path"]
        try:
            if "rowIndex" in w and "columnIndex" in w:
                well = normalize_well(f"{rows[w['rowIndex']]}{cols[w['columnIndex']]}")
            else:
                well = normalize_well("".join(wpath.split("/")))
            wmeta = _ngff(group[wpath].attrs).get("well", {})
        except (KeyError, IndexError, ValueError) as e:
            scan.problems.append(f"{src}: well {wpath!r}: {type(e).__name__}: {e}; the plate metadata and groups disagree")
            continue
        for k, im in enumerate(wmeta.get("images", [])):
            ipath = f"{wpath}/{im['path']}"
            label = _site_label(plate, well, k + 1)
            try:
                imeta = _ngff(group[ipath].attrs)
                ms = imeta["multiscales"][0]
                axes_meta = [a if isinstance(a, dict) else {"name": a} for a in ms["axes"]]
                ds = ms["datasets"][0]
                arr = group[f"{ipath}/{ds['path']}"]
            except (KeyError, IndexError, TypeError) as e:
                scan.problems.append(f"{label}: {src}/{ipath}: no readable multiscales image ({type(e).__name__}: {e})")
                continue
            axes = "".join(str(a["name"]).upper() for a in axes_meta)
            shape = tuple(int(s) for s in arr.shape)
            if len(axes) != len(shape):
                scan.problems.append(f"{label}: {src}/{ipath}: {len(axes)} axes {axes} for an array of shape {shape}")
                continue
            fixed, problem = _fixed_axes(axes, shape, o.timepoint)
            if problem:
                scan.problems.append(f"{label}: {src}/{ipath}: {problem}")
                continue
            n_c = dict(zip(axes, shape)).get("C", 1)
            names = [c.get("label") or f"ch{j + 1}" for j, c in enumerate(imeta.get("omero", {}).get("channels", []))]
            if len(names) != n_c:
                names = [f"ch{j + 1}" for j in range(n_c)]
            for n in names:
                if n not in scan.channel_order:
                    scan.channel_order.append(n)
            scale = _scale(ds.get("coordinateTransformations"), len(axes)) * _scale(ms.get("coordinateTransformations"), len(axes))
            units = {str(a["name"]).upper(): a.get("unit") for a in axes_meta}
            vs = tuple(_to_um(scale[axes.index(a)], units.get(a) or "micrometer") if a in axes and units.get(a) else None
                       for a in "ZYX")
            raw = _Raw(plate, well, k + 1, origin=f"{src}/{ipath}", root=str(root))
            raw.array = ArrayRef("zarr", src.resolve().name, f"{ipath}/{ds['path']}", axes, shape, fixed=fixed)
            raw.array_channels = tuple(names)
            raw.voxel_size = vs  # type: ignore[assignment]
            scan.sites.append(raw)
    return scan


_SCANNERS: dict[str, Callable[[Path, _Options], _Scan]] = {
    "loaddata": _scan_loaddata, "phenix": _scan_phenix, "imagexpress": _scan_imagexpress,
    "ome-tiff": _scan_ome_tiff, "ome-zarr": _scan_ome_zarr,
}


# ----------------------------------------------------------------------------- treatments


def _read_any_table(path: Path) -> pd.DataFrame:
    """A platemap table as strings ("" for empty): .txt/.tsv tab-separated, .csv comma, .parquet."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path).astype(str).replace({"nan": "", "None": ""})
    return pd.read_csv(path, sep="\t" if suffix in (".txt", ".tsv") else ",", dtype=str, keep_default_na=False)


def _platemap_tables(path: Path, plates: Sequence[str], problems: list[str]) -> dict[str, tuple[Path, pd.DataFrame]]:
    """Plate → (file, table) from a Gallery barcode_platemap.csv (→ <Plate_Map_Name>.txt) or one table."""
    if path.is_dir():
        found = [path / "barcode_platemap.csv"] if (path / "barcode_platemap.csv").exists() else sorted(path.rglob("barcode_platemap.csv"))
        if len(found) != 1:
            problems.append(f"--platemap {path}: a folder must hold exactly one barcode_platemap.csv (found {len(found)}); "
                            "give the file itself")
            return {}
        path = found[0]
    if not path.exists():
        problems.append(f"--platemap {path}: no such file")
        return {}
    try:
        table = _read_any_table(path)
    except Exception as e:
        problems.append(f"--platemap {path}: not a readable table ({type(e).__name__}: {e})")
        return {}
    out: dict[str, tuple[Path, pd.DataFrame]] = {}
    if {"Assay_Plate_Barcode", "Plate_Map_Name"} <= set(table.columns):
        barcode = {str(b).strip(): str(n).strip() for b, n in zip(table["Assay_Plate_Barcode"], table["Plate_Map_Name"])}
        for plate in plates:
            name = barcode.get(plate)
            if name is None:
                problems.append(f"plate {plate}: not in {path} (Assay_Plate_Barcode); add a row '{plate},<Plate_Map_Name>'")
                continue
            cands = [d / f"{name}{s}" for d in (path.parent / "platemap", path.parent) for s in (".txt", ".tsv", ".csv")]
            txt = next((c for c in cands if c.exists()), None)
            if txt is None:
                problems.append(f"plate {plate}: platemap {name!r} (from {path.name}) not found; expected {cands[0]}")
                continue
            try:
                out[plate] = (txt, _read_any_table(txt))
            except Exception as e:
                problems.append(f"{txt}: not a readable table ({type(e).__name__}: {e})")
        return out
    pcol = next((c for c in PLATE_COLUMNS if c in table.columns), None)
    for plate in plates:
        part = table if pcol is None else table[table[pcol].astype(str).str.strip() == plate]
        if part.empty:
            problems.append(f"plate {plate}: no rows in {path} ({pcol} = {plate!r}); add its wells")
            continue
        out[plate] = (path, part)
    return out


@dataclasses.dataclass
class _Treatments:
    by_well: dict[tuple[str, str], dict[str, Any]]
    wells: dict[str, set[str]]
    columns: set[tuple[str, str | None]]


def _well_treatments(
    tables: Mapping[str, tuple[Path, pd.DataFrame]],
    treatment_column: str | None,
    dose_column: str | None,
    controls: Sequence[str],
    empty_treatment: str,
    problems: list[str],
    warnings: list[str],
) -> _Treatments:
    out = _Treatments({}, {}, set())
    control = {c.casefold() for c in controls}
    for plate, (path, table) in tables.items():
        cols = list(table.columns)
        wcol = next((c for c in WELL_COLUMNS if c in cols), None)
        tcol = treatment_column if treatment_column else next((c for c in TREATMENT_COLUMNS if c in cols), None)
        no_dose = dose_column is not None and dose_column.lower() == "none"
        dcol = None if no_dose else (dose_column or next((c for c in DOSE_COLUMNS if c in cols), None))
        bad = []
        if wcol is None:
            bad.append(f"no well column (tried {list(WELL_COLUMNS)})")
        if tcol is None or tcol not in cols:
            bad.append(f"no treatment column {tcol!r}" if tcol else f"no treatment column (tried {list(TREATMENT_COLUMNS)}); "
                       "pass --treatment-column NAME")
        if not no_dose and (dcol is None or dcol not in cols):
            bad.append(f"no dose column {dcol!r}" if dcol else f"no dose column (tried {list(DOSE_COLUMNS)}); pass "
                       "--dose-column NAME, or --dose-column none to give every well dose 0")
        if bad:
            problems.append(f"{path} (plate {plate}): " + "; ".join(bad) + f"; its columns are {cols}")
            continue
        out.columns.add((tcol, dcol))
        skip = {wcol, *PLATE_COLUMNS, "Metadata_Treatment", "Metadata_Dose", "Metadata_Well", "Metadata_Site"}
        extra = [c for c in cols if c not in skip]
        seen: set[str] = set()
        n_empty, bad_dose, bad_well, dup = 0, [], [], []
        for row in table.to_dict("records"):
            try:
                well = normalize_well(row[wcol])
            except ValueError:
                bad_well.append(str(row[wcol]))
                continue
            if well in seen:
                dup.append(well)
                continue
            seen.add(well)
            treatment = str(row[tcol]).strip()
            if treatment in ("", "nan", "NaN", "None"):
                treatment, n_empty = empty_treatment, n_empty + 1
            if treatment.casefold() in control:
                dose = 0.0
            elif dcol is None:
                dose = 0.0
            else:
                dose = pd.to_numeric(pd.Series([row[dcol]]), errors="coerce").iloc[0]
                if not np.isfinite(dose):
                    bad_dose.append(f"{well} ({treatment}: {row[dcol]!r})")
                    continue
            values = {"Metadata_Treatment": treatment, "Metadata_Dose": float(dose)}
            values.update({c if c.startswith("Metadata_") else f"Metadata_{c}": row[c] for c in extra})
            out.by_well[(plate, well)] = values
        out.wells[plate] = seen
        if bad_well:
            problems.append(f"{path} (plate {plate}): unreadable well name(s) in {wcol}: {_listing(bad_well)}")
        if dup:
            problems.append(f"{path} (plate {plate}): well(s) listed twice: {_listing(sorted(set(dup)))}; keep one row per well")
        if bad_dose:
            problems.append(f"{path} (plate {plate}): no numeric dose in {dcol} for treated well(s) {_listing(bad_dose)}; "
                            f"fill in the dose, name another --dose-column, or list the treatment as a control (--control)")
        if n_empty:
            warnings.append(f"{path.name} (plate {plate}): {n_empty} well(s) with empty {tcol} taken as {empty_treatment!r}, dose 0")
    return out


# ----------------------------------------------------------------------------- illumination functions at import

_ILLUM_NAME_RE = re.compile(r"^(?P<plate>.+)_Illum(?P<ch>.+)\.npy$")


def find_illum_files(folder: str | os.PathLike, plate: str) -> dict[str, Path]:
    """A plate's illumination functions in a folder that follows the Cell Painting Gallery's naming.

    Looks for ``<folder>/<plate>/<plate>_Illum<Ch>.npy`` (the Gallery's ``illum/`` folder,
    one subfolder per plate) and, when that subfolder has none, ``<folder>/<plate>_Illum<Ch>.npy``
    (the plate's own folder). Returns {<Ch>: path} (e.g. {"DNA": …/BR001_IllumDNA.npy}),
    empty when there is none.
    """
    folder = Path(folder)
    for where in (folder / plate, folder):
        if not where.is_dir():
            continue
        found = {}
        for p in sorted(where.iterdir()):
            m = _ILLUM_NAME_RE.match(p.name)
            if m and m.group("plate") == plate and p.is_file():
                found[m.group("ch")] = p
        if found:
            return found
    return {}


def match_illum_channels(
    names: Sequence[str],
    mapping: Mapping[str, str],
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, str]:
    """Which illumination function (``<Ch>`` of ``Illum<Ch>``) goes with each output channel.

    An output channel takes the function named like its vendor channel (``mapping``, the
    import's `match_channels` result), with or without CellProfiler's ``Orig`` prefix
    (OrigDNA ↔ IllumDNA, ch1 ↔ Illumch1); the others are matched through the same
    channel table as the images (`match_channels` with ``aliases``), so a Gallery
    ``IllumDNA`` serves the Harmony channel "HOECHST 33342". Returns {output channel: name}
    for the channels that found one (a channel with several candidates gets none).
    """
    names = list(dict.fromkeys(str(n) for n in names))
    out: dict[str, str] = {}
    for target, vendor in mapping.items():
        want = {_norm(vendor), _norm(re.sub(r"^orig", "", vendor, flags=re.IGNORECASE))}
        hits = [n for n in names if _norm(n) in want]
        if len(hits) == 1:
            out[target] = hits[0]
    rest = [n for n in names if n not in out.values()]
    targets = [t for t in mapping if t not in out]
    if rest and targets:
        out.update(match_channels(rest, targets, None, aliases).mapping)
    return out


def _illum_file_problem(path: str, raw: _Raw) -> str | None:
    """Why `path` cannot correct the images of site `raw` (None when it can), from headers only:
    the values are checked when a site is read (`load_illum`)."""
    if "://" in path:
        return "not a local path; mirror it and map the prefix with --path-map"
    if not os.path.isfile(path):
        return "does not exist"
    try:
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape  # the header only
    except Exception as e:
        return f"not a readable .npy array ({type(e).__name__}: {e})"
    if len(shape) != 2:
        return f"expected a 2-D (Y, X) array, got shape {shape}"
    yx = _raw_yx(raw)
    if yx is not None and shape != yx:
        return f"has shape (Y, X) = {shape} but the images of {raw.label} are {yx}; use the functions made for these images"
    return None


def _raw_yx(raw: _Raw) -> tuple[int, int] | None:
    """A scanned site's image Y×X, from metadata or one TIFF header (no pixels); None when unknown."""
    if raw.array is not None:
        dims = dict(zip(raw.array.axes, raw.array.shape))
        return (dims["Y"], dims["X"]) if "Y" in dims and "X" in dims else None
    ref = next(iter(raw.planes.values()), None)
    if ref is None:
        return None
    try:
        shape = list(formats.stack_shape(Path(raw.root) / ref.file))
    except Exception:  # unreadable files are reported, with their name, when the site is read
        return None
    while len(shape) > 2 and shape[-1] == 1:  # a trailing sample axis of size 1
        shape.pop()
    return (shape[-2], shape[-1]) if len(shape) >= 2 else None


def _resolve_illum(
    sites: Sequence[_Raw],
    illum: str | os.PathLike | None,
    skip: Sequence[str],
    mapping: Mapping[str, str],
    channels: Sequence[str],
    aliases: Mapping[str, Sequence[str]] | None,
    problems: list[str],
    warnings: list[str],
    notes: list[str],
) -> dict[tuple[str, str, int], tuple[str | None, ...]]:
    """The illumination function of each site's output channels (`Site.illum`), from LoadData's
    ``FileName_Illum<Ch>`` columns (``illum`` None), a Gallery-style folder (``illum``), or none
    (``illum`` "none"). Problems (missing files, channels without a function that are not in
    ``skip``, unreadable or mis-sized functions) are appended, grouped, naming sites and files."""
    out: dict[tuple[str, str, int], tuple[str | None, ...]] = {}
    unknown = [c for c in skip if c not in channels]
    if unknown:
        problems.append(f"--illum-skip {','.join(unknown)}: not output channel(s) {list(channels)}")
    loaddata = any(r.illum for r in sites)
    if illum is not None and str(illum).strip().lower() == "none":
        if loaddata:
            notes.append("FileName_Illum<Ch> columns not applied (--illum none): raw images are read")
        return out
    by_plate: dict[str, dict[str, str]] = {}
    if illum is not None:
        folder = Path(illum).expanduser()
        if not folder.is_dir():
            problems.append(f"--illum {illum}: not a folder; give the folder holding <plate>/<plate>_Illum<Ch>.npy "
                            "(the Gallery's illum/), or 'none'")
            return out
        if loaddata:
            notes.append(f"illumination functions from {folder} (--illum), not from the FileName_Illum<Ch> columns")
        for plate in sorted({r.plate for r in sites}):
            by_plate[plate] = {k: str(v.resolve()) for k, v in find_illum_files(folder, plate).items()}
            if not by_plate[plate]:
                problems.append(f"plate {plate}: no illumination functions {folder / plate / (plate + '_Illum<Ch>.npy')} "
                                f"(nor {folder / (plate + '_Illum<Ch>.npy')}); add them, or pass --illum none")
    lacking: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[str]] = defaultdict(list)
    checked: dict[str, str | None] = {}  # function file → its problem (None: usable)
    for r in sites:
        found = by_plate.get(r.plate, {}) if illum is not None else r.illum
        if not found:
            need = tuple(c for c in channels if c not in skip)
            if illum is None and loaddata and need:  # empty FileName_Illum cells while other sites have them
                lacking[(r.plate, need, ())].append(f"{r.well} s{r.site}")
            continue
        match = match_illum_channels(list(found), mapping, aliases)
        files = {t: found[n] for t, n in match.items()}
        missing = tuple(t for t in channels if t not in files and t not in skip)
        if missing:
            lacking[(r.plate, missing, tuple(found))].append(f"{r.well} s{r.site}")
            continue
        for t in skip:
            files.pop(t, None)
        for f in files.values():
            if f not in checked:  # each file once: a plate's sites share their functions
                checked[f] = _illum_file_problem(f, r)
        if files:
            out[r.key] = tuple(files.get(t) for t in channels)
    source = "in the --illum folder" if illum is not None else "in the FileName_Illum<Ch> columns"
    for (plate, missing, found), where in sorted(lacking.items()):
        have = f"have illumination functions {list(found)}" if found else "have no illumination functions (others do)"
        problems.append(
            f"plate {plate}: {len(where)} site(s) ({_listing(where, 6)}) {have} {source} but none for output "
            f"channel(s) {list(missing)}; add them, pass --illum-skip {','.join(missing)} to read those channels "
            "uncorrected, or --illum none for no correction")
    for f, why in sorted((f, why) for f, why in checked.items() if why):
        problems.append(f"illumination function {f}: {why}; {_ILLUM_FIX}")
    if skip and out:
        warnings.append(f"channel(s) {list(skip)} read without illumination correction (--illum-skip)")
    return out


# ----------------------------------------------------------------------------- import


@dataclasses.dataclass
class ImportReport:
    """What `import_plate` found: printed by ``gradcamo import``; ``to_dict`` for JSON.

    ``planes`` maps planes per site (Z) → number of sites; ``voxel_sizes`` lists the distinct (z, y, x) µm values.
    ``illum`` maps each output channel → the illumination-function files that correct it (empty: uncorrected).
    ``warnings`` are problems that did not stop the import; ``skipped`` lists sites
    left out on request (--skip-incomplete / --skip-unmapped-wells), with the reason.
    """

    layout: str
    src: str
    plates: list[str]
    n_wells: int
    n_sites: int
    channels: dict[str, str]
    unused_channels: list[str]
    planes: dict[Any, int]
    voxel_sizes: list[tuple[float | None, float | None, float | None]]
    treatments: list[str]
    treatment_columns: list[tuple[str, str | None]]
    warnings: list[str]
    skipped: list[str]
    notes: list[str]
    plate_map: str | None = None
    sites_dir: str | None = None
    sites: list[Site] = dataclasses.field(default_factory=list, repr=False)
    illum: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sites"}
        d["planes"] = {str(k): v for k, v in self.planes.items()}
        return d

    def summary(self) -> str:
        lines = [
            f"{self.layout} import of {self.src}: {len(self.plates)} plate(s) {_listing(self.plates, 5)}, "
            f"{self.n_wells} well(s), {self.n_sites} site(s)",
            "channels: " + ", ".join(f"{t} ← {s!r}" for t, s in self.channels.items()),
        ]
        lines.append("planes per site: " + ", ".join(f"{'?' if k is None else k} ({v} sites)" for k, v in self.planes.items()))
        lines.append("voxel size (z, y, x) µm: " + ", ".join(_fmt_voxel(v) for v in self.voxel_sizes))
        if any(self.illum.values()):
            lines.append("illumination correction: " + ", ".join(
                f"{t} ← {_listing([Path(f).name for f in fs], 2)}" if fs else f"{t} none" for t, fs in self.illum.items()))
        else:
            lines.append("illumination correction: none")
        cols = ", ".join(f"{t} / {d or 'dose 0'}" for t, d in self.treatment_columns) or "none (no --platemap)"
        lines.append(f"treatments: {len(self.treatments)} ({_listing(self.treatments, 6)}); columns {cols}")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"WARNING: {w}" for w in self.warnings]
        lines += [f"SKIPPED: {s}" for s in self.skipped]
        if self.plate_map:
            lines.append(f"plate map: {self.plate_map} (site descriptors in {self.sites_dir})")
        return "\n".join(lines)


def import_plate(
    layout: str,
    src: str | os.PathLike,
    *,
    platemap: str | os.PathLike | None = None,
    channel_map: Mapping[str, str] | None = None,
    channels: Sequence[str] = formats.CHANNELS,
    aliases: Mapping[str, Sequence[str]] | None = None,
    out: str | os.PathLike | None = None,
    sites_dir: str | os.PathLike | None = None,
    treatment_column: str | None = None,
    dose_column: str | None = None,
    controls: Sequence[str] = ("DMSO",),
    empty_treatment: str = "DMSO",
    plate: str | None = None,
    timepoint: int | None = None,
    plane_column: str | None = None,
    path_map: Mapping[str, str] | None = None,
    name_pattern: str | None = None,
    voxel_size: Sequence[float] | None = None,
    skip_incomplete: bool = False,
    skip_unmapped_wells: bool = False,
    allow_mixed_voxel_size: bool = False,
    check_files: bool = True,
    illum: str | os.PathLike | None = None,
    illum_skip: Sequence[str] = (),
) -> tuple[pd.DataFrame, ImportReport]:
    """Turn a plate in one of `LAYOUTS` into plate-map rows pointing at its original files.

    Reads names, CSVs and metadata only (no pixels); every problem is collected and
    raised together, site by site.

    Args:
      layout: one of `LAYOUTS`.
      src: the layout's folder, CSV, file or Zarr store (see the module docstring).
      platemap: treatments: a Gallery ``barcode_platemap.csv`` (Assay_Plate_Barcode,
        Plate_Map_Name → ``platemap/<Plate_Map_Name>.txt`` beside it), a folder holding
        one, or one table (.txt/.tsv tab-separated, .csv, .parquet) with a well column
        (`WELL_COLUMNS`) and optionally a plate column (`PLATE_COLUMNS`). Its other
        columns are carried as ``Metadata_<name>``. None: every site gets treatment
        "unknown", dose 0 (or LoadData's own Metadata_Treatment/Metadata_Dose).
      channel_map: output channel → vendor channel name, overriding the table.
      channels: output channel names, in C order (default `formats.CHANNELS`).
      aliases: replaces `DEFAULT_CHANNEL_ALIASES` (and turns off `STAIN_KEYWORDS`).
      out: plate map to write (.csv/.parquet). Site descriptors go to ``sites_dir``
        (default ``<out folder>/<out stem>_sites/``, replaced atomically) and
        ``FileName_Image`` is relative to the plate map's folder. None: nothing is
        written; FileName_Image holds the descriptor names and ``report.sites`` the
        `Site` objects (read them with `read_site`).
      treatment_column, dose_column: platemap columns (default: the first of
        `TREATMENT_COLUMNS` / `DOSE_COLUMNS` present); dose_column="none" gives dose 0.
      controls: treatments whose dose is 0 whatever the platemap says (vehicle).
      empty_treatment: treatment given to wells whose treatment cell is empty (the
        Gallery leaves the DMSO wells' broad_sample empty).
      plate: plate name for every site (overrides names found in the data).
      timepoint: which timepoint to read when there are several (phenix sk / IX
        TimePoint_ numbers; 0-based T index for ome-tiff/ome-zarr).
      plane_column: LoadData column numbering the planes (default `PLANE_COLUMNS`).
      path_map: LoadData path prefix rewrites {"s3://bucket/prefix": "/mnt/prefix"}.
      name_pattern: ome-tiff file-name regex with groups well, optional plate and site.
      voxel_size: (z, y, x) µm for every site, replacing what metadata say.
      skip_incomplete: leave out (and list) sites with missing channels/planes
        instead of failing.
      skip_unmapped_wells: leave out (and list) sites whose well is in no platemap
        instead of failing.
      allow_mixed_voxel_size: accept sites with different voxel sizes (warned).
      check_files: check that every LoadData file exists (one stat per file).
      illum: illumination correction (CellProfiler's functions, ``.npy`` of the image's
        Y×X; reading a site divides each channel by its function, before any
        normalisation). None: LoadData's ``FileName_Illum<Ch>``/``PathName_Illum<Ch>``
        columns when the CSV has them, else none. A folder: the Cell Painting Gallery's
        naming, ``<illum>/<plate>/<plate>_Illum<Ch>.npy`` (or ``<illum>/<plate>_Illum<Ch>.npy``),
        for every layout. "none": no correction. ``<Ch>`` is matched to the output
        channels like the images' channel names (`match_illum_channels`).
      illum_skip: output channels read without correction although others have a function
        (otherwise a channel without one is an error).

    Returns:
      (plate map, report): one row per site sorted by plate, well, site, with the
      `formats.PLATE_MAP_COLUMNS` + ``Metadata_Layout``, ``Metadata_PhysicalSizeZ/Y/X``
      (µm, NaN when unknown) + platemap and LoadData ``Metadata_*`` columns.

    Raises:
      LayoutError (ValueError): unknown layout; nothing found; a channel that cannot
        be matched; sites with missing channel/plane files; duplicate sites; mixed
        voxel sizes; image wells in no platemap; unreadable platemaps; illumination
        functions missing (for a file or a channel), unreadable, not 2-D or not the
        images' Y×X. Warnings (in
        the report): unused vendor channels, platemap wells without images, unknown
        voxel sizes, files that fit no naming rule, ignored projections/thumbnails.
    """
    src = Path(src).expanduser()
    if layout not in _SCANNERS:
        raise LayoutError(src, layout, [f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}"])
    if not src.exists():
        raise LayoutError(src, layout, [f"{src} does not exist"])
    channels = tuple(channels)
    if len(set(channels)) != len(channels) or not channels:
        raise LayoutError(src, layout, [f"output channels {list(channels)} must be distinct and non-empty"])
    o = _Options(plate, timepoint, plane_column, dict(path_map or {}), name_pattern, check_files)
    scan = _SCANNERS[layout](src, o)
    problems, warnings, skipped = list(scan.problems), list(scan.warnings), []
    if not scan.sites and not problems:
        problems.append(f"no images found in {src} for layout {layout!r}; is it another layout?")
    if problems and not scan.sites:
        raise LayoutError(src, layout, problems)

    # Sites are told apart by their descriptor name (`formats.site_id`, which makes names file-safe), so two
    # sites whose plate names differ only in characters it replaces ("P 1", "P/1") cannot share one descriptor.
    groups: dict[str, list[_Raw]] = defaultdict(list)
    for raw in scan.sites:
        groups[formats.site_id(*raw.key)].append(raw)
    for sid, raws in groups.items():
        if len(raws) < 2:
            continue
        origins = _listing([r.origin for r in raws], 3)
        labels = list(dict.fromkeys(r.label for r in raws))
        if len(labels) == 1:
            problems.append(f"{labels[0]} found {len(raws)} times ({origins}); "
                            "pass --plate to tell plates apart or remove the copies")
        else:
            problems.append(f"{', '.join(labels)} would share the site descriptor {sid}{SITE_SUFFIX} (names are made "
                            f"file-safe) ({origins}); import these plates separately with distinct --plate names")

    match = match_channels(scan.channel_order, channels, channel_map, aliases)
    problems += match.problems
    if match.problems:
        raise LayoutError(src, layout, problems)
    if match.unused:
        warnings.append(f"channel(s) {list(match.unused)} not used (not in the channel table); map one with "
                        "--channel-map <output>=<channel> if it is needed")
    sources = [match.mapping[t] for t in channels]

    # Completeness: every site must have every mapped channel in every plane its plate has.
    plate_planes: dict[str, set[float]] = defaultdict(set)
    for raw in scan.sites:
        plate_planes[raw.plate].update(p for p, ch in raw.planes if ch in sources)
    complete: list[_Raw] = []
    for raw in scan.sites:
        missing = [m for (_, ch), m in raw.missing.items() if ch in sources]
        if raw.array is None:
            for p in sorted(plate_planes[raw.plate]):
                for ch in sources:
                    if (p, ch) not in raw.planes and (p, ch) not in raw.missing:
                        missing.append(raw.expected(p, ch) if raw.expected else f"plane {p:g} channel {ch}")
        else:
            lacking = [ch for ch in sources if ch not in raw.array_channels]
            if lacking:
                missing.append(f"channel(s) {lacking} (the image has {list(raw.array_channels)})")
        if missing:
            text = f"{raw.label} ({raw.origin}): missing {len(missing)} channel/plane image(s): {_listing(missing, 6)}"
            if skip_incomplete:
                skipped.append(text)
            else:
                problems.append(text + "; restore the files, or pass --skip-incomplete to leave the site out")
            continue
        complete.append(raw)

    # Voxel sizes: one physical scale per import, because crops have a fixed voxel size.
    if voxel_size is not None:
        vs = tuple(None if v is None else float(v) for v in voxel_size)
        if len(vs) != 3:
            raise LayoutError(src, layout, [f"voxel_size must be (z, y, x), got {voxel_size}"])
        differs = {r.voxel_size for r in complete if r.voxel_size != (None, None, None)} - {vs}
        if differs:
            warnings.append(f"voxel size {_fmt_voxel(vs)} given replaces the metadata's {[_fmt_voxel(d) for d in differs]}")
        for r in complete:
            r.voxel_size = vs  # type: ignore[assignment]
    by_vs: dict[tuple, list[_Raw]] = defaultdict(list)
    for r in complete:
        by_vs[tuple(None if v is None else float(f"{v:.4g}") for v in r.voxel_size)].append(r)
    mixed = any(len({k[a] for k in by_vs if k[a] is not None}) > 1 for a in range(3))
    if mixed:
        text = "sites have different voxel sizes (z, y, x) µm: " + "; ".join(
            f"{_fmt_voxel(k)}: {len(v)} site(s), e.g. {_listing([f'{r.label} ({r.origin})' for r in v], 3)}"
            for k, v in sorted(by_vs.items(), key=lambda kv: -len(kv[1])))
        if allow_mixed_voxel_size:
            warnings.append(text)
        else:
            problems.append(text + "; crops have a fixed voxel size: import the groups separately (or resample), "
                                   "or pass --allow-mixed-voxel-size")
    unknown = [r for r in complete if None in r.voxel_size[1:]]
    if unknown:
        warnings.append(f"pixel size unknown for {len(unknown)} site(s) (no metadata); pass --voxel-size Z,Y,X to record it")

    # Treatments.
    plates = sorted({r.plate for r in scan.sites})
    treat_cols: list[tuple[str, str | None]] = []
    if platemap is not None:
        tables = _platemap_tables(Path(platemap).expanduser(), plates, problems)
        tr = _well_treatments(tables, treatment_column, dose_column, controls, empty_treatment, problems, warnings)
        treat_cols = sorted(tr.columns, key=str)
        imaged = defaultdict(set)
        for r in scan.sites:
            imaged[r.plate].add(r.well)
        for p, wells in sorted(tr.wells.items()):
            lonely = sorted(wells - imaged[p])
            if lonely:
                warnings.append(f"plate {p}: {len(lonely)} platemap well(s) have no images: {_listing(lonely, 12)}")
        kept = []
        unmapped: dict[tuple[str, str], list[_Raw]] = defaultdict(list)
        for r in complete:
            # Wells listed with a bad row are reported as such above, not as unmapped.
            if r.plate in tr.wells and r.well not in tr.wells[r.plate]:
                unmapped[(r.plate, r.well)].append(r)
            else:
                kept.append(r)
        for (p, w), rs in sorted(unmapped.items()):
            text = (f"plate {p} well {w}: {len(rs)} site(s) ({_listing([f's{r.site}' for r in rs], 6)}, {rs[0].origin}) "
                    f"but the well is in no platemap")
            if skip_unmapped_wells:
                skipped.append(text)
            else:
                problems.append(text + "; add the well to the platemap, or pass --skip-unmapped-wells to leave it out")
        complete = kept
    else:
        tr = None
        warnings.append("no --platemap: every site has Metadata_Treatment 'unknown' and dose 0 unless the source "
                        "carries Metadata_Treatment/Metadata_Dose")

    notes = list(scan.notes)
    site_illum = _resolve_illum(complete, illum, tuple(illum_skip), match.mapping, channels, aliases,
                                problems, warnings, notes)

    if problems:
        raise LayoutError(src, layout, problems)

    # Build the sites and the plate map.
    complete.sort(key=lambda r: (r.plate, r.well, r.site))
    sites: list[Site] = []
    rows: list[dict[str, Any]] = []
    for r in complete:
        if r.array is None:
            zs = sorted(plate_planes[r.plate])
            planes = tuple(tuple(r.planes[(z, ch)] for ch in sources) for z in zs)
            site = Site(r.plate, r.well, r.site, layout, channels, tuple(sources), r.root, planes=planes,
                        voxel_size=r.voxel_size, metadata=tuple(sorted(r.metadata.items())),
                        illum=site_illum.get(r.key, ()))
        else:
            idx = tuple(r.array_channels.index(ch) for ch in sources)
            site = Site(r.plate, r.well, r.site, layout, channels, tuple(sources), r.root,
                        array=dataclasses.replace(r.array, channel_index=idx), voxel_size=r.voxel_size,
                        metadata=tuple(sorted(r.metadata.items())), illum=site_illum.get(r.key, ()))
        sites.append(site)
        row: dict[str, Any] = {"Metadata_Plate": r.plate, "Metadata_Well": r.well, "Metadata_Site": r.site}
        if tr is not None:
            row.update(tr.by_well[(r.plate, r.well)])
        else:
            row["Metadata_Treatment"] = str(r.metadata.get("Metadata_Treatment") or "unknown")
            dose = pd.to_numeric(pd.Series([r.metadata.get("Metadata_Dose", 0.0)]), errors="coerce").iloc[0]
            row["Metadata_Dose"] = float(dose) if np.isfinite(dose) else 0.0
        row["FileName_Image"] = site.site_id + SITE_SUFFIX
        row["Metadata_Layout"] = layout
        for col, v in zip(formats.PHYSICAL_SIZE_COLUMNS, r.voxel_size):
            row[col] = np.nan if v is None else v
        for k, v in r.metadata.items():
            row.setdefault(k, v)
        rows.append(row)
    df = pd.DataFrame(rows)
    df = df[list(formats.PLATE_MAP_COLUMNS) + [c for c in df.columns if c not in formats.PLATE_MAP_COLUMNS]]

    planes: Counter = Counter()  # planes per site → number of sites
    array_planes: dict[str, set[int]] = defaultdict(set)
    depth = None  # LoadData files read whole may be (Z, Y, X) stacks: one header tells (assumed plate-wide)
    for s in sites:
        if s.array is not None:
            n = dict(zip(s.array.axes, s.array.shape)).get("Z", 1)
            array_planes[s.plate].add(n)
        elif s.layout == "loaddata" and any(ref.frame is None for ref in s.planes[0]):
            depth = _file_depth(s) if depth is None else depth
            n = depth * len(s.planes)
        else:
            n = len(s.planes)
        planes[n] += 1
    for p, zs in sorted(array_planes.items()):
        if len(zs) > 1:
            warnings.append(f"plate {p}: sites have different numbers of planes {sorted(zs)}")
    report = ImportReport(
        layout=layout, src=str(src), plates=sorted({s.plate for s in sites}), n_wells=len({(s.plate, s.well) for s in sites}),
        n_sites=len(sites), channels=dict(match.mapping), unused_channels=list(match.unused), planes=dict(planes),
        voxel_sizes=sorted({s.voxel_size for s in sites}, key=str), treatments=sorted(set(df["Metadata_Treatment"])) if rows else [],
        treatment_columns=treat_cols, warnings=warnings, skipped=skipped, notes=notes, sites=sites,
        illum={t: sorted({s.illum[c] for s in sites if s.illum and s.illum[c]}) for c, t in enumerate(channels)},
    )
    if out is not None:
        _write_import(df, sites, Path(out), sites_dir, report)
    return df, report


def _file_depth(site: Site) -> int:
    """Planes per file of a LoadData site whose files are read whole (header only): 1 for 2D files."""
    try:
        shape = list(formats.stack_shape(Path(site.root) / site.planes[0][0].file))
    except Exception:  # unreadable files are reported, with their name, when the site is read
        return 1
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return shape[0] if len(shape) == 3 else 1


def _write_import(df: pd.DataFrame, sites: Sequence[Site], out: Path, sites_dir: Any, report: ImportReport) -> None:
    """Write the descriptors and the plate map so that they land together.

    The whole descriptor folder is swapped in at once, so a re-import never mixes old and new
    sites. The plate map is written (to a temporary) before that swap and renamed over the old
    one right after it, so any failure up to the swap (a descriptor or the plate map that cannot
    be written) leaves the old plate map and descriptors as they were.
    """
    out = out.expanduser().resolve()
    folder = Path(sites_dir).expanduser().resolve() if sites_dir is not None else out.parent / f"{out.stem}_sites"
    names = [os.path.relpath(folder / n, out.parent) for n in df["FileName_Image"]]
    with formats.atomic_path(out) as tmp_map:
        with formats.atomic_path(folder) as tmp:
            tmp.mkdir(parents=True)
            for site in sites:
                write_site_file(site, tmp / f"{site.site_id}{SITE_SUFFIX}")
            formats.write_plate_map(df.assign(FileName_Image=names), tmp_map)
    df["FileName_Image"] = names
    report.plate_map, report.sites_dir = str(out), str(folder)


# ----------------------------------------------------------------------------- command line


def _pairs(values: Sequence[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values or ():
        for item in value.split(","):
            if not item.strip():
                continue
            if "=" not in item:
                raise ValueError(f"{what} {item!r}: expected NAME=VALUE")
            k, v = item.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gradcamo import --layout L SRC --out plate_map.csv ...``."""
    parser.add_argument("src", help="the plate: LoadData CSV or folder, Harmony export folder, MetaXpress plate folder, "
                                    "OME-TIFF file or folder, OME-Zarr plate store")
    parser.add_argument("--layout", required=True, choices=LAYOUTS, help="how the plate is stored")
    parser.add_argument("--out", required=True, help="plate map to write (.csv or .parquet); site descriptors go to "
                                                     "<out folder>/<out stem>_sites/")
    parser.add_argument("--platemap", default=None, help="treatments: Gallery barcode_platemap.csv (or its folder), or one "
                                                         "table with well_position/Metadata_Well + treatment + dose columns")
    parser.add_argument("--channel-map", action="append", default=None, metavar="OUT=CHANNEL,...",
                        help="name the vendor channel of an output channel, e.g. DNA=ch1,ER=ch2 (repeatable)")
    parser.add_argument("--channels", default=",".join(formats.CHANNELS), help="output channels in order (default %(default)s)")
    parser.add_argument("--treatment-column", default=None, help=f"platemap treatment column (default: first of {list(TREATMENT_COLUMNS)})")
    parser.add_argument("--dose-column", default=None, help=f"platemap dose column (default: first of {list(DOSE_COLUMNS)}); "
                                                            "'none' = dose 0 everywhere")
    parser.add_argument("--control", action="append", default=None, help="vehicle treatment(s) with dose 0 (default DMSO)")
    parser.add_argument("--empty-treatment", default="DMSO", help="treatment of wells with an empty treatment cell")
    parser.add_argument("--plate", default=None, help="plate name for every site (default: from the data)")
    parser.add_argument("--timepoint", type=int, default=None, help="timepoint to read when there are several")
    parser.add_argument("--plane-column", default=None, help=f"LoadData plane column (default: first of {list(PLANE_COLUMNS)})")
    parser.add_argument("--path-map", action="append", default=None, metavar="OLD=NEW",
                        help="rewrite LoadData path prefixes, e.g. s3://cellpainting-gallery=/data/cpg (repeatable)")
    parser.add_argument("--name-pattern", default=None, help="ome-tiff file-name regex with (?P<well>…) [(?P<site>…) (?P<plate>…)]")
    parser.add_argument("--voxel-size", default=None, metavar="Z,Y,X", help="voxel size in µm for every site")
    parser.add_argument("--illum", default=None, metavar="DIR|none",
                        help="illumination functions to divide the images by: a folder with <plate>/<plate>_Illum<Ch>.npy "
                             "(Cell Painting Gallery naming), or 'none' [LoadData's FileName_Illum<Ch> columns if any]")
    parser.add_argument("--illum-skip", default=None, metavar="CH[,CH]",
                        help="output channels to read without illumination correction when the others have it")
    parser.add_argument("--sites-dir", default=None, help="folder for the site descriptors")
    parser.add_argument("--skip-incomplete", action="store_true", help="leave out sites with missing channels/planes (listed)")
    parser.add_argument("--skip-unmapped-wells", action="store_true", help="leave out sites whose well is in no platemap (listed)")
    parser.add_argument("--allow-mixed-voxel-size", action="store_true", help="accept sites with different voxel sizes")
    parser.add_argument("--no-check-files", action="store_true", help="do not stat every LoadData file")
    parser.add_argument("--report", default=None, help="also write the import report as JSON here")


def run_import(args: argparse.Namespace) -> int:
    """Run ``gradcamo import``: write the plate map and descriptors, print the summary.

    Returns 0 on success, 2 when the layout cannot be imported (the problems go to stderr).
    """
    try:
        voxel = None
        if args.voxel_size:
            voxel = tuple(float(v) for v in args.voxel_size.split(","))
        _, report = import_plate(
            args.layout, args.src, platemap=args.platemap, channel_map=_pairs(args.channel_map, "--channel-map"),
            channels=[c.strip() for c in args.channels.split(",") if c.strip()], out=args.out, sites_dir=args.sites_dir,
            treatment_column=args.treatment_column, dose_column=args.dose_column,
            controls=tuple(args.control) if args.control else ("DMSO",), empty_treatment=args.empty_treatment,
            plate=args.plate, timepoint=args.timepoint, plane_column=args.plane_column,
            path_map=_pairs(args.path_map, "--path-map"), name_pattern=args.name_pattern, voxel_size=voxel,
            skip_incomplete=args.skip_incomplete, skip_unmapped_wells=args.skip_unmapped_wells,
            allow_mixed_voxel_size=args.allow_mixed_voxel_size, check_files=not args.no_check_files,
            illum=args.illum, illum_skip=[c.strip() for c in (args.illum_skip or "").split(",") if c.strip()],
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"gradcamo import: {e}", file=sys.stderr)
        return 2
    if args.report:
        formats.write_json(report.to_dict(), args.report)
    print(report.summary())
    return 0
