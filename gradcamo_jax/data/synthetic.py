"""Synthetic 3D Cell Painting plates with planted signals whose location is known.

`write_plate(config, out_dir)` writes a plate in the input format of DESIGN.md §3:

    out_dir/platemap.csv            one row per site (Metadata_*, FileName_Image, FileName_Labels)
    out_dir/images/<site>.tif       (Z, C, Y, X) uint16, channels `formats.CHANNELS`
    out_dir/labels/<site>_labels.tiff  (Z, Y, X) true labels (FileName_Labels points here)
    out_dir/ground_truth.parquet    one row per cell: site key, Metadata_ObjectNumber,
                                    true class, dose, signal per mode, `marked`, centroid, volume
    out_dir/ground_truth.json       the config, the class table and per-site planted effects

A field is a monolayer of ellipsoidal cells (random size, elongation, orientation,
wobbly outline) packed so that neighbours touch; each has an ellipsoidal nucleus
with nucleoli. Five channels mimic Cell Painting: DNA (chromatin texture in the
nucleus), ER (reticular, perinuclear), RNA (nucleoli + faint cytoplasm), AGP
(membrane rim + oriented actin fibres) and Mito (cytoplasmic puncta). The optics add
a z-elongated Gaussian PSF (intensity falls off over a few slices), uneven
illumination (vignetting + a tilt), autofluorescent background, Poisson shot noise,
Gaussian read noise and a camera offset.

Dose effect. Class k of K+1 (control = 0, doses ascending) has effect
``e = k / K`` in [0, 1]. Where and how e shows is the signal mode, each with a
strength (a mixture is a dict such as ``{"cell": 0.2, "background": 1.0}``):

* ``cell``: every cell's own appearance: in-cell intensity of the channels in
  `cell_channels` scales by ``1 + cell_gain * s * e``, ER spreads from the nuclear
  rim over the cytoplasm, Mito puncta get denser, DNA nuclei larger. The class is
  readable from the cell itself, also after per-site intensity normalisation (which
  removes most of the gain, shared by every cell of a site).
* ``background``: speckled debris/autofluorescence texture of amplitude ∝ s·e,
  added after the PSF and only on voxels outside every cell. Cells are untouched.
* ``neighbor``: in each field a fraction `neighbor_fraction` of cells is *marked*
  and carries the ``cell`` signal (strength s); unmarked cells carry none, so for
  an unmarked cell the class is readable only from its neighbours (the ground
  truth's ``marked`` column says which cells are which).
* ``site``: a batch effect over the whole field, confounded with dose: the
  illumination tilt turns with e, DNA bleeds into the ER channel (fraction ∝ s·e)
  and the field is defocused (extra XY blur ∝ s·e). These survive per-site
  percentile normalisation, unlike a plain gain.

Deterministic: site i draws from ``np.random.default_rng([seed, i])``, files carry
no timestamps, so the same config writes byte-identical files.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from gradcamo_jax.data import formats

SIGNAL_MODES: tuple[str, ...] = ("cell", "background", "neighbor", "site")

PLATE_MAP_NAME = "platemap.csv"
GROUND_TRUTH_TABLE = "ground_truth.parquet"
GROUND_TRUTH_JSON = "ground_truth.json"


def parse_signal(signal: str | Mapping[str, float] | Sequence[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    """Normalise a signal spec to sorted ``((mode, strength), ...)``.

    Accepts a mode name (strength 1), a dict, pairs, or a string like
    ``"cell=0.2,background=1"``. Unknown modes and negative strengths are errors.
    """
    if isinstance(signal, str):
        items = []
        for part in signal.split(","):
            name, _, value = part.strip().partition("=")
            items.append((name.strip(), float(value) if value else 1.0))
    elif isinstance(signal, Mapping):
        items = list(signal.items())
    else:
        items = [tuple(p) for p in signal]
    out: dict[str, float] = {}
    for name, strength in items:
        if name not in SIGNAL_MODES:
            raise ValueError(f"unknown signal mode {name!r}; choose from {SIGNAL_MODES}")
        if float(strength) < 0:
            raise ValueError(f"signal strength for {name!r} must be ≥ 0, got {strength}")
        out[name] = float(strength)
    if not out:
        raise ValueError("empty signal spec")
    return tuple(sorted(out.items()))


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """A synthetic plate. Sizes are voxels; axis order (Z, Y, X).

    Attributes:
      signal: where the dose shows (see module docstring): a mode name, a dict of
        mode → strength, or pairs; stored normalised as sorted pairs.
      doses: treated doses (×), ascending; control (dose 0) is added as class 0.
      treatment, control: Metadata_Treatment of treated and control wells.
      wells_per_dose: wells per class (control included).
      sites_per_well: imaged fields per well.
      plate: Metadata_Plate.
      field_shape: (Z, Y, X) of each site's stack; Z = 1 writes a 2D plate (one plane per
        site, as most of the Cell Painting Gallery), which trains a 2D model.
      cell_radius: mean semi-axes (z, y, x) of a cell.
      radius_jitter: relative s.d. of each cell's semi-axes.
      nucleus_scale: nucleus semi-axes as a fraction of the cell's.
      cells_per_site: target cells per field (fewer when the field is full).
      packing: minimum centre distance as a fraction of the two cells' mean XY
        radius sum; < 1 makes neighbours overlap, and overlaps are split between
        them, so cells touch.
      wobble: amplitude of the low-frequency perturbation of cell outlines.
      empty_sites: number of sites (the last ones of the plate) imaged with no
        cells at all, to exercise empty-site handling downstream.
      cell_channels: channels whose in-cell intensity carries the `cell`/`neighbor` signal.
      cell_gain: relative in-cell intensity increase at full effect and strength 1.
      neighbor_fraction: fraction of cells marked per field in `neighbor` mode.
      background_channels: channels that get the `background` texture.
      background_level: background texture amplitude at full effect (fraction of
        the typical cytoplasm level).
      psf_sigma: Gaussian PSF s.d. (z, y, x); the large z value makes intensity
        fall off over a few slices.
      illumination: depth of the vignetting (0 = flat field).
      photons: expected photon count of a unit-brightness voxel (sets shot noise).
      read_noise: camera read-noise s.d. in counts.
      offset: camera offset in counts.
      autofluorescence: uniform background level relative to unit brightness.
      heterogeneity: log-normal s.d. of per-cell, per-channel brightness, so low
        doses are not trivially separable.
      seed: random seed; equal seeds give byte-identical plates.
    """

    signal: Any = "cell"
    doses: tuple[float, ...] = (0.06, 0.32, 1.6, 8.0, 40.0)
    treatment: str = "compound"
    control: str = "DMSO"
    wells_per_dose: int = 3
    sites_per_well: int = 4
    plate: str = "SYNTH1"
    field_shape: tuple[int, int, int] = (21, 256, 256)
    cell_radius: tuple[float, float, float] = (5.0, 26.0, 26.0)
    radius_jitter: float = 0.15
    nucleus_scale: float = 0.5
    cells_per_site: int = 30
    packing: float = 0.8
    wobble: float = 0.12
    empty_sites: int = 0
    cell_channels: tuple[str, ...] = ("ER", "Mito")
    cell_gain: float = 1.0
    neighbor_fraction: float = 0.5
    background_channels: tuple[str, ...] = ("ER", "RNA", "AGP")
    background_level: float = 0.6
    psf_sigma: tuple[float, float, float] = (1.2, 0.8, 0.8)
    illumination: float = 0.3
    photons: float = 300.0
    read_noise: float = 3.0
    offset: float = 100.0
    autofluorescence: float = 0.04
    heterogeneity: float = 0.2
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "signal", parse_signal(self.signal))
        object.__setattr__(self, "doses", tuple(float(d) for d in self.doses))
        if list(self.doses) != sorted(self.doses) or any(d <= 0 for d in self.doses):
            raise ValueError(f"doses must be positive and ascending, got {self.doses}")
        for name in self.cell_channels + self.background_channels:
            if name not in formats.CHANNELS:
                raise ValueError(f"unknown channel {name!r}; channels are {formats.CHANNELS}")
        if len(self.field_shape) != 3 or min(self.field_shape) < 1:
            raise ValueError(f"field_shape must be (Z, Y, X), got {self.field_shape}")

    @property
    def strengths(self) -> dict[str, float]:
        """Strength per signal mode (0 for modes not in `signal`)."""
        return {m: dict(self.signal).get(m, 0.0) for m in SIGNAL_MODES}

    @property
    def class_doses(self) -> tuple[float, ...]:
        """Dose of each class index: control (0.0) then `doses`."""
        return (0.0,) + self.doses


PRESETS: dict[str, SynthConfig] = {
    # ~300 cells, written in seconds: the CPU demo (crop with 9×48×48; time in BENCHMARKS.md,
    # 'Measurements behind code choices', synthetic.py).
    "demo": SynthConfig(
        wells_per_dose=2, sites_per_well=2, field_shape=(9, 96, 96), cell_radius=(2.5, 11.0, 11.0),
        cells_per_site=20, psf_sigma=(0.8, 0.7, 0.7),
    ),
    # Tests: two doses, one site per well, tiny fields.
    "tiny": SynthConfig(
        doses=(1.6, 40.0), wells_per_dose=1, sites_per_well=1, field_shape=(5, 48, 48),
        cell_radius=(1.6, 7.0, 7.0), cells_per_site=8, psf_sigma=(0.6, 0.6, 0.6),
    ),
    # Paper geometry (21 slices, crops 21×128×128) on modest fields: 72 sites.
    "small": SynthConfig(),
    # A fuller plate: 6 wells per class, 4 sites, 512×512 fields (144 sites, ~17k cells).
    "large": SynthConfig(wells_per_dose=6, field_shape=(21, 512, 512), cells_per_site=120),
}


# ----------------------------------------------------------------------------- layout


def plate_layout(config: SynthConfig) -> pd.DataFrame:
    """The plate map rows (without file names): one per site, wells laid out by class.

    Class k occupies column k + 1; its wells run down rows A, B, … (so wells of one
    dose share a column, as on many screening plates).
    """
    rows = []
    n_rows = config.wells_per_dose
    if n_rows > 16:
        raise ValueError("at most 16 wells per dose (plate rows A–P)")
    for k, dose in enumerate(config.class_doses):
        for j in range(n_rows):
            well = f"{'ABCDEFGHIJKLMNOP'[j]}{k + 1:02d}"
            for s in range(1, config.sites_per_well + 1):
                rows.append({
                    "Metadata_Plate": config.plate,
                    "Metadata_Well": well,
                    "Metadata_Site": s,
                    "Metadata_Treatment": config.control if k == 0 else config.treatment,
                    "Metadata_Dose": dose,
                    "Metadata_TrueClass": k,
                })
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- geometry


def _place_cells(rng: np.random.Generator, config: SynthConfig, n_target: int) -> dict[str, np.ndarray]:
    """Random cell centres (dart throwing with a packing distance) and shapes."""
    zs, ys, xs = config.field_shape
    rz, ry, rx = config.cell_radius
    centres = np.zeros((n_target, 3))
    radii = np.zeros((n_target, 3))
    n = 0
    for _ in range(n_target * 40):
        if n == n_target:
            break
        r = np.array([rz, ry, rx]) * np.exp(config.radius_jitter * rng.standard_normal(3))
        c = np.array([(zs - 1) / 2 + rng.normal(0, 0.1 * zs), rng.uniform(0, ys - 1), rng.uniform(0, xs - 1)])
        # Minimum distance: `packing` × the sum of the two cells' mean XY semi-axes.
        d = np.hypot(centres[:n, 1] - c[1], centres[:n, 2] - c[2])
        if np.all(d >= config.packing * ((r[1] + r[2]) / 2 + radii[:n, 1:].mean(axis=1))):
            centres[n], radii[n] = c, r
            n += 1
    centres, radii = centres[:n], radii[:n]
    n = len(centres)
    return {
        "centre": np.array(centres, np.float64).reshape(n, 3),
        "radius": np.array(radii, np.float64).reshape(n, 3),
        "angle": rng.uniform(0, np.pi, n),
        # The nucleus sits off-centre in the cell, as in spread cells.
        "nuc_offset": rng.uniform(-0.2, 0.2, (n, 2)),
    }


def _smooth_noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit s.d. (float32)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return f / max(float(f.std()), 1e-6)


def render_labels(config: SynthConfig, cells: dict[str, np.ndarray], wobble: np.ndarray, nucleus_gain: np.ndarray):
    """Label volume and per-voxel geometry of a field.

    Each voxel goes to the cell with the smallest normalised ellipsoid distance
    (< 1), so overlapping neighbours split their overlap and touch.

    Returns (labels int32 (Z, Y, X), dist float32 (Z, Y, X) normalised distance to
    the own cell centre (inf outside), nucleus bool, nucleoli bool).
    """
    shape = config.field_shape
    labels = np.zeros(shape, np.int32)
    best = np.full(shape, np.inf, np.float32)
    nucleus = np.zeros(shape, bool)
    nuc_best = np.full(shape, np.inf, np.float32)
    for i, (c, r, a, off) in enumerate(zip(cells["centre"], cells["radius"], cells["angle"], cells["nuc_offset"])):
        lo = np.maximum(np.floor(c - 1.3 * r).astype(int), 0)
        hi = np.minimum(np.ceil(c + 1.3 * r).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        z, y, x = np.ogrid[sl]
        dz, dy, dx = (z - c[0]) / r[0], y - c[1], x - c[2]
        u = (np.cos(a) * dy + np.sin(a) * dx) / r[1]
        v = (-np.sin(a) * dy + np.cos(a) * dx) / r[2]
        d = np.sqrt(dz**2 + u**2 + v**2) * (1 + config.wobble * wobble[sl])
        # Nucleus: an ellipsoid around an offset centre, in the cell's own frame.
        ns = config.nucleus_scale * nucleus_gain[i]
        dn = np.sqrt((dz / ns) ** 2 + ((u - off[0]) / ns) ** 2 + ((v - off[1]) / ns) ** 2)
        win = (d < 1) & (d < best[sl])
        labels[sl][win] = i + 1
        best[sl][win] = d[win]
        nuc_here = win & (dn < 1)
        nucleus[sl][win] = nuc_here[win]
        nuc_best[sl][win] = dn[win]
    return labels, best, nucleus, nuc_best


# ----------------------------------------------------------------------------- one site


def synth_site(config: SynthConfig, class_index: int, site_index: int, empty: bool = False):
    """Render one site.

    Returns (stack uint16 (Z, C, Y, X), labels int32 (Z, Y, X), cells DataFrame
    (one row per label id present), effects dict of the planted site-level values).
    """
    rng = np.random.default_rng([config.seed, site_index])
    shape = config.field_shape
    K = len(config.doses)
    e = class_index / K
    st = config.strengths
    ch = {name: i for i, name in enumerate(formats.CHANNELS)}

    cells = _place_cells(rng, config, 0 if empty else config.cells_per_site)
    n = len(cells["centre"])
    marked = rng.uniform(size=n) < config.neighbor_fraction
    # Per-cell signal amplitude: every cell in `cell` mode, marked ones in `neighbor` mode.
    amp = st["cell"] * e + st["neighbor"] * e * marked
    def channel_amp(name):  # the signal amplitude per cell where `name` carries the cell signal
        return amp if name in config.cell_channels else np.zeros(n)

    # DNA in cell_channels also enlarges nuclei (a morphology change, not only intensity).
    nucleus_gain = 1 + 0.25 * channel_amp("DNA")
    wobble = _smooth_noise(rng, shape, (1.0, 4.0, 4.0))
    labels, dist, nucleus, dnuc = render_labels(config, cells, wobble, nucleus_gain)
    inside = labels > 0
    cyto = inside & ~nucleus

    # Per-cell, per-channel brightness, indexed by label (index 0 = outside).
    bright = np.exp(config.heterogeneity * rng.standard_normal((n + 1, len(formats.CHANNELS)))).astype(np.float32)
    for name in config.cell_channels:
        bright[1:, ch[name]] *= 1 + config.cell_gain * amp
    bright[0] = 0
    b = lambda name: bright[:, ch[name]][labels]  # noqa: E731  (Z, Y, X) brightness of each voxel's cell

    fine = _smooth_noise(rng, shape, (0.5, 0.8, 0.8))
    coarse = _smooth_noise(rng, shape, (0.8, 2.0, 2.0))
    # Nucleoli: bright spots where fine texture peaks deep inside the nucleus.
    nucleoli = nucleus & (dnuc < 0.6) & (coarse > 1.2)
    stack = np.empty((len(formats.CHANNELS),) + shape, np.float32)
    stack[ch["DNA"]] = nucleus * b("DNA") * (1.0 + 0.35 * fine)
    perinuclear = np.clip(1.3 - np.minimum(dist, 1.5), 0.2, 1.0)
    # The signal also spreads ER from the perinuclear region into the whole cytoplasm: a
    # redistribution, which survives per-site percentile normalisation (a field-wide gain
    # does not: every cell of a site shares its dose, so the gain rescales away).
    spread = np.clip(np.concatenate([[0.0], 0.8 * channel_amp("ER")]), 0, 1)[labels]
    perinuclear = perinuclear + spread * (1.0 - perinuclear)
    stack[ch["ER"]] = cyto * b("ER") * perinuclear * np.clip(0.6 + 0.5 * np.abs(coarse), 0, None)
    stack[ch["RNA"]] = b("RNA") * (0.25 * cyto + 0.3 * nucleus + 1.5 * nucleoli)
    # AGP: membrane rim plus actin fibres along each cell's orientation.
    angle = np.concatenate([[0.0], cells["angle"]])[labels]
    zz, yy, xx = np.indices(shape, sparse=True)
    fibres = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * yy + np.sin(angle) * xx) / 4.0)
    rim = inside & (dist > 0.8)
    stack[ch["AGP"]] = b("AGP") * (1.0 * rim + 0.3 * cyto * fibres)
    # Mito: puncta where texture exceeds a threshold that drops with the signal (denser).
    thr = np.concatenate([[np.inf], 1.0 - 0.6 * channel_amp("Mito")])[labels]
    stack[ch["Mito"]] = cyto * b("Mito") * (fine > thr) * (0.6 + 0.4 * np.abs(fine))
    np.clip(stack, 0, None, out=stack)

    # Site batch effect: DNA bleed-through into ER, defocus, turning illumination tilt.
    s_site = st["site"] * e
    stack[ch["ER"]] += 0.3 * s_site * stack[ch["DNA"]]
    psf = np.array(config.psf_sigma) + np.array([0.0, 1.0, 1.0]) * 2.0 * s_site
    for c in range(stack.shape[0]):
        stack[c] = ndimage.gaussian_filter(stack[c], psf, mode="constant")

    # Background texture: speckle outside every cell, after the PSF so no cell voxel gets any.
    s_bg = st["background"] * e
    if s_bg > 0:
        speckle = np.clip(_smooth_noise(rng, shape, (0.7, 1.2, 1.2)) - 0.8, 0, None)
        for name in config.background_channels:
            stack[ch[name]] += (~inside) * (config.background_level * s_bg) * speckle

    # Optics: vignetting and a tilt whose direction turns with the site effect.
    yc = (np.arange(shape[1]) - (shape[1] - 1) / 2) / max(shape[1] / 2, 1)
    xc = (np.arange(shape[2]) - (shape[2] - 1) / 2) / max(shape[2] / 2, 1)
    r2 = yc[:, None] ** 2 + xc[None, :] ** 2
    tilt_dir = rng.uniform(0, 2 * np.pi) if s_site == 0 else np.pi * e
    tilt_amp = 0.1 + 0.3 * s_site
    illum = (1 - config.illumination * r2 / 2) * (
        1 + tilt_amp * (np.cos(tilt_dir) * yc[:, None] + np.sin(tilt_dir) * xc[None, :])
    )
    expected = (stack + config.autofluorescence) * illum.astype(np.float32)
    counts = rng.poisson(np.clip(expected, 0, None) * config.photons).astype(np.float32)
    counts += config.offset + config.read_noise * rng.standard_normal(counts.shape).astype(np.float32)
    # Rendered channel-first for per-channel filtering; files are ZCYX.
    out = np.clip(np.round(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16).transpose(1, 0, 2, 3)
    out = np.ascontiguousarray(out)

    ids = np.arange(1, n + 1)
    present = np.bincount(labels.ravel(), minlength=n + 1)[1:] > 0
    com = ndimage.center_of_mass(np.ones(shape), labels, ids[present]) if present.any() else []
    table = pd.DataFrame({
        "Metadata_ObjectNumber": ids[present].astype(np.int64),
        "TrueClass": np.int64(class_index),
        "Marked": marked[present],
        "Signal_Cell": np.float64(st["cell"] * e),
        "Signal_Neighbor": (st["neighbor"] * e * marked[present]).astype(np.float64),
        "Signal_Background": np.float64(s_bg),
        "Signal_Site": np.float64(s_site),
        "Centroid_Z": [c[0] for c in com],
        "Centroid_Y": [c[1] for c in com],
        "Centroid_X": [c[2] for c in com],
        "Volume": np.bincount(labels.ravel(), minlength=n + 1)[1:][present].astype(np.int64),
    })
    # Ids stay 1..n with gaps where a cell lost all voxels to its neighbours; renumber
    # so label ids are consecutive, as segmentation tools produce them.
    remap = np.zeros(n + 1, np.int32)
    remap[ids[present]] = np.arange(1, present.sum() + 1)
    labels = remap[labels]
    table["Metadata_ObjectNumber"] = np.arange(1, len(table) + 1, dtype=np.int64)
    effects = {"tilt_direction": float(tilt_dir), "tilt_amplitude": float(tilt_amp),
               "bleed_DNA_to_ER": 0.3 * s_site, "extra_blur_xy": 2.0 * s_site,
               "background_amplitude": config.background_level * s_bg, "n_cells": int(len(table))}
    return out, labels, table, effects


# ----------------------------------------------------------------------------- plate


def write_plate(config: SynthConfig, out_dir: str | os.PathLike) -> Path:
    """Write the plate to `out_dir` (see module docstring); returns the plate map's path.

    Sites are written one at a time, each file atomically; the plate map is written
    last, so its presence means the plate is complete.
    """
    out = Path(out_dir)
    layout = plate_layout(config)
    n_sites = len(layout)
    empty_from = n_sites - config.empty_sites
    image_names, label_names, tables, site_effects = [], [], [], {}
    for i, row in enumerate(layout.itertuples(index=False)):
        sid = formats.site_id(row.Metadata_Plate, row.Metadata_Well, row.Metadata_Site)
        stack, labels, table, effects = synth_site(config, row.Metadata_TrueClass, i, empty=i >= empty_from)
        image_names.append(f"images/{sid}.tif")
        label_names.append(f"labels/{formats.labels_name(sid)}")
        formats.write_stack(out / image_names[-1], stack, formats.CHANNELS)
        formats.write_labels(out / label_names[-1], labels)
        for col in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Treatment", "Metadata_Dose"):
            table.insert(0 if col == "Metadata_Plate" else table.columns.get_loc("Metadata_ObjectNumber"),
                         col, getattr(row, col))
        tables.append(table)
        site_effects[sid] = effects
    plate_map = layout.assign(FileName_Image=image_names, FileName_Labels=label_names)
    truth = pd.concat(tables, ignore_index=True)
    formats.write_table(truth, out / GROUND_TRUTH_TABLE)
    formats.write_json({
        "config": _config_dict(config),
        "classes": [{"index": k, "dose": d, "treatment": config.control if k == 0 else config.treatment}
                    for k, d in enumerate(config.class_doses)],
        "sites": site_effects,
    }, out / GROUND_TRUTH_JSON)
    return formats.write_plate_map(plate_map, out / PLATE_MAP_NAME)


def _config_dict(config: SynthConfig) -> dict:
    d = dataclasses.asdict(config)
    d["signal"] = dict(config.signal)
    return d


def make_config(preset: str = "demo", **overrides) -> SynthConfig:
    """A preset (`PRESETS`) with fields replaced; ``signal`` may be any `parse_signal` spec."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
