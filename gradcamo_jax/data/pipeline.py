"""grain input pipelines: cell source → split by well → shuffle → augment → batch, per process.

A *source* is anything with ``len(source)`` and ``source[i] -> dict`` holding

* ``image``: ``(Z, Y, X, C)`` float32 crop (channels last),
* ``mask``: ``(Z, Y, X)`` uint8, 1 = the central cell, 2 = other cells, 0 = background,
* ``label``: int32 class index,
* ``index``: int64 row of the cell in ``cells.parquet`` / the crop store,

(`ArraySource` in memory, `CropStoreSource` over ``crops.zarr``). Batches are the same
dicts with a leading batch axis plus ``valid`` (bool, False on evaluation padding).

Crops are stored and transformed as ``(Z, Y, X, C)`` whatever the plate; a 2D model
(``ModelConfig.spatial_dims=2``, chosen by training for one-plane crops, see
`gradcamo_jax.train.model_config_for_crops`) takes ``(Y, X, C)``. The plane axis is dropped
in one function, `to_model_axes`, applied last wherever a stored crop becomes the model's
input: the training and evaluation loaders here (``spatial_dims=`` of `train_dataset` /
`eval_dataset`), scoring's batches and the report's overlays.

Determinism, independent of the number of processes and workers: the training stream is
``MapDataset.range(n).shuffle(seed).repeat()`` (a new permutation every epoch); global
batch ``t`` is stream positions ``[t*B, (t+1)*B)``; process ``p`` of ``P`` reads positions
``t*B + p*B/P … t*B + (p+1)*B/P - 1`` only (its rows of the global batch, so the global
array assembled by `gradcamo_jax.sharding.to_global` is the same whatever P is); the
augmentation of position ``g`` draws from ``np.random.default_rng((seed, g))``. The grain
iterator state (``get_state``/``set_state``) is therefore all a resumed run needs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import grain
import numpy as np
import pandas as pd

from gradcamo_jax.config import DataConfig
from gradcamo_jax.data import splits
from gradcamo_jax.data.splits import SPLITS


class CellSource(Protocol):
    """Random access to cells: ``source[i]`` → dict(image, mask, label, index), see module doc."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
    """Cells held in memory.

    Attributes:
      images: ``(N, Z, Y, X, C)`` float32 (or anything castable).
      masks: ``(N, Z, Y, X)`` uint8.
      labels: ``(N,)`` int class indices.
      indices: ``(N,)`` cell-table rows reported as ``index``; None = ``arange(N)``.
    """

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    indices: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.images)
        if self.images.ndim != 5 or self.masks.shape != self.images.shape[:4] or self.labels.shape != (n,):
            raise ValueError(
                f"ArraySource: images {self.images.shape} (N, Z, Y, X, C), masks {self.masks.shape} "
                f"(N, Z, Y, X) and labels {self.labels.shape} (N,) do not agree"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "image": np.asarray(self.images[i], np.float32),
            "mask": np.asarray(self.masks[i], np.uint8),
            "label": np.int32(self.labels[i]),
            "index": np.int64(i if self.indices is None else self.indices[i]),
        }

    def subset(self, rows: np.ndarray) -> ArraySource:
        """The cells at positions `rows` (their ``index`` is kept)."""
        idx = np.arange(len(self)) if self.indices is None else self.indices
        return ArraySource(self.images[rows], self.masks[rows], self.labels[rows], idx[rows])


class CropStoreSource:
    """Cells of a cell dataset folder (``cells.parquet`` + ``crops.zarr``), opened lazily.

    `rows` are rows of the crop store; ``source[i]`` reads row ``rows[i]`` (one zarr
    chunk) and reports it as ``index``. The store handle is not pickled, so grain workers
    reopen it in their own process.
    """

    def __init__(self, dataset_dir: str, rows: np.ndarray, labels: np.ndarray):
        self.dataset_dir = str(dataset_dir)
        self.rows = np.asarray(rows, np.int64)
        self.labels = np.asarray(labels, np.int32)
        if self.rows.shape != self.labels.shape:
            raise ValueError(f"CropStoreSource: rows {self.rows.shape} and labels {self.labels.shape} differ")
        self._store = None

    def _open(self):
        if self._store is None:
            from gradcamo_jax.data import formats  # the only module that reads files

            self._store = formats.open_crops(self.dataset_dir)
        return self._store

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        store, row = self._open(), int(self.rows[i])
        return {
            "image": np.asarray(store.image[row], np.float32),
            "mask": np.asarray(store.mask[row], np.uint8),
            "label": np.int32(self.labels[i]),
            "index": np.int64(row),
        }


# ----------------------------------------------------------------------------- split by well


def cell_splits(cells: pd.DataFrame, config: DataConfig) -> np.ndarray:
    """Split name per cell ``(len(cells),)``, checked with `splits.check_split`.

    ``config.split_fractions`` None: the stored ``Metadata_Split`` (written by the crop step),
    or, for a table without one, `splits.split_cells` with the default fractions. Set: the
    cells are split anew by well with those fractions and ``config.split_seed``, overriding a
    stored split."""
    if config.split_fractions is None and "Metadata_Split" in cells.columns:
        split = cells["Metadata_Split"].astype(str).to_numpy(dtype=object)
    else:
        split = splits.split_cells(cells, config.split_fractions or splits.DEFAULT_FRACTIONS, config.split_seed)
    splits.check_split(cells, split)
    return split


def _require_columns(cells: pd.DataFrame, names) -> None:
    missing = [c for c in names if c not in cells.columns]
    if missing:
        raise ValueError(f"cell table lacks columns {missing}; has {list(cells.columns)}")


@dataclasses.dataclass(frozen=True)
class CellDataset:
    """A cell dataset split by well.

    Attributes:
      sources: split name → source of that split's cells.
      cells: the cell table with a ``split`` column added.
      num_classes: 1 + the largest class index in the table.
      input_shape: ``(Z, Y, X, C)`` of a crop after `DataConfig.crop_shape`/`downsample`
        (a model's input: `model_input_shape`).
    """

    sources: Mapping[str, CellSource]
    cells: pd.DataFrame
    num_classes: int
    input_shape: tuple[int, ...]

    def class_counts(self, split: str = "train") -> np.ndarray:
        """``(num_classes,)`` cell counts of `split`."""
        labels = self.cells.loc[self.cells["split"] == split, "Metadata_Class"].to_numpy(int)
        return np.bincount(labels, minlength=self.num_classes)


def open_dataset(dataset_dir: str, config: DataConfig) -> CellDataset:
    """The cell dataset in `dataset_dir` (``cells.parquet`` + ``crops.zarr``) split by well."""
    from gradcamo_jax.data import formats

    cells = formats.read_cells(dataset_dir).reset_index(drop=True)
    split = cell_splits(cells, config)
    cells = cells.assign(split=split)
    labels = cells["Metadata_Class"].to_numpy(np.int32)
    # Metadata_Row (written by the crop merge) is the cell's row in crops.zarr; without it,
    # the table's row order is the store's.
    store_rows = cells["Metadata_Row"].to_numpy(np.int64) if "Metadata_Row" in cells.columns else np.arange(len(cells))
    sources = {name: CropStoreSource(dataset_dir, store_rows[split == name], labels[split == name]) for name in SPLITS}
    probe = next((s for s in sources.values() if len(s)), None)
    if probe is None:
        raise ValueError(f"{dataset_dir}: the cell table is empty")
    shape = transform_shape(probe[0]["image"].shape, config.crop_shape, config.downsample)
    return CellDataset(sources, cells, int(labels.max()) + 1, shape)


def dataset_from_arrays(
    images: np.ndarray, masks: np.ndarray, cells: pd.DataFrame, config: DataConfig
) -> CellDataset:
    """`open_dataset` for in-memory crops: `cells` needs the well keys and ``Metadata_Class``,
    row i describing ``images[i]``/``masks[i]``."""
    cells = cells.reset_index(drop=True)
    split = cell_splits(cells, config)
    cells = cells.assign(split=split)
    full = ArraySource(images, masks, cells["Metadata_Class"].to_numpy(np.int32))
    sources = {name: full.subset(np.flatnonzero(split == name)) for name in SPLITS}
    shape = transform_shape(images.shape[1:], config.crop_shape, config.downsample)
    return CellDataset(sources, cells, int(cells["Metadata_Class"].max()) + 1, shape)


# ----------------------------------------------------------------------------- transforms


def transform_shape(shape: tuple[int, ...], crop_shape: tuple[int, int, int] | None = None,
                    downsample: tuple[int, int, int] = (1, 1, 1)) -> tuple[int, ...]:
    """``(Z, Y, X, C)`` after `centre_crop_and_bin` with the same `crop_shape` and `downsample`."""
    spatial = tuple(shape[:3]) if crop_shape is None else tuple(min(a, b) for a, b in zip(crop_shape, shape[:3]))
    return (*(s // d for s, d in zip(spatial, downsample)), shape[3])


def model_input_shape(shape: tuple[int, ...], spatial_dims: int = 3) -> tuple[int, ...]:
    """The input shape (no batch axis) a model with `spatial_dims` gets from crops of `shape`.

    Args:
      shape: ``(Z, Y, X, C)`` of a crop as the pipeline delivers it (after `transform_shape`).
      spatial_dims: ``ModelConfig.spatial_dims``.

    Returns:
      ``(Z, Y, X, C)`` for a 3D model; ``(Y, X, C)`` for a 2D one.

    Raises:
      ValueError: a 2D model and crops with more than one plane (the message names both fixes).
    """
    shape = tuple(int(n) for n in shape)
    if spatial_dims == 3:
        return shape
    if spatial_dims != 2 or len(shape) != 4:
        raise ValueError(f"model_input_shape: expected crops (Z, Y, X, C) and spatial_dims 2 or 3, got {shape}, {spatial_dims}")
    z, y, x, _ = shape
    if z != 1:
        # Dropping planes silently would score a 3D cell by one slice; the user must choose.
        raise ValueError(
            f"a 2D model (model.spatial_dims=2) sees one plane per cell, but these crops have Z={z} planes "
            f"(crop {'×'.join(map(str, shape[:3]))}); use a 3D model (model.spatial_dims=3), or keep each crop's "
            f"middle plane with data.crop_shape=(1, {y}, {x})"
        )
    return shape[1:]


def to_model_axes(image, mask, spatial_dims: int = 3):
    """Crops in the axes of a model with `spatial_dims`: the plane axis dropped for a 2D model.

    Args:
      image: ``(..., Z, Y, X, C)`` crops (any leading batch axes), NumPy or JAX.
      mask: ``(..., Z, Y, X)`` codes, the same leading axes.
      spatial_dims: ``ModelConfig.spatial_dims``. 3: both returned as they are. 2: Z must be 1
        (`model_input_shape` raises otherwise) and image ``(..., Y, X, C)``, mask ``(..., Y, X)``
        come back (views, no copy).

    Axes are indexed from the end so one crop and a batch of crops take the same path; this
    is the only place the plane axis is dropped, so training, scoring and the report's
    overlays see the same (Y, X) grid.
    """
    if spatial_dims == 3:
        return image, mask
    model_input_shape(tuple(image.shape[-4:]), spatial_dims)  # checks Z == 1
    if tuple(mask.shape) != tuple(image.shape[:-1]):
        raise ValueError(f"mask shape {tuple(mask.shape)} != image shape {tuple(image.shape)} without its channel axis")
    return image[..., 0, :, :, :], mask[..., 0, :, :]


def centre_crop_and_bin(image: np.ndarray, mask: np.ndarray, crop_shape: tuple[int, int, int] | None = None,
                        downsample: tuple[int, int, int] = (1, 1, 1)) -> tuple[np.ndarray, np.ndarray]:
    """Centre crop to `crop_shape` ``(Z, Y, X)`` (None: whole) then mean-pool by `downsample`
    (the `DataConfig` fields of the same names).

    image ``(Z, Y, X, C)``, mask ``(Z, Y, X)`` → the same axes, smaller. The mask takes the
    value at each bin's centre (codes must stay codes, so no averaging)."""
    if crop_shape is not None:
        sl = tuple(slice((n - min(c, n)) // 2, (n - min(c, n)) // 2 + min(c, n)) for n, c in zip(mask.shape, crop_shape))
        image, mask = image[sl], mask[sl]
    if tuple(downsample) != (1, 1, 1):
        fz, fy, fx = downsample
        z, y, x = (n // f for n, f in zip(mask.shape, downsample))
        image = image[: z * fz, : y * fy, : x * fx]
        image = image.reshape(z, fz, y, fy, x, fx, -1).mean(axis=(1, 3, 5), dtype=np.float32)
        mask = mask[fz // 2 :: fz, fy // 2 :: fy, fx // 2 :: fx][:z, :y, :x]
    return image, mask


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, config: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Random XY flips / 90° rotations (the same on image and mask) and per-channel intensity jitter.

    image ``(Z, Y, X, C)`` float32, mask ``(Z, Y, X)``. Every random number is drawn whether
    or not its option is on, so switching one augmentation off leaves the others unchanged."""
    k, flip_y, flip_x = int(rng.integers(4)), bool(rng.integers(2)), bool(rng.integers(2))
    scale = rng.uniform(-1.0, 1.0, image.shape[-1]).astype(np.float32)
    shift = rng.uniform(-1.0, 1.0, image.shape[-1]).astype(np.float32)
    if config.rot90_xy:
        k = k if image.shape[1] == image.shape[2] else 2 * (k % 2)  # a non-square crop only turns by 180°
        image, mask = np.rot90(image, k, axes=(1, 2)), np.rot90(mask, k, axes=(1, 2))
    if config.flip_xy:
        if flip_y:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if flip_x:
            image, mask = image[:, :, ::-1], mask[:, :, ::-1]
    image = image * (1.0 + config.intensity_scale * scale) + config.intensity_shift * shift
    return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(mask)


# ----------------------------------------------------------------------------- context remedies

CONTEXT_REMEDIES: tuple[str, ...] = ("none", "randomize", "mask", "attenuate")
"""Values of `DataConfig.context_remedy`."""

INFERENCE_REMEDIES: tuple[str, ...] = ("mask", "attenuate")
"""Remedies that transform the input at inference too (`context_transform`): a model trained
with one must be scored with it."""


def context_transform(image, mask, remedy: str = "none", factor: float = 0.25):
    """The input transform of a context remedy, applied in training, validation and inference.

    Args:
      image: ``(..., Z, Y, X, C)`` float crops (2D: ``(..., Y, X, C)``; any leading batch
        axes), NumPy or JAX.
      mask: ``(..., Z, Y, X)`` codes (`formats.MASK_CENTRAL` = 1 the central cell, 2 other
        cells, 0 background), the same leading axes.
      remedy: `DataConfig.context_remedy`. "mask": every voxel outside the central cell set
        to 0 (DeepProfiler's ``mask_objects``, written as a select so the zeros are +0);
        "attenuate": those voxels multiplied by `factor`; "none" and "randomize" (a
        training-only augmentation, `randomize_context`): `image` returned as it is.
      factor: the "attenuate" factor (`DataConfig.context_factor`).

    Returns:
      An array like `image` (same type and dtype); the central cell's voxels bit-identical.
    """
    if remedy not in CONTEXT_REMEDIES:
        raise ValueError(f"context remedy {remedy!r}; expected one of {CONTEXT_REMEDIES}")
    if remedy not in INFERENCE_REMEDIES:
        return image
    if tuple(mask.shape) != tuple(image.shape[:-1]):
        raise ValueError(f"mask shape {tuple(mask.shape)} != image shape {tuple(image.shape)} without its channel axis")
    if isinstance(image, np.ndarray):
        xp, cast = np, lambda v: np.asarray(v, image.dtype)
    else:
        import jax.numpy as xp

        def cast(v):
            return xp.asarray(v, image.dtype)
    from gradcamo_jax.data.formats import MASK_CENTRAL

    cell = (mask == MASK_CENTRAL)[..., None]
    other = cast(0.0) if remedy == "mask" else image * cast(factor)
    return xp.where(cell, image, other)


def _fill_context_fn():
    """`audit.fill_region` of the region "context", jitted per fill (compiled once per crop shape)."""
    global _FILL_CONTEXT
    if _FILL_CONTEXT is None:
        import functools

        import jax

        from gradcamo_jax import audit

        @functools.partial(jax.jit, static_argnames=("fill",))
        def fill(image, mask, key, donor, *, fill):
            return audit.fill_region(image, mask, "context", fill, key, donor)[0]

        _FILL_CONTEXT = fill
    return _FILL_CONTEXT


_FILL_CONTEXT = None


def randomize_context(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, config: DataConfig,
                      donor: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """The "randomize" remedy's augmentation of one training crop (before `augment`).

    With probability ``config.randomize_prob`` the crop's context (mask codes 0 and 2) is
    replaced by the audit's fill (`gradcamo_jax.audit.fill_region`, region "context"):
    "noise" (Gaussian noise with the context's own per-channel mean and SD, exactly) or
    "swap" (the same voxels of `donor`, a control cell's crop, copied bit for bit);
    ``config.randomize_fill`` "both" picks one of the two with probability 1/2. Without a
    donor, "swap" falls back to "noise". Three numbers are drawn from `rng` whatever happens
    (coin, fill pick, noise seed), so a crop's draw does not depend on the previous crop's.

    Args:
      image: ``(Z, Y, X, C)`` float32; mask: ``(Z, Y, X)`` codes; rng: the crop's own stream.
      config: `DataConfig` (``randomize_prob``, ``randomize_fill``).
      donor: ``(Z, Y, X, C)`` control crop for "swap", or None.

    Returns:
      ``(crop, fill)``: the crop (float32, central cell bit-identical; `image` itself when
      nothing was replaced) and the fill used ("" for none).
    """
    coin, pick, noise_seed = rng.random(), rng.random(), int(rng.integers(2**31 - 1))
    if coin >= config.randomize_prob:
        return image, ""
    fill = config.randomize_fill if config.randomize_fill != "both" else ("noise" if pick < 0.5 else "swap")
    if fill == "swap" and donor is None:
        fill = "noise"
    import jax

    out = _fill_context_fn()(image, mask, jax.random.key(noise_seed), image if donor is None else donor, fill=fill)
    return np.asarray(out, np.float32), fill


def control_positions(source, control_class: int) -> np.ndarray:
    """Positions in `source` of its cells of `control_class` (the "swap" donors), from the
    source's ``labels`` array (both sources here have one) or by reading every label."""
    labels = getattr(source, "labels", None)
    if labels is None:
        labels = np.array([int(source[i]["label"]) for i in range(len(source))])
    return np.flatnonzero(np.asarray(labels) == control_class)


# ----------------------------------------------------------------------------- datasets


def _local_positions(n_local: int, global_batch: int, process_index: int, process_count: int) -> grain.MapDataset:
    """Global stream positions read by one process: element k ↦ ``(k // b) * B + p * b + k % b``
    with ``b = B / P`` (its rows of each global batch)."""
    return grain.MapDataset.range(n_local).map(_ToGlobal(global_batch, process_index, process_count))


@dataclasses.dataclass(frozen=True)
class _ToGlobal:
    global_batch: int
    process_index: int
    process_count: int

    def __call__(self, k: int) -> int:
        b = self.global_batch // self.process_count
        step, j = divmod(int(k), b)
        return step * self.global_batch + self.process_index * b + j


@dataclasses.dataclass(frozen=True, eq=False)
class _LoadTrain:
    """Stream position g → augmented example ``order[g]``, with rng ``(seed, g)``."""

    source: Any
    order: grain.MapDataset
    config: DataConfig
    seed: int
    donors: np.ndarray | None = None  # "randomize": positions of control cells in `source`
    spatial_dims: int = 3  # the model's; 2 drops the plane axis (`to_model_axes`), after every transform

    def __call__(self, g: int) -> dict[str, Any]:
        cfg = self.config
        pos = int(self.order[g])
        ex = self.source[pos]
        image, mask = centre_crop_and_bin(ex["image"], ex["mask"], cfg.crop_shape, cfg.downsample)
        if cfg.context_remedy == "randomize":
            # Its own stream (seed, g, 1): the flips and jitter below draw exactly as without it.
            rng = np.random.default_rng((self.seed, int(g), 1))
            donor = None
            if self.donors is not None and len(self.donors):
                j = int(self.donors[int(rng.integers(len(self.donors)))])
                if j == pos and len(self.donors) > 1:  # never the cell's own context
                    j = int(self.donors[(int(np.searchsorted(self.donors, j)) + 1) % len(self.donors)])
                if j != pos:
                    d = self.source[j]
                    donor = centre_crop_and_bin(d["image"], d["mask"], cfg.crop_shape, cfg.downsample)[0]
            image, _ = randomize_context(image, mask, rng, cfg, donor)
        image, mask = augment(image, mask, np.random.default_rng((self.seed, int(g))), cfg)
        image = context_transform(image, mask, cfg.context_remedy, cfg.context_factor)
        image, mask = to_model_axes(image, mask, self.spatial_dims)
        return {**ex, "image": image, "mask": mask, "valid": np.bool_(True)}


@dataclasses.dataclass(frozen=True, eq=False)
class _LoadEval:
    """Position g → example g (no augmentation), or a zero example with ``valid=False`` past the end."""

    source: Any
    config: DataConfig
    spatial_dims: int = 3  # the model's; 2 drops the plane axis (`to_model_axes`)

    def __call__(self, g: int) -> dict[str, Any]:
        g = int(g)
        ex = self.source[min(g, len(self.source) - 1)]
        image, mask = centre_crop_and_bin(ex["image"], ex["mask"], self.config.crop_shape, self.config.downsample)
        if g >= len(self.source):
            image, mask = to_model_axes(np.zeros_like(image), np.zeros_like(mask), self.spatial_dims)
            return {"image": image, "mask": mask, "label": np.int32(0), "index": np.int64(-1), "valid": np.bool_(False)}
        image = context_transform(image, mask, self.config.context_remedy, self.config.context_factor)
        image, mask = to_model_axes(image, mask, self.spatial_dims)
        return {**ex, "image": np.ascontiguousarray(image), "mask": np.ascontiguousarray(mask), "valid": np.bool_(True)}


def local_batch_size(global_batch: int, process_count: int) -> int:
    """Rows of each global batch one process reads (ValueError unless it divides)."""
    if global_batch % process_count:
        raise ValueError(f"batch size {global_batch} does not divide over {process_count} processes")
    return global_batch // process_count


def train_dataset(
    source: CellSource, config: DataConfig, seed: int, process_index: int = 0, process_count: int = 1,
    *, spatial_dims: int = 3,
) -> grain.MapDataset:
    """Endless training batches for one process: dicts of ``(B/P, ...)`` arrays (see module doc).

    Element t is this process's part of global batch t, a pure function of
    ``(source, config, seed, t)``. ``config.context_remedy`` applies: "randomize" replaces
    the context of some crops (`randomize_context`, donors = the split's control cells,
    stream ``(seed, g, 1)``); "mask"/"attenuate" transform every crop (`context_transform`).
    `spatial_dims` is the model's: with 2, images come as ``(B/P, Y, X, C)`` and masks as
    ``(B/P, Y, X)`` (`to_model_axes`, after the augmentations, which act on (Z, Y, X) crops).
    """
    if len(source) == 0:
        raise ValueError("the training split is empty")
    b = local_batch_size(config.batch_size, process_count)
    order = grain.MapDataset.range(len(source)).shuffle(seed=seed % 2**32).repeat(None)
    donors = None
    if config.context_remedy == "randomize" and config.randomize_fill != "noise":
        donors = control_positions(source, config.control_class)
    # Enough positions for 2**40 global batches: endless in practice, finite for grain.
    positions = _local_positions(b * 2**40, config.batch_size, process_index, process_count)
    return positions.map(_LoadTrain(source, order, config, seed, donors, spatial_dims)).batch(b, drop_remainder=True)


def eval_dataset(source: CellSource, config: DataConfig, process_index: int = 0, process_count: int = 1,
                 *, spatial_dims: int = 3) -> grain.MapDataset:
    """One pass over `source` in order, as this process's part of global batches of
    ``config.eval_batch_size``; the last global batch is padded with ``valid=False`` rows.
    Crops get the remedy's inference transform (`context_transform`), no augmentation, and
    the axes of a model with `spatial_dims` (`to_model_axes`)."""
    b = local_batch_size(config.eval_batch_size, process_count)
    n_batches = max(1, -(-len(source) // config.eval_batch_size))
    positions = _local_positions(n_batches * b, config.eval_batch_size, process_index, process_count)
    return positions.map(_LoadEval(source, config, spatial_dims)).batch(b, drop_remainder=True)


def make_iterator(ds: grain.MapDataset, config: DataConfig) -> grain.DatasetIterator:
    """A checkpointable iterator over `ds` (threads, plus `config.worker_count` processes).

    With workers, call ``absl.flags.FLAGS.mark_as_parsed()`` first in a plain script
    (grain reads absl flags in the children)."""
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=config.read_threads, prefetch_buffer_size=max(config.prefetch, config.read_threads)
        ))
    if config.worker_count > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return iter(it_ds)


def throughput(it: Iterator[dict[str, np.ndarray]], num_batches: int, warmup: int = 2) -> float:
    """Cells per second delivered by `it` over `num_batches` batches after `warmup` batches."""
    for _ in range(warmup):
        next(it)
    start, cells = time.perf_counter(), 0
    for _ in range(num_batches):
        cells += len(next(it)["label"])
    return cells / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """``python -m gradcamo_jax.data.pipeline --data DIR [--workers 0 2] [--batches 20]``: cells/s."""
    import argparse

    import absl.flags

    absl.flags.FLAGS.mark_as_parsed()  # grain workers read absl flags (DESIGN §7)
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    for workers in args.workers:
        cfg = DataConfig(batch_size=args.batch_size, worker_count=workers)
        data = open_dataset(args.data, cfg)
        it = make_iterator(train_dataset(data.sources["train"], cfg, seed=0), cfg)
        rate = throughput(it, args.batches)
        print(f"workers={workers} batch={args.batch_size} crop={data.input_shape}: {rate:.1f} cells/s")


if __name__ == "__main__":
    main()
