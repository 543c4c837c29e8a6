"""Single-cell crops: from z-stacks + label volumes to a cell dataset (cells.parquet + crops.zarr).

Per site (pure functions, no I/O):

1. **Normalise** each channel of the whole site stack: ``(x - p_lo) / (p_hi - p_lo)``
   with p_lo, p_hi the 1st and 99.8th percentiles over all the site's voxels of that
   channel (`CropConfig.percentiles`), so the dim background sits near 0 and the
   bright end of real signal near 1 (the rescaling used by CellProfiler-style
   profiling). Values are not clipped by default (bright structures above p_hi keep
   their contrast); ``clip=True`` clips to [0, 1].
2. **Measure** every label: volume (voxels), centroid (``scipy.ndimage`` centre of
   mass, (Z, Y, X) voxels), whether it touches the XY border of the field.
   Objects smaller than `min_volume` voxels are dropped and counted (debris,
   segmentation crumbs); they still count as "other cell" in neighbours' masks.
3. **Crop** a fixed window (default 21×128×128 in Z×Y×X) centred on the rounded
   centroid: voxel ``floor(c + 0.5)`` lands at index ``size // 2`` of the crop. Parts
   of the window outside the field are zero-padded (0 ≈ background after
   normalisation) and the cell is flagged ``Metadata_Padded``, never dropped.
   When the crop has as many slices as the stack (or more), z is centred on the
   stack instead (`CropConfig.center_z`), so the whole stack is kept.
4. **Mask** per crop: 1 = the central cell's label, 2 = any other label, 0 = background.

Per plate (I/O through `formats` only):

    out_dir/parts/<site>/        one site's part, made atomically (temp folder → rename):
                                 crops.zarr, cells.parquet, summary.json
    out_dir/crops.zarr           after `merge`: all parts, rows in plate-map order
    out_dir/cells.parquet        after `merge`; its presence marks a finished dataset
    out_dir/summary.json         after `merge`: per-site counts (cells, filtered, padded,
                                 empty-site warnings), classes, splits, settings

`crop_shard(..., shard=(i, n))` handles sites i, i + n, i + 2n, … of the plate map
(one SLURM array task each), skips sites whose part exists (resumable), removes
its own sites' leftover temporaries, and runs sites in a process pool. `merge`
joins all parts by hard-linking chunk files (no re-encoding) and adds:

* ``Metadata_Row``: the cell's row in crops.zarr;
* ``Metadata_Class``: index of (Metadata_Dose, Metadata_Treatment) sorted ascending
  over the whole plate map, so the control (dose 0) is class 0 and doses follow in
  increasing order; ``Metadata_ClassName`` = "<treatment>@<dose>";
* ``Metadata_Split``: "train"/"val"/"test" by well, never mixed within a well, by the
  rule of `gradcamo_jax.data.splits` with `split_fractions` and `split_seed`.

Cell table columns: every plate-map ``Metadata_*``, ``FileName_Image``,
``FileName_Labels``, ``Metadata_SiteId``, ``Metadata_ObjectNumber`` (label id),
``Metadata_Centroid_Z/Y/X``, ``Metadata_Volume``, ``Metadata_TouchesBorder``,
``Metadata_Padded``, ``Metadata_Class``, ``Metadata_ClassName``, ``Metadata_Split``,
``Metadata_Row`` (a plate-map column of one of these names, such as the Gallery's
``Metadata_Row``, the plate row, is kept as ``Metadata_PlateMap_<name>``); and the
physical scale (`physical_measures`):
``Metadata_PhysicalSizeZ/Y/X`` (the site's voxel size in µm, from the plate map as
``gradcamo import`` writes it), ``Metadata_Centroid_Z/Y/X_um`` and ``Metadata_Volume_um3``.
These are always present, NaN where the plate map has no size for that axis (a
synthetic plate, a 2D plate without a Z step), so every cell table has the same columns
and "unknown" is never a silent 1 µm.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from gradcamo_jax.data import formats, shards, splits
from gradcamo_jax.data.splits import SPLITS

PARTS_DIR = "parts"
# Cell-table columns the crop step writes besides `measure_cells`' and `physical_measures`' (see module doc).
OWN_COLUMNS = ("Metadata_SiteId", "Metadata_Padded", "Metadata_Class", "Metadata_ClassName", "Metadata_Split",
               "Metadata_Row")
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True)
class CropConfig:
    """Settings of the crop step.

    Attributes:
      crop_size: crop (Z, Y, X) in voxels; the paper's 21×128×128 by default. Sites with one
        plane (2D plates) are cropped to one plane whatever Z says (`site_crop_size`).
      percentiles: (low, high) percentiles mapped to 0 and 1, per site and channel.
      intensity_range: fixed raw (low, high) intensities mapped to 0 and 1 for every site and
        channel instead of each site's `percentiles` (e.g. the camera's offset and a level
        near saturation); None = percentiles. Per-site percentiles move with a field's
        brightest voxels, so a treatment that brightens some cells dims every other cell of
        its site after normalisation (experiments/README.md, audit study); a fixed range
        does not.
      clip: clip normalised values to [0, 1].
      min_volume: labels with fewer voxels are dropped from the dataset (and counted).
      dtype: stored image dtype, "float16" (half the bytes; ~3 significant digits)
        or "float32".
      channels: expected channel names, in stack order (their number is checked).
      stack_axes: axis order of the stack files (see `formats.read_stack`).
      center_z: centre crops on the cell in z (True) or on the stack (False). None
        (default) = on the cell, except when the crop has at least as many slices
        as the stack (the paper's 21-slice crops of 21-slice stacks): then the crop
        holds the whole stack in z and is padded in z only when it is deeper.
      labels_dir: folder of label TIFFs named ``<site id>_labels.tiff`` (`formats.labels_name`,
        as tools/segment.py writes them); None = the plate map's FileName_Labels column.
      split_fractions: (train, val, test) fractions of wells per class.
      split_seed: seed of the well shuffle behind the split.
      workers: processes over sites (0 = in this process).
      start_method: how worker processes start: "forkserver" (default: one clean
        server imports this module once, workers fork from it; safe when the caller
        has threads, e.g. JAX or zarr), "spawn", or "fork" (fastest start, only for
        single-threaded callers).
      write_batch: cells cropped and written per step (bounds memory per worker).
    """

    crop_size: tuple[int, int, int] = (21, 128, 128)
    percentiles: tuple[float, float] = (1.0, 99.8)
    intensity_range: tuple[float, float] | None = None
    clip: bool = False
    min_volume: int = 50
    dtype: str = "float16"
    channels: tuple[str, ...] = formats.CHANNELS
    stack_axes: str = "ZCYX"
    center_z: bool | None = None
    labels_dir: str | None = None
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    workers: int = 1
    start_method: str = "forkserver"
    write_batch: int = 64

    def __post_init__(self):
        if len(self.crop_size) != 3 or min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be (Z, Y, X) ≥ 1, got {self.crop_size}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 ≤ low < high ≤ 100, got {self.percentiles}")
        if self.intensity_range is not None:
            object.__setattr__(self, "intensity_range", tuple(float(v) for v in self.intensity_range))
            if len(self.intensity_range) != 2 or not self.intensity_range[0] < self.intensity_range[1]:
                raise ValueError(f"intensity_range must be (low, high) with low < high, got {self.intensity_range}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype}")
        splits.check_fractions(self.split_fractions, "CropConfig.split_fractions")

    def crop_settings(self) -> dict:
        """The settings that change crop content (must agree across the parts of one dataset)."""
        out = {"crop_size": list(self.crop_size), "percentiles": list(self.percentiles), "clip": self.clip,
               "min_volume": self.min_volume, "dtype": self.dtype, "channels": list(self.channels),
               "center_z": self.center_z}
        if self.intensity_range is not None:  # (absent otherwise: parts cropped before the field stay valid)
            out["intensity_range"] = list(self.intensity_range)
        return out


# ----------------------------------------------------------------------------- pure per-site steps


def normalize(stack_zcyx: np.ndarray, percentiles=(1.0, 99.8), clip: bool = False,
              intensity_range: tuple[float, float] | None = None):
    """Per-channel rescaling of one site: its own percentiles, or a fixed range.

    Args:
      stack_zcyx: (Z, C, Y, X) float.
      intensity_range: fixed raw (low, high) for every channel instead of the percentiles.
    Returns:
      (normalised (Z, C, Y, X) float32, lo (C,), hi (C,)) with lo/hi the percentiles (or the
      fixed range). When a channel's two percentiles coincide (a sparse channel), hi falls
      back to the channel maximum so the division stays finite.
    """
    x = np.asarray(stack_zcyx, np.float32)
    per_c = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    if intensity_range is not None:
        lo, hi = (np.full(x.shape[1], float(v)) for v in intensity_range)
    else:
        lo, hi = np.percentile(per_c, percentiles, axis=1).astype(np.float64)
    hi = np.where(hi > lo, hi, per_c.max(axis=1))
    scale = np.where(hi > lo, hi - lo, 1.0)
    out = (x - lo[None, :, None, None].astype(np.float32)) / scale[None, :, None, None].astype(np.float32)
    if clip:
        np.clip(out, 0, 1, out=out)
    return out, lo, hi


def measure_cells(labels: np.ndarray) -> pd.DataFrame:
    """One row per label id > 0 present in `labels` (Z, Y, X).

    Columns: Metadata_ObjectNumber, Metadata_Centroid_Z/Y/X (centre of mass in
    voxels), Metadata_Volume (voxels), Metadata_TouchesBorder (a voxel on the first
    or last Y or X row of the field: the cell is cut by the field of view).
    """
    counts = np.bincount(labels.ravel())
    ids = np.flatnonzero(counts)
    ids = ids[ids > 0]
    if ids.size == 0:
        return pd.DataFrame({
            "Metadata_ObjectNumber": np.zeros(0, np.int64), "Metadata_Centroid_Z": np.zeros(0),
            "Metadata_Centroid_Y": np.zeros(0), "Metadata_Centroid_X": np.zeros(0),
            "Metadata_Volume": np.zeros(0, np.int64), "Metadata_TouchesBorder": np.zeros(0, bool),
        })
    com = np.array(ndimage.center_of_mass(np.ones(labels.shape, np.float32), labels, ids), np.float64)
    edge = np.zeros(counts.size, bool)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        edge[np.unique(face)] = True
    return pd.DataFrame({
        "Metadata_ObjectNumber": ids.astype(np.int64),
        "Metadata_Centroid_Z": com[:, 0], "Metadata_Centroid_Y": com[:, 1], "Metadata_Centroid_X": com[:, 2],
        "Metadata_Volume": counts[ids].astype(np.int64),
        "Metadata_TouchesBorder": edge[ids],
    })


def site_voxel_size(row: dict) -> np.ndarray:
    """A plate-map row's voxel size as (z, y, x) float64 µm, NaN for an axis that is absent,
    empty, non-numeric or not > 0 (unknown)."""
    out = np.full(3, np.nan)
    for i, col in enumerate(formats.PHYSICAL_SIZE_COLUMNS):
        try:
            v = float(row.get(col))
        except (TypeError, ValueError):
            continue
        if np.isfinite(v) and v > 0:
            out[i] = v
    return out


def physical_measures(table: pd.DataFrame, voxel_zyx: np.ndarray) -> pd.DataFrame:
    """`measure_cells` measurements in µm, one row per row of ``table``.

    Args:
      table: `measure_cells` output (Metadata_Centroid_Z/Y/X in voxels, Metadata_Volume in voxels).
      voxel_zyx: (3,) voxel size (z, y, x) in µm, NaN where unknown (`site_voxel_size`).

    Returns:
      Metadata_PhysicalSizeZ/Y/X (the voxel size, repeated), Metadata_Centroid_Z/Y/X_um
      (centroid × size: µm from the centre of the field's first voxel), Metadata_Volume_um3
      (voxels × z·y·x). NaN wherever a size it needs is unknown.
    """
    vs = np.asarray(voxel_zyx, np.float64).reshape(3)
    n = len(table)
    out = {col: np.full(n, v) for col, v in zip(formats.PHYSICAL_SIZE_COLUMNS, vs)}
    for a, v in zip("ZYX", vs):
        out[f"Metadata_Centroid_{a}_um"] = table[f"Metadata_Centroid_{a}"].to_numpy(np.float64) * v
    out["Metadata_Volume_um3"] = table["Metadata_Volume"].to_numpy(np.float64) * float(np.prod(vs))
    return pd.DataFrame(out, index=table.index)


def crop_starts(centroids: np.ndarray, crop_size, field_shape, center_z: bool = True) -> np.ndarray:
    """First voxel (Z, Y, X) of each crop window, (n, 3) int; may be negative or run past the field."""
    centre = np.floor(np.asarray(centroids, np.float64) + 0.5).astype(np.int64).reshape(-1, 3)
    starts = centre - np.asarray(crop_size, np.int64) // 2
    if not center_z:
        starts[:, 0] = (field_shape[0] - crop_size[0]) // 2
    return starts


def extract_crops(normed_zyxc: np.ndarray, labels: np.ndarray, ids: np.ndarray, starts: np.ndarray, crop_size):
    """Cut crops with zero padding outside the field.

    Args:
      normed_zyxc: (Z, Y, X, C) normalised site.
      labels: (Z, Y, X) int labels.
      ids: (n,) label of each crop's central cell.
      starts: (n, 3) first voxel of each window.
    Returns:
      image (n, cz, cy, cx, C) float32, mask (n, cz, cy, cx) uint8, padded (n,) bool.
    """
    n = len(ids)
    shape = np.array(labels.shape)
    size = np.array(crop_size)
    image = np.zeros((n, *crop_size, normed_zyxc.shape[-1]), np.float32)
    mask = np.zeros((n, *crop_size), np.uint8)
    padded = np.zeros(n, bool)
    for i in range(n):
        lo = np.maximum(starts[i], 0)
        hi = np.minimum(starts[i] + size, shape)
        padded[i] = bool(np.any(starts[i] < 0) or np.any(starts[i] + size > shape))
        if np.any(hi <= lo):
            continue
        src = tuple(slice(a, b) for a, b in zip(lo, hi))
        dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, starts[i]))
        image[i][dst] = normed_zyxc[src]
        lab = labels[src]
        mask[i][dst] = np.where(lab == ids[i], formats.MASK_CENTRAL,
                                np.where(lab > 0, formats.MASK_OTHER, formats.MASK_BACKGROUND))
    return image, mask, padded


def select_cells(labels: np.ndarray, min_volume: int) -> tuple[pd.DataFrame, int]:
    """Measured cells with at least `min_volume` voxels, and how many were dropped."""
    table = measure_cells(labels)
    keep = table["Metadata_Volume"].to_numpy() >= min_volume
    return table[keep].reset_index(drop=True), int((~keep).sum())


# ----------------------------------------------------------------------------- one site (I/O)


def labels_path(row: dict, config: CropConfig) -> str:
    """Where a site's labels are: ``config.labels_dir/<site id>_labels.tiff`` (`formats.labels_name`,
    as tools/segment.py writes them), else FileName_Labels."""
    if config.labels_dir is not None:
        sid = formats.site_id(row["Metadata_Plate"], row["Metadata_Well"], row["Metadata_Site"])
        return str(Path(config.labels_dir).resolve() / formats.labels_name(sid))
    path = row.get("FileName_Labels")
    if not path:
        raise ValueError(
            f"site {_site_name(row)}: no labels — the plate map has no FileName_Labels for it and no "
            "labels folder was given; run tools/segment.py or pass --labels-dir"
        )
    return path


def site_crop_size(crop_size, field_shape) -> tuple[int, int, int]:
    """The crop (Z, Y, X) cut from a site whose stack is `field_shape` (Z, Y, X): `crop_size`,
    except that a one-plane site (a 2D plate) gives one-plane crops whatever ``crop_size[0]``.

    Why: padding a 2D image with empty planes (the default 21×128×128 would add 20) makes a
    3D crop of mostly zeros, and training picks a 2D model only for one-plane crops
    (`gradcamo_jax.train.model_config_for_crops`). Stacks with depth keep `crop_size`, padded
    in z as before."""
    cz, cy, cx = (int(n) for n in crop_size)
    return (1 if int(field_shape[0]) == 1 else cz, cy, cx)


def _center_z(config: CropConfig, field_shape) -> bool:
    if config.center_z is None:
        return config.crop_size[0] < field_shape[0]
    return config.center_z


def _site_name(row: dict) -> str:
    return f"(plate {row['Metadata_Plate']}, well {row['Metadata_Well']}, site {row['Metadata_Site']})"


def process_site(row: dict, parts_dir: str | os.PathLike, config: CropConfig) -> dict:
    """Crop one site into `parts_dir/<site id>/` (atomically) and return its report.

    The part holds crops.zarr, cells.parquet (plate-map columns + measurements) and
    summary.json (the report). A site without cells gives an empty part and a
    report with a warning, so a resumed run skips it too.
    """
    t0 = time.perf_counter()
    sid = formats.site_id(row["Metadata_Plate"], row["Metadata_Well"], row["Metadata_Site"])
    stack = formats.read_stack(row["FileName_Image"], axes=config.stack_axes, channels=config.channels)
    lpath = labels_path(row, config)
    labels = formats.read_labels(lpath, expect_shape=stack.shape)
    table, n_small = select_cells(labels, config.min_volume)
    normed, lo, hi = normalize(stack, config.percentiles, config.clip, config.intensity_range)
    del stack
    normed = np.ascontiguousarray(np.moveaxis(normed, 1, -1))  # ZYXC: one slice per crop
    n = len(table)
    ids = table["Metadata_ObjectNumber"].to_numpy()
    size = site_crop_size(config.crop_size, labels.shape)
    starts = crop_starts(table[["Metadata_Centroid_Z", "Metadata_Centroid_Y", "Metadata_Centroid_X"]].to_numpy(),
                         size, labels.shape, _center_z(dataclasses.replace(config, crop_size=size), labels.shape))
    padded = np.zeros(n, bool)
    warning = None
    if n == 0:
        warning = (f"site {_site_name(row)} ({row['FileName_Image']}, labels {lpath}): no cells"
                   + (f" (all {n_small} objects below min_volume={config.min_volume})" if n_small else "")
                   + "; the site contributes no crops")
        warnings.warn(warning, stacklevel=2)
    part = Path(parts_dir) / sid
    attrs = {"channels": list(config.channels), **config.crop_settings()}
    with formats.atomic_path(part) as tmp:
        tmp.mkdir(parents=True)
        with formats.crop_store_writer(tmp / formats.CROPS_STORE, n, size, len(config.channels),
                                       config.dtype, attrs) as writer:
            for s in range(0, n, config.write_batch):
                e = min(s + config.write_batch, n)
                image, mask, padded[s:e] = extract_crops(normed, labels, ids[s:e], starts[s:e], size)
                writer.write(s, image, mask)
        # The plate map's voxel-size columns come from physical_measures (parsed, NaN when unknown).
        phys = physical_measures(table, site_voxel_size(row))
        # A plate-map column named like one this step writes is kept as Metadata_PlateMap_<name>, not
        # overwritten (the Gallery's load_data.csv has Metadata_Row, the plate row; merge's is the store row).
        own = {*table.columns, *phys.columns, *OWN_COLUMNS}
        meta = {(f"Metadata_PlateMap_{k.removeprefix('Metadata_')}" if k in own else k): v for k, v in row.items()
                if k.startswith("Metadata_") and k not in formats.PHYSICAL_SIZE_COLUMNS}
        cells = pd.DataFrame({**{k: [v] * n for k, v in meta.items()},
                              "FileName_Image": [row["FileName_Image"]] * n,
                              "FileName_Labels": [lpath] * n,
                              "Metadata_SiteId": [sid] * n})
        cells = pd.concat([cells, table, phys], axis=1)
        cells["Metadata_Padded"] = padded
        formats.write_cells(cells, tmp)
        report = {
            "site_id": sid, "image": row["FileName_Image"], "labels": lpath, "n_cells": n,
            "n_filtered_small": n_small, "n_padded": int(padded.sum()),
            "n_touching_border": int(table["Metadata_TouchesBorder"].sum()),
            "percentile_low": lo.tolist(), "percentile_high": hi.tolist(),
            "warning": warning, "seconds": round(time.perf_counter() - t0, 3),
            "settings": config.crop_settings(),
        }
        formats.write_json(report, tmp / SUMMARY_FILE)
    return report


# ----------------------------------------------------------------------------- plate


def _shard_sites(plate_map: pd.DataFrame, shard: tuple[int, int]) -> pd.DataFrame:
    return plate_map.iloc[shards.shard_rows(len(plate_map), shard)]


def _load_plate_map(plate_map: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    return plate_map if isinstance(plate_map, pd.DataFrame) else formats.read_plate_map(plate_map)


def _row_dict(row: pd.Series) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}


def crop_shard(
    plate_map: str | os.PathLike | pd.DataFrame,
    out_dir: str | os.PathLike,
    config: CropConfig = CropConfig(),
    shard: tuple[int, int] = (0, 1),
) -> list[dict]:
    """Crop the sites of one shard into `out_dir/parts/` (resumable); returns their reports.

    Sites with a finished part are skipped (their saved report is returned). A
    site that fails does not stop the others; after all ran, a ValueError lists
    every failed site with its reason (fix them and run again: finished sites are
    kept).
    """
    pm = _load_plate_map(plate_map)
    parts = Path(out_dir) / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    todo, reports = [], {}
    for _, row in _shard_sites(pm, shard).iterrows():
        row = _row_dict(row)
        sid = formats.site_id(row["Metadata_Plate"], row["Metadata_Well"], row["Metadata_Site"])
        # Leftovers of a killed run of this site (only this shard owns it).
        for stale in parts.glob(f".tmp-*-{sid}"):
            shutil.rmtree(stale, ignore_errors=True)
        if (parts / sid / SUMMARY_FILE).exists():
            reports[sid] = formats.read_json(parts / sid / SUMMARY_FILE)
        else:
            todo.append((sid, row))
    failures = {}
    if config.workers == 0 or len(todo) <= 1:
        for sid, row in todo:
            try:
                reports[sid] = process_site(row, parts, config)
            except (ValueError, FileNotFoundError) as e:
                failures[sid] = str(e)
    else:
        ctx = multiprocessing.get_context(config.start_method)
        if config.start_method == "forkserver":
            ctx.set_forkserver_preload([__name__])
        with concurrent.futures.ProcessPoolExecutor(min(config.workers, len(todo)), mp_context=ctx) as pool:
            futures = {pool.submit(process_site, row, parts, config): sid for sid, row in todo}
            for fut in concurrent.futures.as_completed(futures):
                sid = futures[fut]
                try:
                    reports[sid] = fut.result()
                except (ValueError, FileNotFoundError) as e:
                    failures[sid] = str(e)
    if failures:
        lines = "\n".join(f"  {sid}: {msg}" for sid, msg in sorted(failures.items()))
        raise ValueError(f"{len(failures)} site(s) failed (the others are saved; fix these and re-run):\n{lines}")
    order = [formats.site_id(r.Metadata_Plate, r.Metadata_Well, r.Metadata_Site)
             for r in _shard_sites(pm, shard).itertuples()]
    return [reports[s] for s in order]


def assign_classes(plate_map: pd.DataFrame) -> dict[tuple[str, float], int]:
    """(treatment, dose) → class index, sorted by (dose, treatment): control (dose 0) is 0."""
    pairs = sorted({(float(d), str(t)) for t, d in zip(plate_map["Metadata_Treatment"], plate_map["Metadata_Dose"])})
    return {(t, d): k for k, (d, t) in enumerate(pairs)}


def assign_splits(plate_map: pd.DataFrame, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict[tuple[str, str], str]:
    """(plate, well) → "train" / "val" / "test" for every well of the plate map (`splits.split_wells`
    over the wells' classes from `assign_classes`)."""
    classes = assign_classes(plate_map)
    wells = plate_map.drop_duplicates(["Metadata_Plate", "Metadata_Well"])
    well_classes = {(p, w): classes[(str(t), float(d))] for p, w, t, d in
                    zip(wells["Metadata_Plate"], wells["Metadata_Well"], wells["Metadata_Treatment"], wells["Metadata_Dose"])}
    return splits.split_wells(well_classes, fractions, seed)


def merge(
    plate_map: str | os.PathLike | pd.DataFrame,
    out_dir: str | os.PathLike,
    config: CropConfig = CropConfig(),
) -> Path:
    """Join every site's part into `out_dir/crops.zarr` + `cells.parquet` + `summary.json`.

    Rows follow the plate map's site order, then label id. Raises ValueError listing
    the sites without a part (run their shards first) or parts made with other
    crop settings. Re-running is safe: the parts are left intact.
    """
    pm = _load_plate_map(plate_map)
    out = Path(out_dir)
    parts = out / PARTS_DIR
    sids = [formats.site_id(r.Metadata_Plate, r.Metadata_Well, r.Metadata_Site) for r in pm.itertuples()]
    missing = [s for s in sids if not (parts / s / SUMMARY_FILE).exists()]
    if missing:
        raise ValueError(
            f"{parts}: {len(missing)} of {len(sids)} site(s) not cropped yet: {missing[:10]}"
            f"{' …' if len(missing) > 10 else ''}; run every --shard first (finished sites are skipped)"
        )
    reports = [formats.read_json(parts / s / SUMMARY_FILE) for s in sids]
    settings = reports[0]["settings"]
    for s, r in zip(sids, reports):
        if r["settings"] != settings:
            raise ValueError(
                f"{parts / s}: cropped with settings {r['settings']} but {sids[0]} with {settings}; "
                "delete the parts made with the wrong settings and re-run them"
            )
    tables = [formats.read_cells(parts / s) for s in sids]
    cells = pd.concat([t for t in tables if len(t)] or tables[:1], ignore_index=True)
    classes = assign_classes(pm)
    well_split = assign_splits(pm, config.split_fractions, config.split_seed)
    cells["Metadata_Class"] = [classes[(str(t), float(d))] for t, d in
                               zip(cells["Metadata_Treatment"], cells["Metadata_Dose"])]
    names = {k: f"{t}@{d:g}" for (t, d), k in classes.items()}
    cells["Metadata_ClassName"] = cells["Metadata_Class"].map(names)
    cells["Metadata_Split"] = [well_split[(str(p), str(w))] for p, w in zip(cells["Metadata_Plate"], cells["Metadata_Well"])]
    cells["Metadata_Row"] = np.arange(len(cells), dtype=np.int64)
    attrs = {"channels": settings["channels"], **settings,
             "classes": [names[k] for k in sorted(names)], "mask_codes": {"background": 0, "central": 1, "other": 2}}
    formats.link_crop_stores([parts / s / formats.CROPS_STORE for s in sids], out / formats.CROPS_STORE, attrs)
    empty = [r["site_id"] for r in reports if r["n_cells"] == 0]
    summary = {
        "n_sites": len(sids), "n_cells": int(len(cells)),
        "n_filtered_small": int(sum(r["n_filtered_small"] for r in reports)),
        "n_padded": int(sum(r["n_padded"] for r in reports)),
        "n_touching_border": int(sum(r["n_touching_border"] for r in reports)),
        "empty_sites": empty,
        "classes": {names[k]: k for k in sorted(names)},
        "cells_per_split": {s: int((cells["Metadata_Split"] == s).sum()) for s in SPLITS},
        "settings": settings, "split_fractions": list(config.split_fractions), "split_seed": config.split_seed,
        "sites": reports,
    }
    formats.write_json(summary, out / SUMMARY_FILE)
    # Last: cells.parquet marks the dataset as complete.
    formats.write_cells(cells, out)
    return out


def crop_plate(
    plate_map: str | os.PathLike | pd.DataFrame,
    out_dir: str | os.PathLike,
    config: CropConfig = CropConfig(),
) -> Path:
    """Crop every site (resumable) and merge: the one call `gradcamo demo` needs."""
    pm = _load_plate_map(plate_map)
    crop_shard(pm, out_dir, config)
    return merge(pm, out_dir, config)
