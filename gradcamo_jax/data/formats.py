"""The only module that reads or writes files: plate maps, stacks, labels, cell tables, crop stores.

Everything else (synthetic plates, tools/segment.py, tools/crop.py, the grain
pipeline) calls these functions, so a format lives in exactly one place and every
bad input fails here with a message that names the file (and row or cell) and says
how to fix it. Every writer is atomic: it writes a temporary sibling and renames it
over the target with ``os.replace``, so a killed process never leaves a half-written
file under the final name.

Public API (axis orders are part of the contract):

Plate maps (one row per imaged site; CSV or Parquet, chosen by suffix)
  read_plate_map(path, *, check_files=True) -> pandas.DataFrame
      Validates the required columns (`PLATE_MAP_COLUMNS`), rejects duplicate
      (plate, well, site) rows and rows whose files are missing (the error lists the
      rows). `FileName_Image` / `FileName_Labels` come back as absolute paths
      (relative names resolve against the plate map's folder). The frame's
      ``attrs["plate_map"]`` holds the plate map's own path.
  write_plate_map(df, path) -> Path

Stacks (one TIFF per site, axes ZCYX)
  read_stack(path, *, axes="ZCYX", channels=None) -> np.ndarray float32 (Z, C, Y, X)
      `axes` is the file's axis order (any permutation of "ZCYX"); the result is
      always ZCYX. `channels` is the expected channel count or names. Raises
      ValueError (naming the file) for a corrupt/truncated TIFF, a wrong rank, an
      axis order recorded in the file that differs from `axes`, a channel count or
      names that differ from `channels`, NaN/inf voxels or a constant channel.
  write_stack(path, array_zcyx, channel_names=None) -> Path
      Any numeric dtype is stored as is (uint16 is typical); axes and channel names
      go into the TIFF's shaped metadata so `read_stack` can check them.
  stack_shape(path) -> tuple (shape as stored, without reading pixels)
  check_channel_count(n_channels, channels, where, ...), check_channel_names(names, channels, where, ...),
  check_zcyx(array_zcyx, where, channel_names=None)
      The checks `read_stack` makes (also used by `readers.read_site`): channel count
      and names against the expected `channels`; NaN/inf voxels and constant channels.
      Each raises ValueError starting with `where` (the file or site).

Labels (one TIFF per site, axes ZYX, 0 = background, one id per cell)
  read_labels(path, expect_shape=None) -> np.ndarray int32 (Z, Y, X)
  write_labels(path, labels) -> Path        (uint16, or uint32 above 65535 ids)

Cell tables (a dataset folder's cells.parquet)
  read_cells(dataset_dir) -> pandas.DataFrame
  write_cells(df, dataset_dir) -> Path

Crop stores (a dataset folder's crops.zarr, Zarr v3, chunk = one cell)
  open_crops(dataset_dir) -> CropStore   read-only; pickles by path (grain workers)
      .image  (N, Z, Y, X, C) float16/float32, .mask (N, Z, Y, X) uint8 with
      MASK_CENTRAL = 1 (the central cell), MASK_OTHER = 2 (any other cell),
      MASK_BACKGROUND = 0; both take integer, slice and integer-array (fancy)
      indexing on the first axis and return NumPy arrays. len(store) = N;
      .channels, .attrs (normalisation, crop size, class names).
  write_crop_store(path, image, mask, attrs=None) -> Path   (one shot, atomic)
  crop_store_writer(path, n, crop_zyx, n_channels, dtype="float16", attrs=None)
      context manager yielding a writer with .write(start, image, mask) (rows
      start … start + len(image)); the store appears at `path` only on success.
  link_crop_stores(parts, path, attrs=None) -> Path
      Concatenates stores along N by hard-linking (or copying) their encoded chunk
      files: the merge step of tools/crop.py, with no decode/encode round trip.

Other tables and small JSON documents (ground truth, summaries)
  read_table(path) -> DataFrame, write_table(df, path) -> Path   (.csv or .parquet)
  write_json(obj, path, *, indent=2) -> Path, read_json(path) -> object

Helpers
  atomic_path(path)  context manager yielding a temporary sibling that is renamed
                     over `path` on success (files or folders) and removed on error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

CHANNELS: tuple[str, ...] = ("DNA", "ER", "RNA", "AGP", "Mito")
"""Cell Painting channel names, in stack order: Hoechst (DNA), concanavalin A (ER),
SYTO 14 (RNA/nucleoli), phalloidin + WGA (actin, Golgi, plasma membrane) and
MitoTracker (mitochondria)."""

SITE_KEY: tuple[str, str, str] = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")
"""Columns that identify one imaged site; unique in a plate map."""

PLATE_MAP_COLUMNS: tuple[str, ...] = SITE_KEY + ("Metadata_Treatment", "Metadata_Dose", "FileName_Image")
"""Required plate-map columns. Optional: FileName_Labels and any other Metadata_*."""

PHYSICAL_SIZE_COLUMNS: tuple[str, ...] = ("Metadata_PhysicalSizeZ", "Metadata_PhysicalSizeY", "Metadata_PhysicalSizeX")
"""Optional plate-map columns: a site's voxel size (z, y, x) in µm (`gradcamo import` writes them; NaN = unknown)."""

CELLS_FILE = "cells.parquet"
CROPS_STORE = "crops.zarr"

MASK_BACKGROUND, MASK_CENTRAL, MASK_OTHER = 0, 1, 2
"""Mask codes in crops.zarr/mask."""

_TMP_PREFIX = ".tmp-"


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success rename it over `path`.

    Works for files and folders. An existing folder at `path` is moved aside first
    (a rename, so the swap is two renames) and deleted afterwards, because
    ``os.replace`` cannot overwrite a non-empty folder. On an exception the
    temporary is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The suffix is kept so that suffix-dispatching writers (pandas, tifffile) behave.
    tmp = path.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            trash = path.with_name(f"{_TMP_PREFIX}old-{uuid.uuid4().hex[:8]}-{path.name}")
            os.replace(path, trash)
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def is_temporary(path: str | os.PathLike) -> bool:
    """True for the temporaries `atomic_path` creates (leftovers of a killed writer)."""
    return Path(path).name.startswith(_TMP_PREFIX)


def write_json(obj: Any, path: str | os.PathLike, *, indent: int | None = 2) -> Path:
    """Write `obj` as key-sorted JSON (byte-identical for equal input), atomically.

    `indent` is passed to `json.dumps`; None writes one compact line (site descriptors).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=True, default=_json_default) + "\n")
    return path


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged — regenerate it") from e


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV or Parquet table (by suffix); Metadata_Plate/Metadata_Well stay strings in CSV."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such table")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".csv", ".txt"):
        # Well and plate names like "A01" or "0012" must stay strings.
        return pd.read_csv(path, dtype={"Metadata_Plate": str, "Metadata_Well": str})
    raise ValueError(f"{path}: unknown table format {suffix!r}; use .csv or .parquet")


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a CSV or Parquet table (by suffix) atomically, without the index."""
    path = Path(path)
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            raise ValueError(f"{path}: unknown table format {suffix!r}; use .csv or .parquet")
    return path


# ----------------------------------------------------------------------------- plate maps


def read_plate_map(path: str | os.PathLike, *, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a plate map (CSV or Parquet; one row per imaged site).

    Args:
      path: the plate map file.
      check_files: also require every FileName_Image (and non-empty FileName_Labels)
        to exist. Turn off only to inspect a plate map whose images are elsewhere.

    Returns:
      The table with FileName_Image / FileName_Labels resolved to absolute paths
      (relative names are relative to the plate map's folder), Metadata_Plate,
      Metadata_Well as str, Metadata_Site as int, Metadata_Dose as float. Row order is
      kept. ``df.attrs["plate_map"]`` is the plate map's absolute path.

    Raises:
      FileNotFoundError: the plate map itself or files named in it are missing
        (listing the rows, as 1-based data-row numbers).
      ValueError: missing required columns, duplicate (plate, well, site) rows,
        non-numeric dose or site.
    """
    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: plate map not found")
    df = read_table(path)
    missing = [c for c in PLATE_MAP_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: plate map lacks required column(s) {missing}; it needs {list(PLATE_MAP_COLUMNS)}"
            " (+ optional FileName_Labels and any Metadata_*)"
        )
    df = df.reset_index(drop=True)
    rows = lambda mask: [int(i) + 1 for i in np.flatnonzero(mask)]  # noqa: E731  1-based data rows
    for col in SITE_KEY + ("Metadata_Treatment", "FileName_Image"):
        if df[col].isna().any():
            raise ValueError(f"{path}: empty {col} in row(s) {rows(df[col].isna())}; fill it in")
    df["Metadata_Plate"] = df["Metadata_Plate"].astype(str)
    df["Metadata_Well"] = df["Metadata_Well"].astype(str)
    df["Metadata_Treatment"] = df["Metadata_Treatment"].astype(str)
    for col, kind in (("Metadata_Site", "int64"), ("Metadata_Dose", "float64")):
        num = pd.to_numeric(df[col], errors="coerce")
        if num.isna().any():
            raise ValueError(f"{path}: {col} must be numeric; bad row(s) {rows(num.isna())}")
        df[col] = num.astype(kind)
    dup = df.duplicated(list(SITE_KEY), keep=False)
    if dup.any():
        keys = df.loc[dup, list(SITE_KEY)].drop_duplicates().to_records(index=False).tolist()
        raise ValueError(
            f"{path}: duplicate (plate, well, site) in row(s) {rows(dup)}: {keys}; "
            "each site must appear once — remove or renumber the duplicates"
        )
    base = path.parent
    file_cols = ["FileName_Image"] + (["FileName_Labels"] if "FileName_Labels" in df.columns else [])
    for col in file_cols:
        df[col] = [_resolve(base, v) for v in df[col]]
        if check_files:
            gone = np.array([v is not None and not Path(v).exists() for v in df[col]])
            if gone.any():
                listing = ", ".join(f"row {r}: {df.at[r - 1, col]}" for r in rows(gone)[:10])
                more = f" (+{int(gone.sum()) - 10} more)" if gone.sum() > 10 else ""
                raise FileNotFoundError(
                    f"{path}: {col} missing for {int(gone.sum())} row(s): {listing}{more}; "
                    "fix the paths (relative paths are relative to the plate map's folder) or drop the rows"
                )
    df.attrs["plate_map"] = str(path)
    return df


def _resolve(base: Path, value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return None
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def write_plate_map(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a plate map (CSV or Parquet by suffix) atomically; file names are written as given."""
    missing = [c for c in PLATE_MAP_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: plate map to write lacks column(s) {missing}")
    dup = df.duplicated(list(SITE_KEY), keep=False)
    if dup.any():
        raise ValueError(f"{path}: refusing to write duplicate (plate, well, site) rows {list(np.flatnonzero(dup) + 1)}")
    return write_table(df.reset_index(drop=True), Path(path))


def site_id(plate: Any, well: Any, site: Any) -> str:
    """A file-name-safe id for one site, e.g. ``"P1_A01_s2"``; used for labels and crop parts."""
    safe = lambda s: "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in str(s))  # noqa: E731
    return f"{safe(plate)}_{safe(well)}_s{int(site)}"


def labels_name(sid: str) -> str:
    """File name of a site's label volume, e.g. ``"P1_A01_s2_labels.tiff"``: what tools/segment.py
    and `gradcamo synth` write into their ``labels/`` folder and what ``tools/crop.py --labels-dir``
    reads."""
    return f"{sid}_labels.tiff"


# ----------------------------------------------------------------------------- stacks


def _open_tiff(path: Path):
    import tifffile

    if not path.exists():
        raise FileNotFoundError(f"{path}: image file not found; check the plate map's FileName_* column")
    try:
        return tifffile.TiffFile(path)
    except Exception as e:  # tifffile raises several types for bad headers
        raise ValueError(
            f"{path}: not a readable TIFF ({type(e).__name__}: {e}); the file is corrupt or "
            "truncated — re-export or re-copy it"
        ) from e


def _tiff_array(path: Path) -> tuple[np.ndarray, str | None, dict]:
    """(pixels, recorded axes or None, shaped metadata) of a TIFF's first series."""
    with _open_tiff(path) as tif:
        try:
            series = tif.series[0]
            data = series.asarray()
            axes = series.axes
            meta = dict(tif.shaped_metadata[0]) if tif.shaped_metadata else {}
        except Exception as e:
            raise ValueError(
                f"{path}: cannot read pixel data ({type(e).__name__}: {e}); the file is corrupt or "
                "truncated — re-export or re-copy it"
            ) from e
    # tifffile marks unknown axes as Q/I; "S" is a trailing sample axis of size 1 we drop.
    if axes and axes.endswith("S") and data.shape[-1] == 1:
        data, axes = data[..., 0], axes[:-1]
    known = axes if axes and not set(axes) & set("QI") else None
    return data, known, meta


def stack_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Shape of a TIFF's first series as stored, read from the header only."""
    path = Path(path)
    with _open_tiff(path) as tif:
        return tuple(tif.series[0].shape)


def read_stack(
    path: str | os.PathLike,
    *,
    axes: str = "ZCYX",
    channels: int | Sequence[str] | None = None,
) -> np.ndarray:
    """Read one site's z-stack as float32 (Z, C, Y, X).

    Args:
      path: TIFF/OME-TIFF file, or a ``*.site.json`` site descriptor written by
        ``gradcamo import`` (`gradcamo_jax.data.readers`: the site's original vendor files,
        read in place; it records its own axes, so `axes` does not apply).
      axes: the file's axis order, a permutation of "ZCYX" (e.g. "CZYX" or "ZYXC");
        when the file records its own axes (shaped or ImageJ metadata) they must agree.
      channels: expected channel count, or expected channel names (checked against
        names recorded by `write_stack`, and their count against the data).

    Raises:
      FileNotFoundError: no such file.
      ValueError (naming the file and the fix): corrupt/truncated TIFF; rank ≠ 4;
        recorded axes ≠ `axes`; channel count or names ≠ `channels` (with a hint
        when the data look like another axis order); NaN or inf voxels; a channel
        whose voxels are all equal (a dead or blank channel).
    """
    path = Path(path)
    if sorted(axes) != sorted("ZCYX"):
        raise ValueError(f"axes={axes!r} must be a permutation of 'ZCYX'")
    if path.name.endswith(".site.json"):
        from gradcamo_jax.data import readers  # lazy: readers imports this module

        return readers.read_site_file(path, channels=channels)
    data, recorded, meta = _tiff_array(path)
    if recorded is not None and recorded != axes and len(recorded) == 4:
        raise ValueError(
            f"{path}: the file records axes {recorded!r} but {axes!r} was expected; "
            f"pass axes={recorded!r} if that is right, or re-export the stack as {axes}"
        )
    if data.ndim != 4:
        raise ValueError(
            f"{path}: expected a 4-D {axes} stack, got shape {data.shape}"
            + (f" (axes {recorded})" if recorded else "")
            + "; save one site as one Z×C×Y×X stack (a single channel still needs its C axis)"
        )
    zcyx = np.transpose(data, [axes.index(a) for a in "ZCYX"])
    names = meta.get("channel_names")
    check_channel_count(zcyx.shape[1], channels, path, axes=axes, shape=data.shape)
    check_channel_names(names, channels, path)
    out = zcyx.astype(np.float32)
    check_zcyx(out, path, names)
    return out


def check_channel_count(
    n_channels: int,
    channels: int | Sequence[str] | None,
    where: Any,
    *,
    axes: str = "ZCYX",
    shape: Sequence[int] | None = None,
    fix: str = "",
) -> None:
    """Raise ValueError when `n_channels` differs from `channels` (a count, or names to count).

    `shape` is the data's shape as stored in `axes` order: it goes into the message, with a
    hint when another axis has the expected size (a file whose axis order is not `axes`).
    `fix` (e.g. how to re-import) is appended to the message. No-op when `channels` is None.
    """
    if channels is None:
        return
    want = channels if isinstance(channels, int) else len(channels)
    if n_channels == want:
        return
    detail = ""
    if shape is not None:
        detail = f" (shape {tuple(shape)})"
        # A CZYX file read as ZCYX shows the channel count on the first axis.
        other = [a for a, s in zip(axes, shape) if s == want and a != "C"]
        if other:
            detail += f"; axis {other[0]} has size {want} — is the file's axis order different (axes=...)?"
    raise ValueError(
        f"{where}: expected {want} channels on axis C of {axes}, found {n_channels}{detail}"
        + (f"; {fix}" if fix else "")
    )


def check_channel_names(
    names: Sequence[str] | None,
    channels: int | Sequence[str] | None,
    where: Any,
    *,
    noun: str = "channel names",
    fix: str = "reorder the channels or pass the file's order",
) -> None:
    """Raise ValueError when known channel `names` differ from the expected names `channels`.

    No-op when the names are unknown (None) or `channels` is None or a count (see
    `check_channel_count`). Names of another length differ too, so for data whose names
    are always known this one call checks count and order. The message reads
    ``"{where}: {noun} [...] differ from the expected [...]; {fix}"``.
    """
    if names is None or channels is None or isinstance(channels, int):
        return
    if list(names) != list(channels):
        raise ValueError(f"{where}: {noun} {list(names)} differ from the expected {list(channels)}; {fix}")


def check_zcyx(array_zcyx: np.ndarray, where: Any, channel_names: Sequence[str] | None = None) -> None:
    """Reject NaN/inf voxels and constant channels (a blank or saturated acquisition) of a (Z, C, Y, X) array.

    Errors start with `where` (a path or a site), give the first bad voxel's (z, c, y, x),
    and name constant channels by `channel_names` (by index where a name is missing).
    """
    finite = np.isfinite(array_zcyx)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise ValueError(
            f"{where}: {int((~finite).sum())} NaN/inf voxel(s), first at (z, c, y, x) = "
            f"{tuple(int(i) for i in bad)}; re-export the stack or mask the bad region"
        )
    if array_zcyx.size == 0:
        return
    # Per-channel extremes over (Z, Y, X), without a transposed copy of the stack.
    constant = np.flatnonzero(array_zcyx.max(axis=(0, 2, 3)) == array_zcyx.min(axis=(0, 2, 3)))
    if constant.size:
        names = channel_names
        label = [names[i] if names and i < len(names) else i for i in constant]
        raise ValueError(
            f"{where}: channel(s) {label} are constant (value {array_zcyx[0, constant[0], 0, 0]}): a blank or "
            "saturated acquisition; re-image the site or drop it from the plate map"
        )


def write_stack(
    path: str | os.PathLike,
    array_zcyx: np.ndarray,
    channel_names: Sequence[str] | None = None,
    *,
    compression: str | None = None,
) -> Path:
    """Write one site's stack (Z, C, Y, X) as TIFF, atomically, with its axes and channel names.

    The bytes depend only on the array and names (no timestamps), so equal input
    gives byte-identical files. `compression` is passed to tifffile (e.g. "zlib").
    """
    import tifffile

    path = Path(path)
    array_zcyx = np.asarray(array_zcyx)
    if array_zcyx.ndim != 4:
        raise ValueError(f"{path}: write_stack needs (Z, C, Y, X), got shape {array_zcyx.shape}")
    meta: dict[str, Any] = {"axes": "ZCYX"}
    if channel_names is not None:
        if len(channel_names) != array_zcyx.shape[1]:
            raise ValueError(f"{path}: {len(channel_names)} channel names for {array_zcyx.shape[1]} channels")
        meta["channel_names"] = list(channel_names)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array_zcyx, metadata=meta, compression=compression, photometric="minisblack")
    return path


# ----------------------------------------------------------------------------- labels


def read_labels(path: str | os.PathLike, expect_shape: Sequence[int] | None = None) -> np.ndarray:
    """Read a label volume as int32 (Z, Y, X): 0 = background, one positive id per cell.

    Args:
      expect_shape: the site's (Z, Y, X) (or (Z, C, Y, X), whose C is ignored);
        a different label shape is an error naming both shapes.

    Raises ValueError (naming the file) for a corrupt TIFF, rank ≠ 3, a non-integer
    or negative label, or a shape mismatch.
    """
    path = Path(path)
    data, recorded, _ = _tiff_array(path)
    if data.ndim == 2:
        data = data[None]  # a single optical section is a 1-slice stack
    if data.ndim != 3:
        raise ValueError(
            f"{path}: labels must be a 3-D Z×Y×X integer volume, got shape {data.shape}; "
            "write one label volume per site"
        )
    if not np.issubdtype(data.dtype, np.integer):
        if np.issubdtype(data.dtype, np.floating) and np.all(np.isfinite(data)) and np.all(data == np.round(data)):
            data = data.astype(np.int64)
        else:
            raise ValueError(f"{path}: labels must be integers, found dtype {data.dtype} with fractional values")
    if data.size and data.min() < 0:
        raise ValueError(f"{path}: negative label ids (min {data.min()}); 0 = background, cells 1, 2, …")
    if data.size and data.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{path}: label ids above int32 range (max {data.max()})")
    if expect_shape is not None:
        es = tuple(int(s) for s in expect_shape)
        zyx = (es[0], es[2], es[3]) if len(es) == 4 else es
        if tuple(data.shape) != zyx:
            raise ValueError(
                f"{path}: label volume shape {tuple(data.shape)} (Z, Y, X) ≠ image shape {zyx}; "
                "the labels belong to another site or were resized — re-run segmentation for this site"
            )
    return data.astype(np.int32, copy=False)


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write a (Z, Y, X) label volume atomically as uint16 (uint32 if ids exceed 65535), zlib-compressed."""
    import tifffile

    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be a 3-D integer (Z, Y, X) array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{path}: negative label ids")
    dtype = np.uint16 if labels.size == 0 or labels.max() <= np.iinfo(np.uint16).max else np.uint32
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, labels.astype(dtype), metadata={"axes": "ZYX"}, compression="zlib",
                         photometric="minisblack")
    return path


# ----------------------------------------------------------------------------- cell tables


def read_cells(dataset_dir: str | os.PathLike) -> pd.DataFrame:
    """Read a dataset folder's cells.parquet (one row per cell; see tools/crop.py for columns)."""
    path = Path(dataset_dir) / CELLS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no cell table; run tools/crop.py (and its merge step when sharded) on this folder"
        )
    return pd.read_parquet(path)


def write_cells(df: pd.DataFrame, dataset_dir: str | os.PathLike) -> Path:
    """Write cells.parquet into `dataset_dir` atomically; returns its path."""
    return write_table(df.reset_index(drop=True), Path(dataset_dir) / CELLS_FILE)


# ----------------------------------------------------------------------------- crop stores


class _ReadOnlyArray:
    """A Zarr array behind NumPy-style reads: int, slice or integer-array index on axis 0."""

    def __init__(self, array):
        self.zarr = array

    shape = property(lambda self: tuple(self.zarr.shape))
    dtype = property(lambda self: np.dtype(self.zarr.dtype))
    ndim = property(lambda self: len(self.zarr.shape))

    def __len__(self) -> int:
        return self.zarr.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (list, np.ndarray)):
            index = np.asarray(index)
            if index.dtype == bool:
                index = np.flatnonzero(index)
            index = index.astype(np.int64)
            if index.size == 0:
                return np.empty((0, *self.shape[1:]), self.dtype)
            index = np.where(index < 0, index + len(self), index)
            # Zarr reads sorted unique coordinates fastest; restore the caller's order after.
            uniq, inverse = np.unique(index, return_inverse=True)
            return np.asarray(self.zarr.oindex[uniq])[inverse]
        return np.asarray(self.zarr[index])

    def __array__(self, dtype=None, copy=None):
        out = np.asarray(self.zarr[...])
        return out.astype(dtype) if dtype is not None else out


class CropStore:
    """Read-only view of a dataset's crops.zarr.

    Attributes:
      image: (N, Z, Y, X, C) float16 or float32, normalised per site and channel.
      mask: (N, Z, Y, X) uint8; 1 = central cell, 2 = any other cell, 0 = background.
      channels: channel names (C of them).
      attrs: the store's attributes (crop size, normalisation percentiles, …).

    Pickles as its path, so grain worker processes reopen the store themselves.
    """

    def __init__(self, path: str | os.PathLike):
        import zarr

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no crop store; run tools/crop.py (and its merge step)")
        try:
            group = zarr.open_group(self.path, mode="r")
            self.image = _ReadOnlyArray(group["image"])
            self.mask = _ReadOnlyArray(group["mask"])
        except Exception as e:
            raise ValueError(f"{self.path}: not a readable crop store ({e}); re-run the crop merge step") from e
        self.attrs = dict(group.attrs)
        self.channels = tuple(self.attrs.get("channels", ()))
        if self.image.shape[:4] != self.mask.shape:
            raise ValueError(f"{self.path}: image {self.image.shape} and mask {self.mask.shape} disagree")

    def __len__(self) -> int:
        return self.image.shape[0]

    def __reduce__(self):
        return (CropStore, (str(self.path),))

    def __repr__(self) -> str:
        return f"CropStore({str(self.path)!r}, n={len(self)}, image={self.image.shape} {self.image.dtype})"


def open_crops(dataset_dir: str | os.PathLike) -> CropStore:
    """Open `dataset_dir/crops.zarr` (or a path to a .zarr store itself) read-only."""
    p = Path(dataset_dir)
    return CropStore(p if p.suffix == ".zarr" else p / CROPS_STORE)


def _create_arrays(root: Path, n: int, crop_zyx: Sequence[int], channels: int, dtype: Any, attrs: dict):
    import zarr

    group = zarr.open_group(root, mode="w", zarr_format=3)
    group.attrs.update(attrs)
    # "/"-separated chunk keys ("c/<row>/0/0/0/0") are part of the Zarr v3 spec, so
    # `link_crop_stores` may rename chunks between stores without decoding them.
    key = {"name": "default", "separator": "/"}
    image = group.create_array(
        "image", shape=(n, *crop_zyx, channels), chunks=(1, *crop_zyx, channels), dtype=dtype,
        chunk_key_encoding=key, fill_value=0, dimension_names=("cell", "z", "y", "x", "c"),
    )
    mask = group.create_array(
        "mask", shape=(n, *crop_zyx), chunks=(1, *crop_zyx), dtype="uint8",
        chunk_key_encoding=key, fill_value=0, dimension_names=("cell", "z", "y", "x"),
    )
    return image, mask


def write_crop_store(
    path: str | os.PathLike,
    image: np.ndarray,
    mask: np.ndarray,
    attrs: dict | None = None,
) -> Path:
    """Write a whole crop store at once (atomically): image (N, Z, Y, X, C), mask (N, Z, Y, X) uint8.

    The image keeps its dtype (float16 or float32). N = 0 is allowed (a site without cells).
    """
    path = Path(path)
    image, mask = np.asarray(image), np.asarray(mask)
    if image.ndim != 5 or mask.shape != image.shape[:4]:
        raise ValueError(f"{path}: need image (N, Z, Y, X, C) and mask (N, Z, Y, X); got {image.shape}, {mask.shape}")
    if image.dtype not in (np.float16, np.float32):
        raise ValueError(f"{path}: crop images are float16 or float32, got {image.dtype}")
    with atomic_path(path) as tmp:
        img, msk = _create_arrays(tmp, image.shape[0], image.shape[1:4], image.shape[4], image.dtype, attrs or {})
        if image.shape[0]:
            img[...] = image
            msk[...] = mask.astype(np.uint8, copy=False)
    return path


class _CropWriter:
    def __init__(self, image, mask):
        self._image, self._mask = image, mask

    def write(self, start: int, image: np.ndarray, mask: np.ndarray) -> None:
        """Write rows start … start + len(image): image (n, Z, Y, X, C), mask (n, Z, Y, X)."""
        n = len(image)
        if n == 0:
            return
        if mask.shape != image.shape[:4]:
            raise ValueError(f"mask {mask.shape} does not match image {image.shape}")
        self._image[start:start + n] = image.astype(self._image.dtype, copy=False)
        self._mask[start:start + n] = mask.astype(np.uint8, copy=False)


@contextlib.contextmanager
def crop_store_writer(
    path: str | os.PathLike,
    n: int,
    crop_zyx: Sequence[int],
    n_channels: int,
    dtype: Any = "float16",
    attrs: dict | None = None,
) -> Iterator[_CropWriter]:
    """Create a crop store of `n` cells and write it in pieces; atomic (see `atomic_path`)."""
    if np.dtype(dtype) not in (np.float16, np.float32):
        raise ValueError(f"{path}: crop images are float16 or float32, got {dtype}")
    with atomic_path(path) as tmp:
        image, mask = _create_arrays(tmp, n, crop_zyx, n_channels, np.dtype(dtype), attrs or {})
        yield _CropWriter(image, mask)


def link_crop_stores(
    parts: Sequence[str | os.PathLike],
    path: str | os.PathLike,
    attrs: dict | None = None,
) -> Path:
    """Concatenate crop stores along N into a new store at `path` (atomic).

    Encoded chunk files are hard-linked (copied where links are impossible, e.g.
    across file systems) into place under their new row number, so the merge costs
    file-system operations, not compression. The parts stay intact, so an
    interrupted merge can simply be run again. All parts must share crop shape,
    channel count and dtype; the new store's attributes are `attrs` (default: the
    first part's).
    """
    path = Path(path)
    stores = [CropStore(p) for p in parts]
    if not stores:
        raise ValueError(f"{path}: nothing to merge")
    ref = stores[0]
    for s in stores[1:]:
        if s.image.shape[1:] != ref.image.shape[1:] or s.image.dtype != ref.image.dtype:
            raise ValueError(
                f"{s.path}: crop shape/dtype {s.image.shape[1:]} {s.image.dtype} differs from "
                f"{ref.path}: {ref.image.shape[1:]} {ref.image.dtype}; re-crop with one configuration"
            )
    n = sum(len(s) for s in stores)
    with atomic_path(path) as tmp:
        _create_arrays(tmp, n, ref.image.shape[1:4], ref.image.shape[4], ref.image.dtype,
                       attrs if attrs is not None else ref.attrs)
        offset = 0
        for s in stores:
            for name, rest in (("image", "0/0/0/0"), ("mask", "0/0/0")):
                src_dir = s.path / name / "c"
                for row in range(len(s)):
                    src = src_dir / str(row) / rest
                    if not src.exists():  # an all-fill-value chunk is never written
                        continue
                    dst = tmp / name / "c" / str(offset + row) / rest
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copyfile(src, dst)
            offset += len(s)
    return path


# ----------------------------------------------------------------------------- small array stores


def write_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> Path:
    """Write named arrays to a Zarr v3 group (atomic), one chunk per leading index for arrays
    of rank ≥ 2 (e.g. CAM volumes (M, Z, Y, X) of `gradcamo score`), one chunk otherwise."""
    import zarr

    path = Path(path)
    with atomic_path(path) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        group.attrs.update(attrs or {})
        for name, a in arrays.items():
            a = np.asarray(a)
            chunks = (1, *a.shape[1:]) if a.ndim >= 2 and a.shape[0] else a.shape or (1,)
            arr = group.create_array(name, shape=a.shape, chunks=tuple(max(1, c) for c in chunks), dtype=a.dtype)
            if a.size:
                arr[...] = a
    return path


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of a group written by `write_arrays` (plus ``"attrs"``: its attributes)."""
    import zarr

    path = Path(path)
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as e:
        raise ValueError(f"{path}: not a readable array store ({e}); delete it and re-run the step that wrote it") from e
    out: dict = {name: np.asarray(arr[...]) for name, arr in group.arrays()}
    out["attrs"] = dict(group.attrs)
    return out
