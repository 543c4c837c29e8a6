"""Bulk scoring: a cell dataset through one jitted `explain` pass per batch, to Parquet profiles.

Output folder (``out_dir``)::

    manifest.json              what was scored with what (checked on resume)
    part-00000.parquet …       one shard per `ScoreConfig.rows_per_shard` cells, in row order
    cams/part-00000.zarr …     optional CAM volumes of the sampled cells of that shard

Each part is written atomically (temporary sibling → rename), and a part that exists
is complete, so a killed run restarted with the same arguments skips finished parts
and redoes only the interrupted one: no cell is duplicated or dropped. Memory is one
shard's scalars and pooled features plus a few batches of crops in flight, whatever
the number of cells.

Columns of every part (pycytominer reads everything not starting with ``Metadata_``
as a feature):

* every ``Metadata_*`` column of the cell table (``Metadata_Row`` = row in crops.zarr);
* ``Metadata_GradCAMO`` (cell), ``Metadata_GradCAMO_Neighbors``,
  ``Metadata_GradCAMO_Background``, ``Metadata_GradCAMO_Chance``,
  ``Metadata_GradCAMO_Undefined`` (True where the map sums to 0: scores are NaN);
* ``Metadata_Target`` (the explained class), ``Metadata_Predicted``,
  ``Metadata_Prob_<k>`` (softmax probability of class k);
* features ``<Model>_<layer>_<i>``, e.g. ``EfficientNetB0_stage5_0042``: the spatial
  mean of that layer's activation, for every layer of `ScoreConfig.feature_layers`.

Across hosts, two ways that combine (`assigned_parts`): job-array shards (``shard=(I, N)``,
``gradcamo score --shard I/N``: job I scores parts k with ``k % N == I``, no `jax.distributed`
needed) and the processes of one `jax.distributed` job (process p of P takes every P-th part
of its shard). Cells are independent, so hosts never communicate. Within a process a batch
is split over the local devices (``P("data")`` on a local mesh). When every job is done,
`verify_profiles` (``gradcamo score --merge``) checks that each part is present and holds
exactly its rows, once, and writes ``complete.json``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from gradcamo_jax.cam import make_explain_fn
from gradcamo_jax.config import STAGE_NAMES, DataConfig, ModelConfig
from gradcamo_jax.data import formats, shards
from gradcamo_jax.metric import SCORE_COLUMNS
from gradcamo_jax.models.efficientnet import EfficientNet, layer_index, layer_shapes
from gradcamo_jax.sharding import batch_sharding, make_mesh

MANIFEST = "manifest.json"
COMPLETE = "complete.json"
PART = "part-{:05d}.parquet"
CAM_DIR = "cams"


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """What `score_dataset` computes and how it batches.

    Attributes:
      layer: the named activation Grad-CAM explains (`gradcamo_jax.STAGE_NAMES`), or "auto":
        `default_layer` of the model and the crop.
      method: CAM method, a key of `gradcamo_jax.CAM_METHODS`.
      feature_layers: layers whose spatially pooled activations become feature
        columns; () = `layer` only.
      batch_size: cells per jitted call (rounded up to a multiple of the local device count).
      rows_per_shard: cells per output part; a killed run loses at most one part's work.
        Part boundaries are fixed by this value, so a resume must use the same one.
      cam_sample: number of cells whose CAM volumes (float16) are saved for audits,
        spread evenly over the dataset (0 = none).
      prefetch: batches read from the crop store ahead of the device (threads).
      audit: also write the audit columns per cell (`gradcamo_jax.audit`): counterfactual
        drops of the target log-probability for each region (background, neighbours, cell,
        context) replaced by each of `audit_fills`, the context-reliance index, and the
        Grad-CAMO of the same architecture with random weights (BatchNorm calibrated on the
        dataset's first 64 crops) with the corrected score. Costs one forward per variant.
      audit_fills: fills of the counterfactuals (`audit.FILLS` except "swap").
      audit_swap_donors: with `audit`, also the interchange columns (`audit.interchange`): each
        cell's context and its cell swapped with this many donors per class, donors being the
        cells the model predicts most confidently as that class among `audit_swap_pool` cells
        spread evenly over the dataset (`swap_pool`). 0 = none. Costs ``3 · K · audit_swap_donors``
        forwards per cell (K classes). The audit study's setting is 2 (experiments/README.md).
      audit_swap_pool: cells sampled evenly over the dataset to choose the donors from.
      audit_seed: seed of the fills' noise (per cell: folded with the cell's row, so values do
        not depend on batching or sharding) and of the random model.
      allow_coarse_layer: score even when the layer's map is too coarse to tell the cell from
        its surroundings (`check_layer_resolution`); the scores then mostly restate the
        cell's volume fraction.
    """

    layer: str = "auto"
    method: str = "gradcam"
    feature_layers: tuple[str, ...] = ()
    batch_size: int = 32
    rows_per_shard: int = 4096
    cam_sample: int = 0
    prefetch: int = 2
    allow_coarse_layer: bool = False
    audit: bool = False
    audit_fills: tuple[str, ...] = ("noise", "blur")
    audit_seed: int = 0
    audit_swap_donors: int = 2
    audit_swap_pool: int = 256

    def __post_init__(self):
        if self.audit and (not self.audit_fills or "swap" in self.audit_fills):
            raise ValueError(f"ScoreConfig.audit_fills={self.audit_fills}: name fills among noise, blur, mean")
        if self.audit:
            self.reliance_settings  # noqa: B018  (checks the fill names now, not at the first batch)
        for name in ((self.layer,) if self.layer != "auto" else ()) + tuple(self.feature_layers):
            layer_index(name)
        if self.audit_swap_donors < 0 or self.audit_swap_pool < 1:
            raise ValueError(f"ScoreConfig.audit_swap_donors={self.audit_swap_donors} must be >= 0 and "
                             f"audit_swap_pool={self.audit_swap_pool} >= 1")
        if self.batch_size < 1 or self.rows_per_shard < 1 or self.cam_sample < 0:
            raise ValueError(f"ScoreConfig: batch_size, rows_per_shard must be >= 1 and cam_sample >= 0, got {self}")

    @property
    def layers(self) -> tuple[str, ...]:
        return self.feature_layers or (self.layer,)

    @property
    def reliance_settings(self):
        """The `audit.RelianceSettings` of ``--audit``: every region, `audit_fills`, the index from
        the noise fill (else the first fill)."""
        from gradcamo_jax import audit

        fills = tuple(self.audit_fills)
        return audit.RelianceSettings(fills=fills, cri_fill="noise" if "noise" in fills else fills[0])


MIN_MAP_YX = 4
"""A CAM layer must have at least this many voxels along Y and X: with fewer, the upsampled
map cannot put the central cell and its surroundings in different voxels, and Grad-CAMO
only restates the cell's volume fraction (`gradcamo score` refuses unless forced)."""

AUTO_MIN_MAP_YX = 8
"""`default_layer` picks the deepest layer whose map has at least this many voxels along Y and X."""


def default_layer(config: ModelConfig, spatial: tuple[int, ...]) -> str:
    """The layer `ScoreConfig(layer="auto")` explains for crops of `spatial` (as the model sees
    them): the deepest named layer whose map keeps ≥ `AUTO_MIN_MAP_YX` voxels along Y and X
    (deeper layers are more class-specific), else the finest ("stem")."""
    shapes = layer_shapes(config, spatial)
    ok = [name for name in STAGE_NAMES if min(shapes[name][-2:]) >= AUTO_MIN_MAP_YX]
    return ok[-1] if ok else "stem"


def check_layer_resolution(config: ModelConfig, spatial: tuple[int, ...], layer: str, allow: bool = False) -> tuple[int, ...]:
    """The layer's map shape for crops of `spatial`; ValueError (unless `allow`) when it has fewer
    than `MIN_MAP_YX` voxels along Y or X, naming the layers that would do."""
    shapes = layer_shapes(config, spatial)
    shape = shapes[layer]
    if min(shape[-2:]) < MIN_MAP_YX and not allow:
        fine = [n for n in STAGE_NAMES if min(shapes[n][-2:]) >= MIN_MAP_YX]
        raise ValueError(
            f"layer {layer!r} gives a {'×'.join(map(str, shape))} map on {'×'.join(map(str, spatial))} crops: too coarse "
            f"to tell the cell from its surroundings (Grad-CAMO would restate the cell's volume fraction). Use a "
            f"finer layer ({', '.join(fine) or 'none fits: use bigger crops'}; 'auto' picks {default_layer(config, spatial)!r}) "
            "or force it with --allow-coarse-layer"
        )
    return shape


def model_tag(config: ModelConfig) -> str:
    """``EfficientNetB0`` for variant b0 (feature column prefix)."""
    return f"EfficientNet{config.variant.upper() if config.variant != 'tiny' else 'Tiny'}"


def feature_names(config: ModelConfig, layer: str, n: int) -> list[str]:
    return [f"{model_tag(config)}_{layer}_{i:04d}" for i in range(n)]


def _fingerprint(cells: pd.DataFrame, variables) -> dict:
    """Identifies the dataset and the weights, so a resume into the wrong folder fails loudly."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(variables):
        h.update(np.asarray(leaf).tobytes())
    key_cols = [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber") if c in cells]
    rows = hashlib.sha256(pd.util.hash_pandas_object(cells[key_cols], index=False).values.tobytes()).hexdigest()
    return {"n_cells": int(len(cells)), "cells_sha256": rows, "weights_sha256": h.hexdigest()}


def cam_rows(n: int, k: int) -> np.ndarray:
    """``k`` row indices spread evenly over ``n`` cells (deterministic)."""
    if k <= 0 or n == 0:
        return np.zeros((0,), np.int64)
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(np.int64))


def _read_rows(store, index, crop_shape=None, downsample=(1, 1, 1), spatial_dims: int = 3
               ) -> tuple[np.ndarray, np.ndarray]:
    """Images float32 and masks of the store rows `index` (a slice or row numbers) as the model
    sees them: the training run's centre crop and binning per cell, then `pipeline.to_model_axes`."""
    from gradcamo_jax.data.pipeline import centre_crop_and_bin, to_model_axes

    images, masks = store.image[index].astype(np.float32), store.mask[index]
    if crop_shape is not None or tuple(downsample) != (1, 1, 1):
        pairs = [centre_crop_and_bin(i, m, crop_shape, downsample) for i, m in zip(images, masks)]
        images = np.stack([p[0] for p in pairs]).astype(np.float32)
        masks = np.stack([p[1] for p in pairs])
    return to_model_axes(images, masks, spatial_dims)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax ``(N, K)`` of host logits."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _batches(store, start: int, stop: int, batch: int, prefetch: int, crop_shape=None, downsample=(1, 1, 1),
             spatial_dims: int = 3) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, images (b, Z, Y, X, C) float32, masks (b, Z, Y, X)) for rows [start, stop),
    read ahead in threads (zarr decoding releases the GIL), with the training run's centre
    crop and binning applied per cell; for a 2D model (`spatial_dims` 2) images (b, Y, X, C)
    and masks (b, Y, X) (`pipeline.to_model_axes`, as in training)."""
    starts = list(range(start, stop, batch))

    def read(s):
        return (s, *_read_rows(store, slice(s, min(s + batch, stop)), crop_shape, downsample, spatial_dims))

    with concurrent.futures.ThreadPoolExecutor(max(1, prefetch)) as pool:
        pending = [pool.submit(read, s) for s in starts[: prefetch + 1]]
        nxt = len(pending)
        while pending:
            item = pending.pop(0).result()
            if nxt < len(starts):
                pending.append(pool.submit(read, starts[nxt]))
                nxt += 1
            yield item


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    if len(a) == n:
        return a
    return np.concatenate([a, np.zeros((n - len(a), *a.shape[1:]), a.dtype)])


def score_part(model: EfficientNet, variables, store, cells: pd.DataFrame, rows: tuple[int, int], config: ScoreConfig,
               *, crop_shape=None, downsample=(1, 1, 1), on_batch=None, random_variables=None,
               context_remedy: str = "none", context_factor: float = 0.25, swap_pool: SwapPool | None = None
               ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Score rows ``[rows[0], rows[1])`` of the dataset, each crop centre-cropped to `crop_shape`
    and binned by `downsample` as the model was trained (`DataConfig` fields of those names),
    then given the run's context transform (`pipeline.context_transform` of `context_remedy`,
    `context_factor`: "mask" and "attenuate" change what the model sees; the audit's fills act
    on the crop before the transform, as the model's input would be).

    `swap_pool`: the donors of the interchange columns (`swap_pool`), with `config.audit`.

    Returns ``(table, cam_rows, cams)``: the part's profile table; the sampled rows of this
    part and their CAM volumes ``(M, Z, Y, X)`` float16 (``(M, Y, X)`` for a 2D model; M may be 0).
    """
    from gradcamo_jax.data.pipeline import INFERENCE_REMEDIES, context_transform

    mesh = make_mesh(jax.local_devices())
    ndev = mesh.devices.size
    batch = -(-config.batch_size // ndev) * ndev
    sharding = batch_sharding(mesh)
    sampled = cam_rows(len(cells), config.cam_sample)
    sampled = sampled[(sampled >= rows[0]) & (sampled < rows[1])]
    fn = make_explain_fn(model, config.layer, config.method, feature_layers=config.layers,
                         return_cam=len(sampled) > 0, with_masks=True, resize=True)
    targets = jax.device_put(np.full((batch,), -1, np.int32), sharding)
    cols: dict[str, list[np.ndarray]] = {}
    cams, cam_idx = [], []
    for first, images, masks in _batches(store, rows[0], rows[1], batch, config.prefetch, crop_shape, downsample,
                                         model.config.spatial_dims):
        n = len(images)
        if not np.isfinite(images).all():
            bad = first + int(np.flatnonzero(~np.isfinite(images).reshape(n, -1).all(axis=1))[0])
            c = cells.iloc[bad]
            raise ValueError(
                f"crop row {bad} ({c.get('Metadata_Plate')}/{c.get('Metadata_Well')}/site {c.get('Metadata_Site')}, "
                f"object {c.get('Metadata_ObjectNumber')}) has NaN/inf pixels; re-crop that site or drop the cell"
            )
        x = jax.device_put(_pad(images, batch), sharding)
        m = jax.device_put(_pad(masks, batch), sharding)
        x_raw = x
        if context_remedy in INFERENCE_REMEDIES:
            x = jax.device_put(_pad(context_transform(images, masks, context_remedy, context_factor), batch), sharding)
        out_dev = fn(variables, x, m, targets)
        out = jax.device_get(out_dev)
        s = out.scores
        logits = out.logits[:n]
        probs = _softmax(logits)
        got = {
            SCORE_COLUMNS["cell"]: s.cell[:n],
            SCORE_COLUMNS["neighbors"]: s.neighbors[:n],
            SCORE_COLUMNS["background"]: s.background[:n],
            SCORE_COLUMNS["chance"]: s.chance[:n],
            "Metadata_GradCAMO_Undefined": s.cam_zero[:n],
            "Metadata_Target": out.targets[:n],
            "Metadata_Predicted": logits.argmax(axis=1),
            "__probs": probs,
        }
        for layer in config.layers:
            got[f"__feat_{layer}"] = out.features[layer][:n]
        if config.audit:
            got.update(_audit_columns(model, variables, random_variables, fn, x, m, out_dev.targets, s.cell[:n], first,
                                      config, n, x_raw=x_raw, context_remedy=context_remedy,
                                      context_factor=context_factor, swap_pool=swap_pool, sharding=sharding))
        for k, v in got.items():
            cols.setdefault(k, []).append(np.asarray(v))
        if out.cam is not None:
            sel = sampled[(sampled >= first) & (sampled < first + n)]
            if len(sel):
                cams.append(np.asarray(out.cam[sel - first], np.float16))
                cam_idx.append(sel)
        if on_batch is not None:
            on_batch(n)
    meta = cells.iloc[rows[0] : rows[1]]
    meta = meta[[c for c in meta.columns if c.startswith("Metadata_")]].reset_index(drop=True)
    data = {k: np.concatenate(v) for k, v in cols.items()}
    probs = data.pop("__probs")
    extra = {k: v for k, v in data.items() if not k.startswith("__feat_")}
    extra.update({f"Metadata_Prob_{k}": probs[:, k] for k in range(probs.shape[1])})
    frames = [meta, pd.DataFrame(extra)]
    for layer in config.layers:
        f = data[f"__feat_{layer}"]
        frames.append(pd.DataFrame(f.astype(np.float32), columns=feature_names(model.config, layer, f.shape[1])))
    table = pd.concat(frames, axis=1)
    cam_arr = np.concatenate(cams) if cams else np.zeros((0, 0, 0, 0), np.float16)
    return table, (np.concatenate(cam_idx) if cam_idx else np.zeros((0,), np.int64)), cam_arr


def _audit_columns(model, variables, random_variables, fn, x, m, targets, trained, first: int, config: ScoreConfig,
                   n: int, *, x_raw=None, context_remedy: str = "none", context_factor: float = 0.25,
                   swap_pool: SwapPool | None = None, sharding=None) -> dict:
    """The audit's per-cell columns for one padded batch (rows ``first …``); see `ScoreConfig.audit`.
    `x` is what the model saw; with an inference remedy the fills act on `x_raw` (the crop
    before the transform) and the transform runs after them (`remedy_logits`)."""
    from gradcamo_jax import audit
    from gradcamo_jax.data.pipeline import INFERENCE_REMEDIES

    keys = audit.cell_keys(jax.random.key(config.audit_seed), np.arange(first, first + x.shape[0]))
    if context_remedy in INFERENCE_REMEDIES:
        logits_fn, crops = remedy_logits(model, variables, context_remedy, context_factor), x_raw
    else:
        logits_fn, crops = audit.efficientnet_logits(model, variables), x
    res = jax.device_get(audit.reliance_batch(logits_fn, crops, m, keys, targets, settings=config.reliance_settings))
    cols = {"Metadata_Audit_LogP": res.logp0[:n]}
    for i, region in enumerate(res.regions):
        for j, fill in enumerate(res.fills):
            cols[f"Metadata_Audit_Drop_{region.capitalize()}_{fill.capitalize()}"] = res.drops[:n, i, j]
    cols["Metadata_Audit_ContextReliance"] = res.cri[:n]
    cols["Metadata_Audit_ContextReliance_Undefined"] = res.cri_undefined[:n]
    if swap_pool is not None:
        idx = swap_pool.donor_index(np.arange(first, first + crops.shape[0]))
        donors, donor_masks = swap_pool.images[idx], swap_pool.masks[idx]
        if sharding is not None:
            donors, donor_masks = jax.device_put(donors, sharding), jax.device_put(donor_masks, sharding)
        sw = jax.device_get(audit.interchange_batch(logits_fn, crops, m, donors, donor_masks))
        cols["Metadata_Audit_FollowContext"] = sw.follow_context[:n]
        cols["Metadata_Audit_FollowCell"] = sw.follow_cell[:n]
        cols["Metadata_Audit_InterchangeIndex"] = sw.index[:n]
        cols["Metadata_Audit_InterchangeDonors"] = sw.valid[:n].sum(axis=1)
    # The random model explains the trained model's class, so the two maps differ only in the
    # weights. Only its scores come back to the host (not its features and CAM volumes).
    rand = np.asarray(fn(random_variables, x, m, targets).scores.cell)[:n]
    corrected, _ = audit.corrected_gradcamo(trained, rand)
    cols["Metadata_GradCAMO_Random"] = rand
    cols["Metadata_GradCAMO_Corrected"] = np.asarray(corrected)
    return cols


@dataclasses.dataclass(frozen=True)
class _RemedyLogits:
    # Hashable by value, so every Partial of the same model and remedy shares one compiled core.
    model: EfficientNet
    remedy: str
    factor: float

    def __call__(self, variables, images, masks):
        from gradcamo_jax.data.pipeline import context_transform

        return self.model.apply(variables, context_transform(images, masks, self.remedy, self.factor), train=False)


def remedy_logits(model: EfficientNet, variables, remedy: str = "none", factor: float = 0.25):
    """``logits_fn`` for `gradcamo_jax.audit.reliance` of a model trained with a context remedy:
    ``(images (B, *S, C), masks (B, *S)) -> (B, K)`` logits of the crops after `pipeline.context_transform`
    (BatchNorm in inference mode). The audit's fills replace a region of the crop as
    stored; the transform then runs as it does on every input of that model, so a "mask"
    model's context drops are exactly 0. Remedy "none"/"randomize":
    `audit.efficientnet_logits` (no transform)."""
    from jax.tree_util import Partial

    from gradcamo_jax import audit
    from gradcamo_jax.data.pipeline import INFERENCE_REMEDIES

    if remedy not in INFERENCE_REMEDIES:
        return audit.efficientnet_logits(model, variables)
    return Partial(_RemedyLogits(model, remedy, float(factor)), variables)


SWAP_POOL_PER_CLASS = 8
"""Donor cells kept per predicted class (the most confident of the sampled pool)."""
SWAP_POOL_FILE = "swap_pool.json"
"""The interchange donors of a profile folder (`SwapPool.describe`)."""


@dataclasses.dataclass(frozen=True)
class SwapPool:
    """Donor crops of the interchange columns, grouped by the class the model predicts.

    Attributes:
      rows: ``(P,)`` dataset rows of the donors.
      images: ``(P, *S, C)`` their crops as the model's input is made (before any context
        remedy, which the audit's ``logits_fn`` applies); masks: ``(P, *S)`` codes.
      predicted: ``(P,)`` predicted class; prob: ``(P,)`` its probability.
      groups: one array of pool indices per class (most confident first; may be empty).
      per_class: donors per class and cell; seed: dealing seed.
    """

    rows: np.ndarray
    images: np.ndarray
    masks: np.ndarray
    predicted: np.ndarray
    prob: np.ndarray
    groups: tuple[np.ndarray, ...]
    per_class: int
    seed: int

    def donor_index(self, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), K · per_class)`` pool indices: for dataset row r, `per_class` donors of
        each class k, dealt by r from a seeded permutation of the class's group, so a cell's
        donors depend on its row only (not on batching, sharding or a resumed run). A class
        the model predicted for no pool cell takes donors from the whole pool (pairs of the
        cell's own class are then left out by `audit.interchange`)."""
        rows = np.asarray(rows, np.int64)
        rng = np.random.default_rng([self.seed, 31])
        everyone = np.arange(len(self.rows))
        cols = []
        for group in self.groups:
            g = group if len(group) else everyone
            perm = g[rng.permutation(len(g))]
            slots = rows[:, None] * self.per_class + np.arange(self.per_class)[None, :]
            cols.append(perm[slots % len(g)])
        return np.concatenate(cols, axis=1)

    def describe(self) -> dict:
        """The pool as JSON: donor rows, their predicted class and its probability, donors per class."""
        return {"rows": [int(r) for r in self.rows], "predicted": [int(p) for p in self.predicted],
                "probability": [float(p) for p in self.prob], "per_class": self.per_class, "seed": self.seed}


@jax.jit
def _pool_logits(fn, images, masks):
    # `fn` is a Partial: its arrays (the variables) are traced, not baked in as constants.
    return fn(images, masks)


def swap_pool(logits_fn, store, n_cells: int, config: ScoreConfig, num_classes: int, *, crop_shape=None,
              downsample=(1, 1, 1), spatial_dims: int = 3) -> SwapPool:
    """Choose the interchange donors: `config.audit_swap_pool` rows spread evenly over the
    dataset, predicted by ``logits_fn`` (``(images, masks) -> logits``, as the audit's); per
    predicted class the `SWAP_POOL_PER_CLASS` most confident (ties: lower row first)."""
    from gradcamo_jax import audit

    rows = np.unique(np.linspace(0, n_cells - 1, min(config.audit_swap_pool, n_cells)).round().astype(np.int64))
    images, masks = _read_rows(store, rows, crop_shape, downsample, spatial_dims)
    fn = audit._as_partial(logits_fn)
    b = max(1, config.batch_size)
    logits = np.concatenate([np.asarray(_pool_logits(fn, _pad(images[s:s + b], b), _pad(masks[s:s + b], b)),
                                        np.float64)[:len(images[s:s + b])] for s in range(0, len(images), b)])
    prob = _softmax(logits)
    predicted = prob.argmax(axis=1)
    top = prob.max(axis=1)
    keep = []
    for k in range(num_classes):
        members = np.flatnonzero(predicted == k)
        keep.append(members[np.lexsort((rows[members], -top[members]))][:SWAP_POOL_PER_CLASS])
    kept = np.concatenate(keep)
    offset = np.cumsum([0] + [len(g) for g in keep])
    groups = tuple(np.arange(offset[k], offset[k + 1]) for k in range(num_classes))
    return SwapPool(rows=rows[kept], images=images[kept], masks=masks[kept], predicted=predicted[kept],
                    prob=top[kept], groups=groups, per_class=config.audit_swap_donors, seed=config.audit_seed)


def _check_manifest(out_dir: Path, manifest: dict) -> None:
    path = out_dir / MANIFEST
    if not path.exists():
        formats.write_json(manifest, path)
        return
    old = formats.read_json(path)
    if old != json.loads(json.dumps(manifest)):
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != json.loads(json.dumps(manifest)).get(k))
        raise ValueError(
            f"{out_dir} holds profiles from another run (differs in {diff}); resume with the same "
            "checkpoint, data and settings, or score into a new --out folder"
        )


def part_bounds(n_cells: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """``[start, stop)`` rows of every part: fixed by `rows_per_shard`, whatever the job layout."""
    return [(s, min(s + rows_per_shard, n_cells)) for s in range(0, n_cells, rows_per_shard)]


def assigned_parts(n_parts: int, shard: tuple[int, int] = (0, 1), process: tuple[int, int] = (0, 1)) -> list[int]:
    """Part indices one worker scores: job-array shard ``(I, N)`` takes parts ``k % N == I``; process
    ``(p, P)`` of a `jax.distributed` job takes every P-th of those from the p-th. Over all
    ``I`` and ``p`` the parts are covered exactly once."""
    p, n_proc = process
    if not 0 <= p < n_proc:
        raise ValueError(f"process {process}: need 0 <= index < count")
    return shards.shard_rows(n_parts, shard)[p::n_proc].tolist()


def score_dataset(
    model: EfficientNet,
    variables,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: ScoreConfig = ScoreConfig(),
    *,
    crop_shape: tuple[int, int, int] | None = None,
    downsample: tuple[int, int, int] = (1, 1, 1),
    data_config: DataConfig | None = None,
    progress: bool = True,
    max_parts: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> dict:
    """Score every cell of a dataset (cells.parquet + crops.zarr) into Parquet parts; resumable.

    Args:
      model: `EfficientNet` (BatchNorm in inference mode). A 2D model (``spatial_dims=2``, what
        training picks for one-plane crops) scores the store's one-plane crops as ``(Y, X, C)``:
        its CAM maps, masks and saved CAMs are 2D.
      variables: ``{"params", "batch_stats"}`` of a trained model.
      data_dir: the cell dataset folder (tools/crop.py output).
      out_dir: profile folder (created; an interrupted run's folder resumes).
      config: `ScoreConfig`.
      crop_shape, downsample: the training run's centre crop ``(Z, Y, X)`` and binning
        (``DataConfig.crop_shape``/``downsample``), applied to every crop and mask before the
        model sees it; the defaults take crops as stored.
      data_config: the training run's `DataConfig` (``load_checkpoint(...)[0].data``): its
        ``crop_shape`` and ``downsample`` (then leave those two arguments unset) and its
        context remedy's inference transform ("mask", "attenuate": `pipeline.context_transform`,
        recorded in the manifest). A model trained with such a remedy scored without it sees
        inputs it never saw in training: pass the run's data config.
      progress: show a tqdm bar with cells/s.
      max_parts: stop after this many newly scored parts (tests simulate interruptions).
      shard: ``(I, N)``: score only job-array shard I of N (`assigned_parts`); run
        `verify_profiles` when all N are done.

    Returns:
      ``{"n_cells", "parts", "scored_parts", "skipped_parts", "seconds", "cells_per_s"}``
      for this process.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    cells = formats.read_cells(data_dir)
    store = formats.open_crops(data_dir)
    if "Metadata_Row" in cells:
        rows = cells["Metadata_Row"].to_numpy()
        if not np.array_equal(rows, np.arange(len(cells))):
            raise ValueError(f"{data_dir}: cells.parquet Metadata_Row is not 0…N-1 in order; re-run the crop merge")
    if len(store) != len(cells):
        raise ValueError(f"{data_dir}: {len(cells)} rows in cells.parquet but {len(store)} crops; re-run the crop merge")
    from gradcamo_jax.data.pipeline import INFERENCE_REMEDIES, model_input_shape, transform_shape

    remedy, factor = "none", 0.25
    if data_config is not None:
        if crop_shape is not None or tuple(downsample) != (1, 1, 1):
            if (crop_shape, tuple(downsample)) != (data_config.crop_shape, tuple(data_config.downsample)):
                raise ValueError("score_dataset: crop_shape/downsample disagree with data_config; pass one or the other")
        crop_shape, downsample = data_config.crop_shape, tuple(data_config.downsample)
        remedy, factor = data_config.context_remedy, data_config.context_factor
    # The spatial shape the model sees: (Z, Y, X), or (Y, X) for a 2D model (trained on one-plane
    # crops; a 2D model given deeper crops is an error that names the fixes, before any work).
    spatial = model_input_shape(transform_shape(tuple(store.image.shape[1:]), crop_shape, downsample),
                                model.config.spatial_dims)[:-1]
    if config.layer == "auto":
        config = dataclasses.replace(config, layer=default_layer(model.config, spatial))
    map_shape = check_layer_resolution(model.config, spatial, config.layer, config.allow_coarse_layer)
    manifest = {
        "layer": config.layer,
        "layer_map_shape": list(map_shape),
        "method": config.method,
        "feature_layers": list(config.layers),
        "rows_per_shard": config.rows_per_shard,
        "cam_sample": config.cam_sample,
        "model": dataclasses.asdict(model.config),
        "crop_shape": None if crop_shape is None else list(crop_shape),
        "downsample": list(downsample),
        "audit": None if not config.audit else {"fills": list(config.audit_fills), "seed": config.audit_seed,
                                                "swap_donors": config.audit_swap_donors,
                                                "swap_pool": config.audit_swap_pool},
        **_fingerprint(cells, variables),
    }
    if remedy in INFERENCE_REMEDIES:  # (absent otherwise: manifests of runs without one stay as they were)
        manifest["context_remedy"] = {"remedy": remedy, "factor": factor if remedy == "attenuate" else None}
    random_variables, pool = None, None
    if config.audit:
        from gradcamo_jax import audit

        calib = next(_batches(store, 0, min(64, len(cells)), 64, 0, crop_shape, downsample, model.config.spatial_dims))[1]
        random_variables = audit.randomized_variables(dataclasses.replace(model.config, dtype="float32"),
                                                      jax.random.key(config.audit_seed), calib)
        if config.audit_swap_donors > 0:
            pool = swap_pool(remedy_logits(model, variables, remedy, factor), store, len(cells), config,
                             model.config.num_classes, crop_shape=crop_shape, downsample=downsample,
                             spatial_dims=model.config.spatial_dims)
    out_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        _check_manifest(out_dir, manifest)
        if pool is not None:  # which cells lent their context and cell to the interchange columns
            formats.write_json(pool.describe(), out_dir / SWAP_POOL_FILE)
    n = len(cells)
    bounds = part_bounds(n, config.rows_per_shard)
    mine = assigned_parts(len(bounds), shard, (jax.process_index(), jax.process_count()))
    pending = [k for k in mine if not (out_dir / PART.format(k)).exists()]
    todo = pending if max_parts is None else pending[:max_parts]
    total = sum(bounds[k][1] - bounds[k][0] for k in todo)
    t0 = time.perf_counter()
    with tqdm(total=total, unit="cell", desc="score", disable=not progress, smoothing=0.1) as bar:
        for k in todo:
            table, idx, cams = score_part(model, variables, store, cells, bounds[k], config, crop_shape=crop_shape,
                                          downsample=downsample, on_batch=bar.update,
                                          random_variables=random_variables, context_remedy=remedy,
                                          context_factor=factor, swap_pool=pool)
            if len(idx):
                # CAMs first: a part's parquet file is the marker that the whole part is done.
                formats.write_arrays(out_dir / CAM_DIR / PART.format(k).replace(".parquet", ".zarr"),
                                     {"cam": cams, "row": idx}, attrs={"layer": config.layer, "method": config.method})
            formats.write_table(table, out_dir / PART.format(k))
    dt = time.perf_counter() - t0
    return {
        "n_cells": n,
        "parts": len(bounds),
        "scored_parts": len(todo),
        "skipped_parts": len(mine) - len(pending),
        "seconds": dt,
        "cells_per_s": total / dt if dt > 0 else float("nan"),
    }


def _missing_parts(out_dir: Path, n_parts: int) -> None:
    missing = [k for k in range(n_parts) if not (out_dir / PART.format(k)).exists()]
    if missing:
        raise FileNotFoundError(
            f"{out_dir}: {len(missing)} of {n_parts} profile parts missing (first: {PART.format(missing[0])}); "
            "re-run `gradcamo score` with the same arguments (every --shard) to finish"
        )


def verify_profiles(out_dir: str | os.PathLike) -> dict:
    """Check a finished profile folder and mark it complete; returns the ``complete.json`` record.

    Every part of the manifest must exist and hold exactly its rows (``Metadata_Row`` = its
    ``[start, stop)`` in order): no cell missing, none twice, whatever job layout wrote the
    parts. Raises FileNotFoundError (missing parts) or ValueError (parts holding other rows).
    """
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    manifest = formats.read_json(out_dir / MANIFEST)
    bounds = part_bounds(manifest["n_cells"], manifest["rows_per_shard"])
    _missing_parts(out_dir, len(bounds))
    wrong = []
    for k, (start, stop) in enumerate(bounds):
        path = out_dir / PART.format(k)
        if "Metadata_Row" in pq.read_schema(path).names:
            rows = pd.read_parquet(path, columns=["Metadata_Row"])["Metadata_Row"].to_numpy()
        else:  # a cell table without store rows: only the count can be checked
            rows = np.arange(start, start + pq.read_metadata(path).num_rows)
        if not np.array_equal(rows, np.arange(start, stop)):
            wrong.append(f"{PART.format(k)} holds rows {rows[:3].tolist()}… ({len(rows)}), expected {start}…{stop - 1}")
    if wrong:
        raise ValueError(f"{out_dir}: parts with the wrong cells (written by another run?): {wrong[:5]}; "
                         "delete them and re-run their shard")
    record = {"n_cells": manifest["n_cells"], "parts": len(bounds), "rows_per_shard": manifest["rows_per_shard"],
              "cells_sha256": manifest["cells_sha256"], "weights_sha256": manifest["weights_sha256"]}
    formats.write_json(record, out_dir / COMPLETE)
    return record


def read_profiles(out_dir: str | os.PathLike, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """All parts of a profile folder, in row order (pandas). Raises if parts are missing or a
    cell's row appears other than once."""
    out_dir = Path(out_dir)
    manifest = formats.read_json(out_dir / MANIFEST)
    n_parts = len(part_bounds(manifest["n_cells"], manifest["rows_per_shard"]))
    _missing_parts(out_dir, n_parts)
    table = pd.concat([formats.read_table(out_dir / PART.format(k)) if columns is None else
                       pd.read_parquet(out_dir / PART.format(k), columns=list(columns)) for k in range(n_parts)],
                      ignore_index=True)
    if "Metadata_Row" in table and not np.array_equal(table["Metadata_Row"].to_numpy(), np.arange(manifest["n_cells"])):
        raise ValueError(f"{out_dir}: the parts do not hold each cell once in row order; run verify_profiles "
                         "(gradcamo score --merge) to see which part is wrong")
    return table


def read_cams(out_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Saved CAM volumes of a profile folder: ``(rows (M,), cams (M, Z, Y, X) float16)``; a 2D
    model's maps are ``(M, Y, X)``."""
    parts = sorted((Path(out_dir) / CAM_DIR).glob("part-*.zarr"))
    if not parts:
        return np.zeros((0,), np.int64), np.zeros((0, 0, 0, 0), np.float16)
    loaded = [formats.read_arrays(p) for p in parts]
    return np.concatenate([a["row"] for a in loaded]), np.concatenate([a["cam"] for a in loaded])


__all__ = [
    "AUTO_MIN_MAP_YX", "MIN_MAP_YX", "SWAP_POOL_PER_CLASS", "ScoreConfig", "SwapPool", "assigned_parts", "cam_rows",
    "check_layer_resolution", "default_layer", "feature_names", "part_bounds", "read_cams", "read_profiles", "score_dataset", "score_part",
    "swap_pool", "verify_profiles",
]
