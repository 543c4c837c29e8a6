#!/usr/bin/env python
"""Cellpose segmentation of 3D Cell Painting sites: z-stacks (ZCYX TIFF) -> label volumes (ZYX TIFF).

Per site (one plate-map row), 2D Cellpose runs on every z-slice on two channels picked by name
(cytoplasm + nucleus, e.g. AGP + DNA) and the slice masks are stitched across z by IoU
(``stitch_threshold``); ``--do-3d`` runs Cellpose's 3D mode instead. Stitching leaves thin "end
caps": at the top and bottom of a cell the slice mask shrinks, its IoU with the next slice falls
under the threshold and it becomes a separate label. They are MERGED into the cell they sit on
(see :func:`merge_end_caps`), never dropped, so a cell's volume is not cut short.

Outputs under ``--out``:
  labels/<site_id>_labels.tiff   ZYX, integer, 0 = background, one id per cell across z
  sites/<site_id>.json           the per-site record (cells, status, timing); its presence after
                                 the label file marks the site done, so a rerun skips it
  summary/shard-<i>-of-<n>.csv   the sites of one shard
  summary.csv, summary.json      merged over shards (``merge``): cells per site and totals
  plate_map.csv                  the input plate map with FileName_Labels -> our label files,
                                 ready for tools/crop.py
  segment_config.json            the settings; a rerun with other settings into the same folder
                                 is refused (mixing would make the labels inconsistent)

Physical sizes: when the plate map has the sites' voxel size (Metadata_PhysicalSizeZ/Y/X in µm, as
``gradcamo import`` writes them), ``--do-3d`` without ``--anisotropy`` uses Z / XY, and
``--diameter-um`` gives the cell diameter in µm (converted with the XY pixel size); sizes that
differ between sites are refused, naming them (`resolve_physical_settings`). The values used are
recorded in segment_config.json and summary.json.

Models: a Cellpose built-in name (cellpose 3: cyto3, nuclei, cyto2, ...; cellpose 4: cpsam) whose
weights must already be in ``$CELLPOSE_LOCAL_MODELS_PATH`` (default ``~/.cellpose/models``) --
nothing is ever downloaded; if they are missing the run stops before reading any image and says
which file to put where -- or a path to a model file. ``train-offline`` builds a small model with
no network (tools/cellpose_offline.py). Cellpose 3.1 and 4.x are both handled (4.x has no
``channels`` argument: the two chosen channels are passed as the image); only 3.1 is tested here.

Usage:
  python tools/segment.py run --plate-map plate/plate_map.csv --out seg --model cyto3 \\
      --cyto AGP --nucleus DNA --diameter 30 [--shard 0/4]
  python tools/segment.py merge --plate-map plate/plate_map.csv --out seg
  python tools/segment.py evaluate --plate-map plate/plate_map.csv --out seg   # F1 vs FileName_Labels
  python tools/segment.py train-offline --out models/cellpose_offline

A SLURM job array of N shards, then the merge:
  #SBATCH --array=0-15
  python tools/segment.py run --plate-map pm.csv --out seg --shard $SLURM_ARRAY_TASK_ID/16 ...
  # afterwards (e.g. sbatch --dependency=afterok:<array job id>):
  python tools/segment.py merge --plate-map pm.csv --out seg

torch/cellpose are imported only here (tools/), lazily, and never torchvision.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from gradcamo_jax.data import formats, shards
from gradcamo_jax.data.seg_metrics import MatchScore, match_f1

log = logging.getLogger("segment")

MODELS_ENV = "CELLPOSE_LOCAL_MODELS_PATH"


class SegmentError(RuntimeError):
    """A problem with the input or the setup, with a message that names the file and the fix."""


class ModelNotFoundError(SegmentError):
    """No weights for the requested model on this machine (nothing is downloaded)."""


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SegmentConfig:
    """Settings of a segmentation run (all of them are recorded in segment_config.json).

    Attributes:
      model: a Cellpose built-in name (weights looked up in the local models folder) or a file path.
      cyto_channel: channel name Cellpose segments (the cell body), e.g. "AGP" or "RNA".
      nucleus_channel: channel name of the nuclei ("DNA"), or None to run on one channel only.
      channel_names: names of the stack's channels, in stack order (the C axis).
      axes: axis order of the image files, a permutation of "ZCYX".
      diameter: expected cell diameter in pixels; None uses the model's own (its training mean).
        Derived from ``diameter_um`` by `resolve_physical_settings` when that is given.
      do_3d: Cellpose 3D mode instead of 2D per slice + stitching.
      stitch_threshold: IoU above which masks in neighbouring slices get the same id (2D mode).
      anisotropy: z step / xy pixel size, for --do-3d only; None (not given) takes it from the
        plate map's Metadata_PhysicalSizeZ/X when it has them (`resolve_physical_settings`).
      flow_threshold, cellprob_threshold, min_size: Cellpose's mask settings (min_size in pixels
        per slice before stitching, in voxels after).
      cap_max_slices: a stitched object at most this many slices thick whose end face lies on
        another, larger object is an end cap and is merged into it (0 turns merging off).
      cap_overlap: minimum fraction of the cap's end face that must overlap the object it merges
        into (intersection over the cap's area, not IoU: a cap is small, so IoU is low).
      min_contrast: an object is kept only if its mean intensity, in the cyto or the nucleus
        channel (whichever is higher), lies at least this many background standard deviations
        above the site's background median (robust: median and 1.4826·MAD of the voxels outside
        every object). Cellpose rescales each slice to its own 1st–99th percentiles, so on a
        field with no cells it stretches noise into "cells", whose contrast is near 0, well
        below that of real cells (experiments/README.md, 'Measurements behind default
        settings', tools/segment.py). 0 turns the filter off. Dropped objects are counted in
        the summary.
      batch_size: Cellpose tiles per forward pass.
      tile_size: Cellpose tile side (``bsize``), 224 as the built-in models were trained. A slice
        (after rescaling to the model's diameter) no larger than the tile runs as one tile of its
        own size; a smaller tile only splits it into more, overlapping tiles, which is slower
        (BENCHMARKS.md, 'Measurements behind code choices', tools/segment.py).
      diameter_um: expected cell diameter in µm (``--diameter-um``), converted to ``diameter``
        with the plate map's XY pixel size.
      voxel_size_um: the plate's (z, y, x) voxel size in µm that `resolve_physical_settings`
        used (None entries: unknown), recorded so the run says what it assumed.
    """

    model: str = "cyto3"
    cyto_channel: str = "AGP"
    nucleus_channel: str | None = "DNA"
    channel_names: tuple[str, ...] = formats.CHANNELS
    axes: str = "ZCYX"
    diameter: float | None = None
    do_3d: bool = False
    stitch_threshold: float = 0.5
    anisotropy: float | None = None
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    min_size: int = 15
    cap_max_slices: int = 2
    cap_overlap: float = 0.5
    min_contrast: float = 2.0
    batch_size: int = 8
    tile_size: int = 224
    diameter_um: float | None = None
    voxel_size_um: tuple[float | None, float | None, float | None] | None = None

    def __post_init__(self):
        names = list(self.channel_names)
        for role, name in (("cyto", self.cyto_channel), ("nucleus", self.nucleus_channel)):
            if name is not None and name not in names:
                raise SegmentError(f"--{role} channel {name!r} is not one of the stack's channels {names}")
        if self.nucleus_channel == self.cyto_channel:
            raise SegmentError(f"cyto and nucleus channel are both {self.cyto_channel!r}; use --nucleus none for one channel")
        if not 0.0 < self.stitch_threshold <= 1.0 and not self.do_3d:
            raise SegmentError(f"stitch_threshold must be in (0, 1], got {self.stitch_threshold}")
        if not 0.0 < self.cap_overlap <= 1.0:
            raise SegmentError(f"cap_overlap must be in (0, 1], got {self.cap_overlap}")
        if self.diameter_um is not None and not (np.isfinite(self.diameter_um) and self.diameter_um > 0):
            raise SegmentError(f"--diameter-um must be a positive number, got {self.diameter_um}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["channel_names"] = list(self.channel_names)
        # Recorded only when set: a run without physical sizes writes the same segment_config.json as
        # before they existed, so resuming such a folder is not refused as "other settings".
        for name in ("diameter_um", "voxel_size_um"):
            if d[name] is None:
                del d[name]
            elif name == "voxel_size_um":
                d[name] = list(d[name])
        return d


# ----------------------------------------------------------------------------- physical voxel size


def _sig(v: float) -> float:
    # Sizes are compared at 4 significant digits, as `gradcamo import` groups them (metadata round-trips
    # through µm/m conversions and XML text leave tiny differences).
    return float(f"{v:.4g}")


def plate_axis_size(plate_map: pd.DataFrame, column: str) -> float | None:
    """The one value of a voxel-size column over all sites of ``plate_map`` (µm), None when no site has one.

    Raises:
      SegmentError: sites with different values, or some sites without one; the message
        names the sites of each group.
    """
    if column not in plate_map.columns:
        return None
    values = pd.to_numeric(plate_map[column], errors="coerce").to_numpy(np.float64)
    known = np.isfinite(values) & (values > 0)
    if not known.any():
        return None
    sids = [formats.site_id(*r) for r in plate_map[list(formats.SITE_KEY)].itertuples(index=False)]
    groups: dict[float | None, list[str]] = {}
    for sid, v, k in zip(sids, values, known):
        groups.setdefault(_sig(v) if k else None, []).append(sid)
    if len(groups) > 1:
        text = "; ".join(f"{'unknown' if v is None else f'{v:g} µm'}: {len(g)} site(s) ({', '.join(g[:5])}"
                         f"{', ...' if len(g) > 5 else ''})" for v, g in sorted(groups.items(), key=lambda kv: -len(kv[1])))
        raise SegmentError(f"the plate map's {column} differs between sites — {text}; one run needs one voxel size: "
                           "segment the groups separately (one plate map each), or give --diameter/--anisotropy in "
                           "pixels")
    return float(values[known][0])


def resolve_physical_settings(cfg: SegmentConfig, plate_map: pd.DataFrame) -> SegmentConfig:
    """Fill the pixel settings that follow from the plate map's voxel size (`formats.PHYSICAL_SIZE_COLUMNS`, µm).

    * ``diameter_um`` → ``diameter = diameter_um / xy`` (pixels), xy the XY pixel size.
    * ``do_3d`` and no ``anisotropy`` given → ``anisotropy = z / xy`` when both are known
      (Cellpose's 3D mode rescales Z by it); otherwise left None (Cellpose: isotropic).
    * ``voxel_size_um`` ← the (z, y, x) of the plate (None where unknown), for the record.

    Sizes are read only where a setting needs them, so a plate map with mixed sizes still
    runs with settings in pixels; ``voxel_size_um`` holds None for an axis not read or not
    known. A config whose ``voxel_size_um`` is set was resolved already and is returned as
    it is (so resolving twice changes nothing; every shard resolves the same config).

    Args:
      cfg: the user's settings (``diameter`` in pixels or ``diameter_um``, not both).
      plate_map: one row per site with ``formats.SITE_KEY`` and optionally `formats.PHYSICAL_SIZE_COLUMNS`.

    Returns:
      the resolved config.

    Raises:
      SegmentError: ``--diameter`` and ``--diameter-um`` both given; ``--diameter-um`` and
        no XY size in the plate map; sizes that differ between sites (named); non-square
        pixels (Y ≠ X) where the XY size is needed.
    """
    if cfg.voxel_size_um is not None:
        return cfg
    need_xy = cfg.diameter_um is not None or (cfg.do_3d and cfg.anisotropy is None)
    col_z, col_y, col_x = formats.PHYSICAL_SIZE_COLUMNS
    z = plate_axis_size(plate_map, col_z) if cfg.do_3d and cfg.anisotropy is None else None
    y = plate_axis_size(plate_map, col_y) if need_xy else None
    x = plate_axis_size(plate_map, col_x) if need_xy else None
    if y is not None and x is not None and _sig(y) != _sig(x):
        raise SegmentError(f"the plate map's pixels are not square (Y {y:g} µm, X {x:g} µm); Cellpose assumes square "
                           "pixels: resample the images, or give --diameter/--anisotropy in pixels")
    xy = x if x is not None else y
    changes: dict = {}
    if cfg.diameter_um is not None:
        if xy is None:
            raise SegmentError(f"--diameter-um {cfg.diameter_um:g}: the plate map has no XY pixel size "
                               f"({col_y}/{col_x}); re-import it with --voxel-size Z,Y,X, "
                               "or give --diameter in pixels")
        diameter = cfg.diameter_um / xy
        if cfg.diameter is not None and not np.isclose(cfg.diameter, diameter, rtol=1e-6):
            raise SegmentError(f"--diameter {cfg.diameter:g} (pixels) and --diameter-um {cfg.diameter_um:g} "
                               f"(= {diameter:.4g} pixels at {xy:g} µm) both given; give one")
        changes["diameter"] = diameter
    if cfg.do_3d and cfg.anisotropy is None and z is not None and xy is not None:
        changes["anisotropy"] = z / xy
    if any(v is not None for v in (z, y, x)):
        changes["voxel_size_um"] = (z, y, x)
    return dataclasses.replace(cfg, **changes) if changes else cfg


# ----------------------------------------------------------------------------- models


def cellpose_major() -> int:
    """Major version of the installed cellpose (3 or 4), read without importing it."""
    try:
        return int(metadata.version("cellpose").split(".")[0])
    except metadata.PackageNotFoundError:
        raise SegmentError("cellpose is not installed: pip install 'cellpose>=3.1,<3.2' (see pyproject extra 'segment')") from None


def models_dir() -> Path:
    """Where Cellpose keeps built-in weights: $CELLPOSE_LOCAL_MODELS_PATH, else ~/.cellpose/models."""
    env = os.environ.get(MODELS_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cellpose" / "models"


# Built-in names and the file each one is stored under in the models folder. Cellpose 3.1 names
# cyto/cyto2/nuclei "<name>torch_0" and the others by their name (cellpose.models.model_path);
# cellpose 4 ships one model, Cellpose-SAM, stored as "cpsam".
_BUILTIN_3 = (
    "cyto3", "nuclei", "cyto2_cp3", "tissuenet_cp3", "livecell_cp3", "yeast_PhC_cp3", "yeast_BF_cp3",
    "bact_phase_cp3", "bact_fluor_cp3", "deepbacs_cp3", "cyto2", "cyto", "CPx", "transformer_cp3",
    "neurips_cellpose_default", "neurips_cellpose_transformer", "neurips_grayscale_cyto2",
    "CP", "TN1", "TN2", "TN3", "LC1", "LC2", "LC3", "LC4",
)
_BUILTIN_4 = ("cpsam",)


def builtin_file_name(name: str, major: int) -> str | None:
    """File name of built-in model ``name`` under the models folder, or None if not a built-in."""
    if major >= 4:
        return name if name in _BUILTIN_4 else None
    if name not in _BUILTIN_3:
        return None
    return f"{name}torch_0" if name in ("cyto", "cyto2", "nuclei") else name


@dataclass(frozen=True)
class ResolvedModel:
    """A model the run can load without the network: ``path`` exists; ``builtin`` is its name or None."""

    spec: str
    path: Path
    builtin: str | None


def resolve_model(spec: str, major: int, folder: Path | None = None) -> ResolvedModel:
    """Find the weights file for ``spec`` (a path or a built-in name) or fail with the fix.

    Checked here, before Cellpose sees the name, because Cellpose would otherwise try to download
    missing built-in weights (and create ~/.cellpose). Never touches the network.

    Raises:
      ModelNotFoundError: no such file, or a built-in whose weights are not in the models folder
        (the message names the folder, the expected file name and the alternatives).
    """
    folder = models_dir() if folder is None else Path(folder)
    p = Path(spec).expanduser()
    if p.is_file():
        return ResolvedModel(spec, p.resolve(), None)
    if p.is_dir():
        raise ModelNotFoundError(f"--model {spec}: is a folder; pass the model weights file inside it")
    fname = builtin_file_name(spec, major)
    if fname is not None:
        expected = folder / fname
        if expected.is_file():
            return ResolvedModel(spec, expected.resolve(), spec)
        raise ModelNotFoundError(
            f"Cellpose built-in model {spec!r}: weights not found at {expected}. This tool never downloads "
            f"(no network assumed). Fix: copy the weights file '{fname}' (on a machine with internet, run "
            f"cellpose once with this model and take it from ~/.cellpose/models/{fname}) into {folder}, "
            f"or into another folder and set {MODELS_ENV} to it; or pass a local model file with --model "
            f"PATH (e.g. one made by `python tools/segment.py train-offline --out PATH`)."
        )
    if (folder / spec).is_file():  # a user-trained model saved in the models folder by name
        return ResolvedModel(spec, (folder / spec).resolve(), None)
    builtins = _BUILTIN_4 if major >= 4 else _BUILTIN_3
    raise ModelNotFoundError(
        f"--model {spec!r}: no such file, and not a cellpose {major}.x built-in name "
        f"({', '.join(builtins[:6])}, ...); pass a path to a model file or a built-in name "
        f"whose weights are in {folder} ({MODELS_ENV})."
    )


def pick_device(device: str):
    """'auto' -> CUDA when torch sees a GPU, else CPU; 'cpu'/'cuda'/'cuda:1' as given."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SegmentError(f"--device {device}: torch sees no CUDA GPU (torch {torch.__version__}); use --device cpu")
    return torch.device(device)


def load_model(resolved: ResolvedModel, device, major: int):
    """A cellpose CellposeModel for ``resolved`` on ``device`` (torch.device)."""
    from cellpose import models

    gpu = device.type != "cpu"
    try:
        # Always a path, never a name: Cellpose resolves names by downloading when absent.
        return models.CellposeModel(gpu=gpu, device=device, pretrained_model=str(resolved.path))
    except Exception as e:
        other = "3.x model files need cellpose 3.x" if major >= 4 else "cellpose-4 (cpsam) files need cellpose 4"
        raise SegmentError(
            f"--model {resolved.spec}: cannot load {resolved.path} with cellpose {metadata.version('cellpose')} "
            f"({type(e).__name__}: {e}); is it a Cellpose model file? ({other})"
        ) from e


# ----------------------------------------------------------------------------- per-site compute


def select_channels(stack: np.ndarray, cfg: SegmentConfig) -> np.ndarray:
    """(Z, C, Y, X) stack -> (Z, 2, Y, X) float32: [cyto, nucleus] by name (nucleus zeros if None)."""
    names = list(cfg.channel_names)
    if stack.ndim != 4 or stack.shape[1] != len(names):
        raise SegmentError(f"stack shape {stack.shape} does not match (Z, C={len(names)}, Y, X) for channels {names}")
    cyto = stack[:, names.index(cfg.cyto_channel)]
    nuc = stack[:, names.index(cfg.nucleus_channel)] if cfg.nucleus_channel else np.zeros_like(cyto)
    return np.stack([cyto, nuc], axis=1).astype(np.float32, copy=False)


def run_cellpose(model, x: np.ndarray, cfg: SegmentConfig, major: int) -> np.ndarray:
    """Cellpose on a (Z, 2, Y, X) stack -> (Z, Y, X) integer masks (ids stitched across z).

    Cellpose 3 takes ``channels`` ([1, 2]: segment channel 1, nuclei in channel 2; [1, 0]: no
    nuclei); cellpose 4 dropped that argument and reads the first channels of the image, which
    is why the two channels are selected beforehand.
    """
    kw = dict(
        batch_size=cfg.batch_size, bsize=cfg.tile_size, diameter=cfg.diameter, flow_threshold=cfg.flow_threshold,
        cellprob_threshold=cfg.cellprob_threshold, min_size=cfg.min_size,
    )
    if major < 4:
        kw["channels"] = [1, 2] if cfg.nucleus_channel else [1, 0]
    if not cfg.nucleus_channel and major >= 4:
        x = x[:, :1]
    if x.shape[0] == 1:
        # One slice: Cellpose squeezes size-1 axes, so run it as a 2D image.
        masks = model.eval(x[0], channel_axis=0, **kw)[0]
        return np.asarray(masks)[None]
    if cfg.do_3d:
        kw.update(do_3D=True, anisotropy=cfg.anisotropy)
    else:
        kw.update(do_3D=False, stitch_threshold=cfg.stitch_threshold)
    masks = model.eval(x, channel_axis=1, z_axis=0, **kw)[0]
    return np.asarray(masks)


def merge_end_caps(labels: np.ndarray, max_slices: int, min_overlap: float) -> tuple[np.ndarray, int]:
    """Merge thin end caps left by z-stitching into the object they sit on.

    A label is a cap of label B when it spans at most ``max_slices`` slices, B is larger (in
    voxels), and on the slice just below its bottom (or above its top) B covers at least
    ``min_overlap`` of the cap's end face. Caps are visited smallest first and merged into the B
    with the largest coverage; a cap of a cap ends up in the big object. Objects that sit on
    nothing (or on background) are kept: they are cells, not caps.

    Args:
      labels: (Z, Y, X) integer labels, 0 = background.
      max_slices: caps are at most this thick (0 disables merging).
      min_overlap: coverage threshold in (0, 1].

    Returns:
      (labels with caps merged (a copy), number of caps merged). Ids are not renumbered.
    """
    labels = np.array(labels, copy=True)
    if max_slices <= 0 or labels.max() == 0:
        return labels, 0
    ids = np.unique(labels[labels > 0])
    volume = dict(zip(ids.tolist(), ndi.sum_labels(np.ones_like(labels), labels, ids).astype(int).tolist()))
    slices = ndi.find_objects(labels)
    merged = 0
    for lab in sorted(ids.tolist(), key=lambda i: volume[i]):
        zs = slices[lab - 1]
        if zs is None:
            continue
        z0, z1 = zs[0].start, zs[0].stop - 1
        if z1 - z0 + 1 > max_slices:
            continue
        best, best_cov = 0, 0.0
        for face, nb in ((z0, z0 - 1), (z1, z1 + 1)):
            if not 0 <= nb < labels.shape[0]:
                continue
            # Within the cap's bounding box only: caps are small, fields can be large.
            foot = labels[face][zs[1:]] == lab
            under = labels[nb][zs[1:]][foot]
            under = under[under > 0]
            if under.size == 0:
                continue
            vals, counts = np.unique(under, return_counts=True)
            k = int(np.argmax(counts))
            cov = counts[k] / foot.sum()
            cand = int(vals[k])
            if cand != lab and cov >= min_overlap and volume[cand] > volume[lab] and cov > best_cov:
                best, best_cov = cand, cov
        if best:
            box = labels[zs]
            box[box == lab] = best
            volume[best] += volume.pop(lab)
            # Grow the target's bounding box so later caps of the merged object see it.
            b = slices[best - 1]
            slices[best - 1] = tuple(slice(min(b[d].start, zs[d].start), max(b[d].stop, zs[d].stop)) for d in range(3))
            slices[lab - 1] = None
            merged += 1
    return labels, merged


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Renumber ids to 1..n in order of first appearance in a (Z, Y, X) raster scan; 0 stays 0."""
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    order = ids[np.argsort(first)]
    order = order[order != 0]
    lut = np.zeros(int(flat.max()) + 1 if flat.size else 1, np.int32)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return lut[labels]


def object_contrast(labels: np.ndarray, channel: np.ndarray) -> np.ndarray:
    """Per-object contrast of one channel ``(Z, Y, X)`` against the background (label 0):
    ``(mean inside object − background median) / (1.4826 · background MAD)``.

    Returns ``(labels.max() + 1,)`` float64 indexed by id (entry 0, the background, and ids
    absent from ``labels`` are NaN). With no background voxels, or a constant background, every
    contrast is +inf (nothing to compare against, so nothing is judged faint)."""
    n = int(labels.max()) + 1
    out = np.full(n, np.nan)
    bg = channel[labels == 0].astype(np.float64)
    if bg.size == 0:
        out[1:] = np.inf
        return out
    med = np.median(bg)
    sd = 1.4826 * np.median(np.abs(bg - med))
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n)
    sums = np.bincount(flat, weights=channel.ravel().astype(np.float64), minlength=n)
    present = counts > 0
    present[0] = False
    mean = np.divide(sums, counts, out=np.full(n, np.nan), where=present)
    out[present] = np.inf if sd == 0 else (mean[present] - med) / sd
    return out


def drop_faint_objects(labels: np.ndarray, channels: np.ndarray, min_contrast: float) -> tuple[np.ndarray, int]:
    """Set to 0 every object of ``labels`` ``(Z, Y, X)`` whose contrast (`object_contrast`) is
    below ``min_contrast`` in all of ``channels`` ``(Z, K, Y, X)``; returns (labels, number dropped)."""
    if min_contrast <= 0 or labels.max() == 0:
        return labels, 0
    best = np.max([object_contrast(labels, channels[:, k]) for k in range(channels.shape[1])], axis=0)
    faint = np.flatnonzero(best < min_contrast)
    faint = faint[faint > 0]
    if faint.size:
        labels = np.where(np.isin(labels, faint), 0, labels)
    return labels, int(faint.size)


def segment_stack(model, stack: np.ndarray, cfg: SegmentConfig, major: int) -> tuple[np.ndarray, int, int]:
    """(Z, C, Y, X) stack -> ((Z, Y, X) int32 labels 1..n, end caps merged, faint objects dropped)."""
    channels = select_channels(stack, cfg)
    masks = run_cellpose(model, channels, cfg, major)
    if masks.shape != (stack.shape[0], *stack.shape[2:]):
        raise SegmentError(f"cellpose returned masks of shape {masks.shape} for a stack of shape {stack.shape}")
    masks = masks.astype(np.int64, copy=False)
    n_caps = 0
    if not cfg.do_3d and masks.shape[0] > 1:
        masks, n_caps = merge_end_caps(masks, cfg.cap_max_slices, cfg.cap_overlap)
    if not cfg.nucleus_channel:
        channels = channels[:, :1]  # select_channels pads a zero nucleus channel; it has no contrast to judge
    masks, n_faint = drop_faint_objects(masks, channels, cfg.min_contrast)
    return relabel_sequential(masks), n_caps, n_faint


# ----------------------------------------------------------------------------- the run


def label_path(out: Path, sid: str) -> Path:
    return out / "labels" / formats.labels_name(sid)


def record_path(out: Path, sid: str) -> Path:
    return out / "sites" / f"{sid}.json"


def shard_summary_path(out: Path, index: int, count: int) -> Path:
    return out / "summary" / f"shard-{index}-of-{count}.csv"


def _check_config(out: Path, cfg: SegmentConfig, overwrite: bool) -> None:
    """Refuse to mix settings in one output folder (all shards write the same document)."""
    path = out / "segment_config.json"
    doc = cfg.to_json()
    if path.exists() and not overwrite:
        old = formats.read_json(path)
        if old != json.loads(json.dumps(doc)):
            diff = {k: (old.get(k), v) for k, v in doc.items() if old.get(k) != v}
            raise SegmentError(
                f"{out}: was segmented with other settings {diff} (old, new); use a new --out folder, "
                "or --overwrite to redo every site with the new settings"
            )
    formats.write_json(doc, path)


def segment_site(model, row: pd.Series, out: Path, cfg: SegmentConfig, major: int, device: str) -> dict:
    """Segment one plate-map row; writes its label TIFF, then its record. Returns the record.

    Raises SegmentError naming the image file when it cannot be read (nothing is written then).
    """
    sid = formats.site_id(row["Metadata_Plate"], row["Metadata_Well"], row["Metadata_Site"])
    image = row["FileName_Image"]
    tic = time.perf_counter()
    try:
        stack = formats.read_stack(image, axes=cfg.axes, channels=list(cfg.channel_names))
    except (ValueError, FileNotFoundError) as e:
        raise SegmentError(f"site {sid}: {e}") from e
    labels, n_caps, n_faint = segment_stack(model, stack, cfg, major)
    n_cells = int(labels.max())
    status = "ok" if n_cells else "no_cells"
    if not n_cells:
        log.warning("site %s: no cells found in %s (labels are all background)", sid, image)
    lp = label_path(out, sid)
    formats.write_labels(lp, labels)
    record = {
        "Metadata_Plate": row["Metadata_Plate"], "Metadata_Well": row["Metadata_Well"],
        "Metadata_Site": int(row["Metadata_Site"]), "site_id": sid, "FileName_Image": image,
        "FileName_Labels": str(lp.relative_to(out)), "n_cells": n_cells, "n_end_caps_merged": n_caps,
        "n_faint_dropped": n_faint,
        "status": status, "message": "" if n_cells else "no cells found", "shape_zyx": list(labels.shape),
        "seconds": round(time.perf_counter() - tic, 3), "device": device,
    }
    # The record is written last: its presence means the label file is complete.
    formats.write_json(record, record_path(out, sid))
    return record


def _error_record(row: pd.Series, sid: str, message: str) -> dict:
    return {
        "Metadata_Plate": row["Metadata_Plate"], "Metadata_Well": row["Metadata_Well"],
        "Metadata_Site": int(row["Metadata_Site"]), "site_id": sid, "FileName_Image": row["FileName_Image"],
        "FileName_Labels": "", "n_cells": 0, "n_end_caps_merged": 0, "n_faint_dropped": 0, "status": "error", "message": message,
        "shape_zyx": [], "seconds": 0.0, "device": "",
    }


SUMMARY_COLUMNS = [
    "Metadata_Plate", "Metadata_Well", "Metadata_Site", "site_id", "FileName_Image", "FileName_Labels",
    "n_cells", "n_end_caps_merged", "n_faint_dropped", "status", "message", "seconds", "device",
]


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    with formats.atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def run(plate_map: str | os.PathLike, out: str | os.PathLike, cfg: SegmentConfig, *, shard: tuple[int, int] = (0, 1),
        device: str = "auto", threads: int | None = None, keep_going: bool = False, overwrite: bool = False) -> pd.DataFrame:
    """Segment the sites of one shard of a plate map. Returns this shard's summary table.

    Order of checks, so that a bad setup fails before any work: cellpose installed, model
    weights present (no download), plate map valid with every image present, output folder
    settings. Sites whose record exists are skipped (resumable) unless ``overwrite``. An
    unreadable image stops the run with an error naming it, or with ``keep_going`` is recorded
    as status "error" (no label file) and the run continues; the errors are raised at the end.
    With one shard the summaries are merged right away.
    """
    out = Path(out)
    index, count = shard
    major = cellpose_major()
    resolved = resolve_model(cfg.model, major)
    try:
        df = formats.read_plate_map(plate_map)
    except (ValueError, FileNotFoundError) as e:
        raise SegmentError(str(e)) from e
    cfg = resolve_physical_settings(cfg, df)
    if cfg.voxel_size_um is not None:
        log.info("voxel size (z, y, x) µm from the plate map: %s -> diameter %s px, anisotropy %s",
                 cfg.voxel_size_um, "model's" if cfg.diameter is None else f"{cfg.diameter:.4g}",
                 "-" if cfg.anisotropy is None else f"{cfg.anisotropy:.4g}")
    if cfg.do_3d and cfg.anisotropy is None:
        log.warning("--do-3d without --anisotropy, and the plate map lacks the Z or XY voxel size "
                    "(Metadata_PhysicalSizeZ/X): Cellpose assumes isotropic voxels (anisotropy 1)")
    _check_config(out, cfg, overwrite)
    rows = shards.shard_rows(len(df), shard)
    import torch

    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    log.info("cellpose %s, model %s (%s), device %s, shard %d/%d: %d of %d sites",
             metadata.version("cellpose"), resolved.spec, resolved.path, dev, index, count, len(rows), len(df))
    model = None
    records, errors = [], []
    for i in rows:
        row = df.iloc[int(i)]
        sid = formats.site_id(row["Metadata_Plate"], row["Metadata_Well"], row["Metadata_Site"])
        rp = record_path(out, sid)
        if rp.exists() and label_path(out, sid).exists() and not overwrite:
            log.info("site %s: done before, skipped", sid)
            records.append(formats.read_json(rp))
            continue
        if model is None:  # loaded lazily: a fully done shard does not pay for it
            model = load_model(resolved, dev, major)
        try:
            rec = segment_site(model, row, out, cfg, major, str(dev))
        except SegmentError as e:
            if not keep_going:
                raise
            log.error("%s", e)
            errors.append(str(e))
            rec = _error_record(row, sid, str(e))
        else:
            log.info("site %s: %d cells (%d end caps merged, %d faint objects dropped) in %.1f s", sid, rec["n_cells"],
                     rec["n_end_caps_merged"], rec["n_faint_dropped"], rec["seconds"])
        records.append(rec)
    summary = pd.DataFrame(records, columns=SUMMARY_COLUMNS)
    _write_csv(summary, shard_summary_path(out, index, count))
    if count == 1:
        merge(plate_map, out, allow_partial=bool(errors))
    if errors:
        raise SegmentError(f"{len(errors)} site(s) failed (recorded in the summary): " + " | ".join(errors))
    return summary


def merge(plate_map: str | os.PathLike, out: str | os.PathLike, *, allow_partial: bool = False) -> pd.DataFrame:
    """Join the shard summaries into summary.csv/summary.json and write plate_map.csv for crop.py.

    Every plate-map site must have a summary row (from any shard) unless ``allow_partial``; a
    site seen by two shard files (e.g. a rerun with another COUNT) keeps its newest record.
    """
    out = Path(out)
    try:
        df = formats.read_plate_map(plate_map)
    except (ValueError, FileNotFoundError) as e:
        raise SegmentError(str(e)) from e
    parts = sorted((out / "summary").glob("shard-*-of-*.csv"))
    parts = [p for p in parts if not formats.is_temporary(p)]
    if not parts:
        raise SegmentError(f"{out / 'summary'}: no shard summaries; run `segment.py run` (per shard) first")
    tables = [pd.read_csv(p, dtype={"Metadata_Plate": str, "Metadata_Well": str, "message": str}, keep_default_na=False)
              for p in parts]
    # Per-site records are the source of truth (a shard file may predate a rerun of its sites).
    summary = pd.concat(tables, ignore_index=True)
    recs = []
    for sid in summary["site_id"].drop_duplicates():
        rp = record_path(out, sid)
        recs.append(formats.read_json(rp) if rp.exists() else summary[summary["site_id"] == sid].iloc[-1].to_dict())
    summary = pd.DataFrame(recs, columns=SUMMARY_COLUMNS)
    expected = [formats.site_id(*r) for r in df[list(formats.SITE_KEY)].itertuples(index=False)]
    missing = sorted(set(expected) - set(summary["site_id"]))
    if missing and not allow_partial:
        raise SegmentError(
            f"{out}: {len(missing)} site(s) of {len(expected)} not segmented yet ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); run the missing shards, then merge again"
        )
    order = {s: i for i, s in enumerate(expected)}
    summary = summary[summary["site_id"].isin(order)].sort_values("site_id", key=lambda s: s.map(order))
    summary = summary.reset_index(drop=True)
    _write_csv(summary, out / "summary.csv")
    totals = {
        "n_sites": len(expected), "n_segmented": int(summary["status"].isin(["ok", "no_cells"]).sum()),
        "n_cells": int(summary["n_cells"].sum()), "n_no_cells": int((summary["status"] == "no_cells").sum()),
        "n_errors": int((summary["status"] == "error").sum()), "missing": missing,
        "cells_per_site": {r.site_id: int(r.n_cells) for r in summary.itertuples()},
        "config": formats.read_json(out / "segment_config.json") if (out / "segment_config.json").exists() else None,
        "cellpose": metadata.version("cellpose"),
    }
    formats.write_json(totals, out / "summary.json")
    # A plate map for tools/crop.py: the input rows that have labels now, pointing at them.
    done = summary[summary["status"].isin(["ok", "no_cells"])].set_index("site_id")["FileName_Labels"]
    pm = df.copy()
    pm["site_id"] = expected
    pm = pm[pm["site_id"].isin(done.index)]
    pm["FileName_Labels"] = pm["site_id"].map(done)
    formats.write_plate_map(pm.drop(columns=["site_id"]), out / "plate_map.csv")
    log.info("merged %d shard summaries: %d sites, %d cells, %d without cells, %d errors, %d missing",
             len(parts), totals["n_sites"], totals["n_cells"], totals["n_no_cells"], totals["n_errors"], len(missing))
    return summary


def evaluate(plate_map: str | os.PathLike, out: str | os.PathLike, *, truth_column: str = "FileName_Labels",
             threshold: float = 0.5) -> pd.DataFrame:
    """F1 at IoU ``threshold`` per site: our labels vs the true labels named in ``truth_column``.

    Writes ``out/f1.csv`` (one row per segmented site) and returns it.
    """
    out = Path(out)
    df = formats.read_plate_map(plate_map)
    if truth_column not in df.columns:
        raise SegmentError(f"{plate_map}: no {truth_column} column with true labels to compare against")
    rows = []
    for r in df.itertuples(index=False):
        sid = formats.site_id(r.Metadata_Plate, r.Metadata_Well, r.Metadata_Site)
        truth = getattr(r, truth_column)
        lp = label_path(out, sid)
        if not truth or not lp.exists():
            continue
        true = formats.read_labels(truth)
        pred = formats.read_labels(lp, expect_shape=true.shape)
        s: MatchScore = match_f1(true, pred, threshold)
        rows.append({"site_id": sid, **s.as_dict()})
    if not rows:
        raise SegmentError(f"{out}: no site has both our labels and true labels ({truth_column})")
    table = pd.DataFrame(rows)
    _write_csv(table, out / "f1.csv")
    return table


# ----------------------------------------------------------------------------- CLI


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segment.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="also show cellpose's own progress messages")
    sub = p.add_subparsers(dest="command", required=True)
    d = SegmentConfig()

    r = sub.add_parser("run", help="segment the sites of a plate map (one shard of it)")
    r.add_argument("--plate-map", required=True, help="plate map (CSV/Parquet), one row per site")
    r.add_argument("--out", required=True, help="output folder (labels/, sites/, summary/)")
    r.add_argument("--model", default=d.model, help=f"built-in name (weights in ${MODELS_ENV}) or model file path [{d.model}]")
    r.add_argument("--cyto", default=d.cyto_channel, help=f"channel to segment (cell body) [{d.cyto_channel}]")
    r.add_argument("--nucleus", default=d.nucleus_channel, help=f"nucleus channel, or 'none' [{d.nucleus_channel}]")
    r.add_argument("--channel-names", default=",".join(d.channel_names), help="the stacks' channel names, comma-separated, in order")
    r.add_argument("--axes", default=d.axes, help=f"axis order of the image files [{d.axes}]")
    r.add_argument("--diameter", type=float, default=None, help="cell diameter in pixels [the model's]")
    r.add_argument("--diameter-um", type=float, default=None,
                   help="cell diameter in µm, converted with the plate map's XY pixel size (Metadata_PhysicalSizeX)")
    r.add_argument("--do-3d", action="store_true", help="Cellpose 3D mode instead of 2D slices + stitching")
    r.add_argument("--stitch-threshold", type=float, default=d.stitch_threshold, help=f"IoU to stitch slices [{d.stitch_threshold}]")
    r.add_argument("--anisotropy", type=float, default=None,
                   help="z step / xy pixel size (--do-3d) [from the plate map's Metadata_PhysicalSizeZ/X if present]")
    r.add_argument("--flow-threshold", type=float, default=d.flow_threshold)
    r.add_argument("--cellprob-threshold", type=float, default=d.cellprob_threshold)
    r.add_argument("--min-size", type=int, default=d.min_size)
    r.add_argument("--cap-max-slices", type=int, default=d.cap_max_slices,
                   help=f"end caps to merge are at most this thick; 0 = off [{d.cap_max_slices}]")
    r.add_argument("--cap-overlap", type=float, default=d.cap_overlap, help=f"end-face coverage needed to merge a cap [{d.cap_overlap}]")
    r.add_argument("--min-contrast", type=float, default=d.min_contrast,
                   help=f"drop objects fainter than this many background SDs above background; 0 = off [{d.min_contrast}]")
    r.add_argument("--batch-size", type=int, default=d.batch_size)
    r.add_argument("--tile-size", type=int, default=d.tile_size, help=f"Cellpose tile side (bsize) [{d.tile_size}]")
    r.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N [auto]")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch default]")
    r.add_argument("--shard", default="0/1", help="INDEX/COUNT, 0-based, e.g. $SLURM_ARRAY_TASK_ID/$N [0/1]")
    r.add_argument("--keep-going", action="store_true", help="record unreadable sites as errors and continue")
    r.add_argument("--overwrite", action="store_true", help="redo sites already done")

    m = sub.add_parser("merge", help="join the per-shard summaries")
    m.add_argument("--plate-map", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--allow-partial", action="store_true", help="merge even if some sites are not done")

    e = sub.add_parser("evaluate", help="F1 at IoU 0.5 per site against true labels in the plate map")
    e.add_argument("--plate-map", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--truth-column", default="FileName_Labels")
    e.add_argument("--iou", type=float, default=0.5)

    t = sub.add_parser("train-offline", help="train a small Cellpose model on synthetic slices, no network")
    t.add_argument("--out", required=True, help="model file to write (a .json sidecar goes next to it)")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--gpu", action="store_true")
    return p


def config_from_args(a: argparse.Namespace) -> SegmentConfig:
    nucleus = None if str(a.nucleus).lower() in ("none", "") else a.nucleus
    return SegmentConfig(
        model=a.model, cyto_channel=a.cyto, nucleus_channel=nucleus,
        channel_names=tuple(s.strip() for s in a.channel_names.split(",")), axes=a.axes,
        diameter=a.diameter, do_3d=a.do_3d, stitch_threshold=a.stitch_threshold, anisotropy=a.anisotropy,
        flow_threshold=a.flow_threshold, cellprob_threshold=a.cellprob_threshold, min_size=a.min_size,
        cap_max_slices=a.cap_max_slices, cap_overlap=a.cap_overlap, min_contrast=a.min_contrast, batch_size=a.batch_size,
        tile_size=a.tile_size, diameter_um=a.diameter_um,
    )


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        return shards.parse_shard(text)
    except ValueError as e:
        raise SegmentError(str(e)) from None


def load_offline_module():
    """tools/cellpose_offline.py, loaded from beside this file (tools/ is not a package and
    is not put on sys.path)."""
    import importlib.util

    name = "gradcamo_tools_cellpose_offline"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("cellpose_offline.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def main(argv: list[str] | None = None) -> int:
    a = _build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Plain logging (never cellpose's io.logger_setup, which writes ~/.cellpose/run.log); cellpose
    # logs every slice at INFO, so it is quieted unless asked for.
    logging.getLogger("cellpose").setLevel(logging.INFO if a.verbose else logging.WARNING)
    try:
        if a.command == "run":
            run(a.plate_map, a.out, config_from_args(a), shard=_parse_shard(a.shard), device=a.device,
                threads=a.threads, keep_going=a.keep_going, overwrite=a.overwrite)
        elif a.command == "merge":
            merge(a.plate_map, a.out, allow_partial=a.allow_partial)
        elif a.command == "evaluate":
            table = evaluate(a.plate_map, a.out, truth_column=a.truth_column, threshold=a.iou)
            print(table[["site_id", "n_true", "n_pred", "tp", "fp", "fn", "f1"]].to_string(index=False))
            print(f"mean F1@{a.iou}: {table['f1'].mean():.3f}")
        elif a.command == "train-offline":
            off = load_offline_module()

            logging.getLogger("cellpose.train").setLevel(logging.INFO)  # per-epoch losses

            changes = {k: v for k, v in (("n_epochs", a.epochs), ("seed", a.seed)) if v is not None}
            recipe = dataclasses.replace(off.OfflineRecipe(), **changes)
            path = off.train_offline_model(a.out, recipe, threads=a.threads, gpu=a.gpu)
            print(json.dumps(off.read_offline_meta(path), indent=2))
    except SegmentError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
