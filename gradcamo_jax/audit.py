"""Audit of Grad-CAMO against counterfactuals: what a model actually relies on, per cell.

Grad-CAMO says where an explanation points, not what the prediction depends on, and per
cell it is weak (DESIGN.md §4). This module measures dependence directly and gives the
explanation a floor to beat:

* **Fills** (`fill_region`): replace one region of a crop — background, neighbours, the
  central cell, or the whole context (background + neighbours) — by matched noise, a blur,
  the region's mean, or the same voxels of a donor crop (the background swap of Gupta,
  Moses & Lu, MLCB 2025). Every other voxel stays bit-identical.
* **Counterfactual reliance** (`reliance`, `model_reliance`): the drop of the target
  class's log-probability when a region is replaced, for every (region, fill), all
  variants of a batch in one forward; summarised per cell by the context-reliance index
  (`context_reliance_index`).
* **Fill sanity** (`fill_sanity`): how much a fill by itself moves control cells, whose
  context carries no treatment signal. A fill that moves them is too strong to read.
* **Interchange** (`interchange`, `model_interchange`): the cell on the context of a donor
  of another class, and the donor's cell on this cell's context; how far the prediction
  follows each, as a share of the distance between the two crops' predictions, and an
  index from the two (`interchange_index`). Free of the model's confidence, and no fill.
* **Model randomisation** (`randomized_variables`, `random_baseline`; Adebayo et al. 2018):
  Grad-CAMO of the same architecture with random weights on the same crops, and the
  trained model's Grad-CAMO corrected for it (`corrected_gradcamo`).

Axis order is channels-last: images ``(N, Z, Y, X, C)`` (2D: ``(N, Y, X, C)``), masks
``(N, Z, Y, X)`` (2D: ``(N, Y, X)``) uint8 codes 1 = central cell, 2 = other cells,
0 = background. Per-crop functions take the same without the leading ``N``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.tree_util import Partial

from gradcamo_jax.cam import CamWeights, explain
from gradcamo_jax.config import ModelConfig
from gradcamo_jax.metric import BACKGROUND, CENTRAL, NEIGHBOR
from gradcamo_jax.models.efficientnet import EfficientNet, calibrate_batch_stats, check_images, init

REGIONS: dict[str, tuple[int, ...]] = {
    "background": (BACKGROUND,),
    "neighbors": (NEIGHBOR,),
    "cell": (CENTRAL,),
    "context": (BACKGROUND, NEIGHBOR),
}
"""Region name → the mask codes it covers."""

FILLS: tuple[str, ...] = ("noise", "blur", "mean", "swap")
"""Fill names; see `fill_region`."""

# Stable ids for folding into PRNG keys: the noise a (region, fill) gets does not depend on
# which other regions or fills a call asks for, so subsets of a run reproduce its values.
_REGION_IDS = {name: i for i, name in enumerate(REGIONS)}
_FILL_IDS = {name: i for i, name in enumerate(FILLS)}

# scipy.ndimage boundary mode → jnp.pad mode (scipy's "reflect" repeats the edge voxel,
# which numpy calls "symmetric").
_PAD_MODES = {"reflect": "symmetric", "mirror": "reflect", "nearest": "edge", "wrap": "wrap", "constant": "constant"}

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]
"""``(images (B, *S, C), masks (B, *S)) -> logits (B, K)``."""


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class FillSettings:
    """How fills are made.

    Attributes:
      blur_sigma: Gaussian SD in voxels, one number for every spatial axis or one per axis
        (Z first in 3D), so a crop with few z-slices can be blurred less along z; 0 leaves
        an axis unblurred.
      blur_truncate: kernel radius in SDs, ``radius = int(truncate * sigma + 0.5)``
        (scipy.ndimage's rule).
      blur_mode: boundary handling, scipy.ndimage's names ("reflect" = edge voxel repeated,
        "mirror", "nearest", "wrap", "constant" = 0).
    """

    blur_sigma: float | tuple[float, ...] = 2.0
    blur_truncate: float = 4.0
    blur_mode: str = "reflect"

    def __post_init__(self):
        if not isinstance(self.blur_sigma, (int, float)):
            object.__setattr__(self, "blur_sigma", tuple(float(s) for s in self.blur_sigma))
        if any(s < 0 for s in np.atleast_1d(self.blur_sigma)):
            raise ValueError(f"FillSettings.blur_sigma={self.blur_sigma}; expected non-negative SDs in voxels")
        if self.blur_mode not in _PAD_MODES:
            raise ValueError(f"FillSettings.blur_mode={self.blur_mode!r}; expected one of {sorted(_PAD_MODES)}")

    def sigmas(self, spatial_dims: int) -> tuple[float, ...]:
        """The blur SD of each spatial axis."""
        if isinstance(self.blur_sigma, (int, float)):
            return (float(self.blur_sigma),) * spatial_dims
        if len(self.blur_sigma) != spatial_dims:
            raise ValueError(
                f"FillSettings.blur_sigma={self.blur_sigma} has {len(self.blur_sigma)} axes; "
                f"the crops have {spatial_dims} spatial axes"
            )
        return self.blur_sigma


@dataclasses.dataclass(frozen=True)
class RelianceSettings:
    """Which counterfactuals `reliance` runs and how the index is read.

    Attributes:
      regions: names of `REGIONS` to replace, one at a time.
      fills: names of `FILLS`; "swap" needs donor crops.
      fill: `FillSettings`.
      cri_fill: the fill whose "context" and "cell" drops define the context-reliance
        index; None skips the index (then "cell" and "context" need not be in `regions`).
      eps: drops (nats) at or below it count as no evidence of reliance; float32
        log-probabilities of an unchanged input differ by ~1e-6 at most, so the default sits
        far above rounding and far below a drop anyone would read (1e-3 nats ≈ 0.1 %).
    """

    regions: tuple[str, ...] = ("background", "neighbors", "cell", "context")
    fills: tuple[str, ...] = ("noise", "blur", "mean")
    fill: FillSettings = FillSettings()
    cri_fill: str | None = "noise"
    eps: float = 1e-3

    def __post_init__(self):
        object.__setattr__(self, "regions", tuple(self.regions))
        object.__setattr__(self, "fills", tuple(self.fills))
        for r in self.regions:
            _check_region(r)
        for f in self.fills:
            _check_fill(f)
        if not self.regions or not self.fills:
            raise ValueError("RelianceSettings needs at least one region and one fill")
        if len(set(self.regions)) != len(self.regions) or len(set(self.fills)) != len(self.fills):
            raise ValueError(f"RelianceSettings has repeated regions or fills: {self.regions}, {self.fills}")
        if self.cri_fill is not None:
            missing = {"cell", "context"} - set(self.regions)
            if missing or self.cri_fill not in self.fills:
                raise ValueError(
                    f"the context-reliance index needs regions 'cell' and 'context' and cri_fill="
                    f"{self.cri_fill!r} among fills {self.fills} (regions are {self.regions}); "
                    "add them or set cri_fill=None"
                )
        if not self.eps >= 0:
            raise ValueError(f"RelianceSettings.eps={self.eps}; expected >= 0")


def _check_region(region: str) -> None:
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {sorted(REGIONS)}")


def _check_fill(fill: str) -> None:
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}; expected one of {FILLS}")


# ----------------------------------------------------------------------------- fills


def region_mask(mask: jax.Array, region: str) -> jax.Array:
    """Boolean ``(*S,)`` of the voxels of `region` in one crop's mask ``(*S,)`` (codes 0/1/2)."""
    _check_region(region)
    codes = REGIONS[region]
    out = mask == codes[0]
    for c in codes[1:]:
        out = out | (mask == c)
    return out


def region_moments(image: jax.Array, inside: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and SD (``ddof=0``) ``(C,)`` of the voxels of ``image`` ``(*S, C)``
    where ``inside`` ``(*S,)`` is True; 0 for an empty region. Float32 at least."""
    x = image.astype(jnp.promote_types(image.dtype, jnp.float32))
    axes = tuple(range(inside.ndim))
    w = inside[..., None]
    n = jnp.maximum(jnp.sum(inside), 1).astype(x.dtype)
    mean = jnp.sum(jnp.where(w, x, 0), axis=axes) / n
    # Two passes: the one-pass E[x²] − E[x]² cancels catastrophically for bright, flat regions.
    var = jnp.sum(jnp.where(w, (x - mean) ** 2, 0), axis=axes) / n
    return mean, jnp.sqrt(var)


def blur_matrix(n: int, sigma: float, *, truncate: float = 4.0, mode: str = "reflect") -> np.ndarray:
    """``(n, n)`` float64 matrix ``B`` of a 1D Gaussian blur of a length-`n` axis, boundary
    included: ``blur(v) = B @ v`` equals ``scipy.ndimage.gaussian_filter1d(v, sigma,
    mode=mode, truncate=truncate)``. Identity for ``sigma = 0``."""
    if mode not in _PAD_MODES:
        raise ValueError(f"blur mode {mode!r}; expected one of {sorted(_PAD_MODES)}")
    if sigma <= 0:
        return np.eye(n)
    radius = int(truncate * float(sigma) + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / float(sigma)) ** 2)
    taps = taps / taps.sum()
    # Padding an index vector with the boundary rule says which voxel each tap reads
    # (-1: a constant 0), however many times the boundary is crossed.
    source = np.pad(np.arange(n), radius, mode=_PAD_MODES[mode], **({"constant_values": -1} if mode == "constant" else {}))
    out = np.zeros((n, n))
    for i in range(n):
        for t, j in zip(taps, source[i : i + 2 * radius + 1]):
            if j >= 0:
                out[i, j] += t
    return out


def gaussian_blur(image: jax.Array, sigma: Sequence[float], *, truncate: float = 4.0,
                  mode: str = "reflect") -> jax.Array:
    """Separable Gaussian blur of one crop ``(*S, C)`` over its spatial axes, channels apart.

    ``sigma`` has one SD (voxels) per spatial axis; 0 skips the axis. Kernel, radius and
    boundary follow ``scipy.ndimage.gaussian_filter(image, (*sigma, 0), mode=mode,
    truncate=truncate)`` (float32 at least here, float64 there).
    """
    x = image.astype(jnp.promote_types(image.dtype, jnp.float32))
    if len(sigma) != x.ndim - 1:
        raise ValueError(f"sigma {tuple(sigma)} has {len(sigma)} axes; the crop {x.shape} has {x.ndim - 1} spatial axes")
    for axis, s in enumerate(sigma):
        if s <= 0:
            continue
        # One small matmul per axis (the blur as a banded matrix, boundary folded in): a
        # handful of ops to compile, where a sum of 2·radius + 1 shifted slices per axis
        # made the reliance core's compile several times slower.
        b = jnp.asarray(blur_matrix(x.shape[axis], s, truncate=truncate, mode=mode), x.dtype)
        x = jnp.moveaxis(jnp.tensordot(b, x, axes=((1,), (axis,)), precision=jax.lax.Precision.HIGHEST), 0, axis)
    return x


def _matched_noise(image: jax.Array, inside: jax.Array, key: jax.Array) -> jax.Array:
    mean, sd = region_moments(image, inside)
    z = jax.random.normal(key, image.shape, mean.dtype)
    # Standardise the draw over the region itself, so the fill has the region's mean and SD
    # exactly (to rounding), not only in expectation: a drop is then never a moment mismatch.
    zm, zs = region_moments(z, inside)
    z = jnp.where(zs > 0, (z - zm) / jnp.where(zs > 0, zs, 1), 0)
    return mean + sd * z


def fill_region(image: jax.Array, mask: jax.Array, region: str, fill: str, key: jax.Array,
                donor: jax.Array | None = None, *, settings: FillSettings = FillSettings()
                ) -> tuple[jax.Array, jax.Array]:
    """One crop with the voxels of `region` replaced by `fill`; pure, jit- and vmap-able.

    Args:
      image: ``(Z, Y, X, C)`` (2D: ``(Y, X, C)``) float crop, channels last.
      mask: ``(Z, Y, X)`` (2D: ``(Y, X)``) codes 1 central cell, 2 other cells, 0 background.
      region: "background" (code 0), "neighbors" (2), "cell" (1) or "context" (0 and 2).
      fill: what goes into the region, computed per channel:

        * "noise": Gaussian noise with the region's own mean and SD (``ddof=0``): structure
          removed, first two moments kept (for the background: noise matched to the
          crop's own background). The draw is standardised over the region, so the moments
          hold exactly up to float rounding; the values depend only on `key`.
        * "blur": the crop blurred as a whole (`gaussian_blur` with `settings`), taken
          inside the region. Near the region's border the blur mixes in what lies outside
          (e.g. the cell into the background): a mild counterfactual.
        * "mean": the region's mean.
        * "swap": the same voxels of `donor` (another cell's crop, e.g. from a control
          well), values copied bit for bit. The donor's voxels at these positions may hold
          its own cell; the mask of `image`, not the donor's, decides what is replaced.
      key: a `jax.random` key (used by "noise" only).
      donor: ``image``-shaped crop, needed by "swap".
      settings: `FillSettings` (blur SD per axis, truncation, boundary mode).

    Returns:
      ``(filled, empty)``: ``filled`` like ``image`` (same dtype), every voxel outside the
      region bit-identical to ``image``; ``empty`` a bool scalar, True when the region
      has no voxel, in which case ``filled`` equals ``image``.
    """
    _check_region(region)
    _check_fill(fill)
    if mask.shape != image.shape[:-1]:
        raise ValueError(f"mask shape {mask.shape} != image shape {image.shape} without its channel axis")
    inside = region_mask(mask, region)
    empty = ~jnp.any(inside)
    if fill == "swap":
        if donor is None:
            raise ValueError("fill 'swap' needs a donor crop shaped like the image")
        if donor.shape != image.shape:
            raise ValueError(f"donor shape {donor.shape} != image shape {image.shape}")
        values = donor.astype(image.dtype)
    elif fill == "noise":
        values = _matched_noise(image, inside, key)
    elif fill == "blur":
        values = gaussian_blur(image, settings.sigmas(mask.ndim), truncate=settings.blur_truncate,
                               mode=settings.blur_mode)
    else:  # "mean"
        values = jnp.broadcast_to(region_moments(image, inside)[0], image.shape)
    return jnp.where(inside[..., None], values.astype(image.dtype), image), empty


# ----------------------------------------------------------------------------- reliance


def context_reliance_index(drop_context: jax.Array, drop_cell: jax.Array, eps: float = 1e-3
                           ) -> tuple[jax.Array, jax.Array]:
    """Context-reliance index (CRI) of each cell from two drops ``(N,)`` (nats) of one fill.

    With ``e(d) = d if d > eps else 0`` (a drop at or below `eps`, or a rise of the target
    log-probability, is no evidence that the prediction needs the region)::

        CRI = e(drop_context) / (e(drop_context) + e(drop_cell))

    in [0, 1]: 0 when only replacing the cell hurts the prediction (a model that ignores
    context has ``drop_context = 0`` exactly, hence CRI = 0), 1 when only replacing the
    context hurts it (a model that ignores the cell), 0.5 when both hurt equally. Both
    ``e`` = 0 (or a NaN drop) gives no evidence either way: NaN and ``undefined = True``.
    Returns ``(cri, undefined)``.
    """
    ctx = jnp.where(drop_context > eps, drop_context, 0)
    cell = jnp.where(drop_cell > eps, drop_cell, 0)
    total = ctx + cell
    undefined = ~(total > 0) | jnp.isnan(drop_context) | jnp.isnan(drop_cell)
    cri = jnp.where(undefined, jnp.nan, ctx / jnp.where(undefined, 1, total))
    return cri, undefined


@struct.dataclass
class RelianceResult:
    """Counterfactual drops of N cells (`reliance`).

    Attributes:
      logp0: ``(N,)`` target-class log-softmax of the crop as it is.
      target: ``(N,)`` int32 class each drop refers to (the prediction unless given).
      predicted: ``(N,)`` int32 predicted class of the crop as it is.
      drops: ``(N, n_regions, n_fills)`` ``logp0 − logp(crop with region replaced by fill)``,
        nats; positive = replacing the region lowers the target's probability.
      changed: ``(N, n_regions, n_fills)`` bool, the replaced crop's predicted class differs
        from ``predicted``.
      empty: ``(N, n_regions)`` bool, the region has no voxel (the crop was left unchanged,
        its drops are 0 and say nothing).
      cri: ``(N,)`` context-reliance index (`context_reliance_index`) of the settings'
        ``cri_fill``; NaN where undefined.
      cri_undefined: ``(N,)`` bool: no drop above eps, the "cell" or "context" region
        empty, or no index requested.
      regions, fills: names of the region and fill axes of ``drops``.
    """

    logp0: jax.Array
    target: jax.Array
    predicted: jax.Array
    drops: jax.Array
    changed: jax.Array
    empty: jax.Array
    cri: jax.Array
    cri_undefined: jax.Array
    regions: tuple[str, ...] = struct.field(pytree_node=False)
    fills: tuple[str, ...] = struct.field(pytree_node=False)

    def drop(self, region: str, fill: str) -> jax.Array:
        """``(N,)`` drops of one (region, fill)."""
        return self.drops[:, self.regions.index(region), self.fills.index(fill)]

    def __len__(self) -> int:
        return int(self.logp0.shape[0])


def _variant_key(key: jax.Array, region: str, fill: str) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(key, _REGION_IDS[region]), _FILL_IDS[fill])


def _variants(image, mask, donor, key, settings: RelianceSettings):
    """``(V, *S, C)`` crops, region-major then fill, and ``(n_regions,)`` empty flags."""
    crops, empty = [], []
    for region in settings.regions:
        for fill in settings.fills:
            x, e = fill_region(image, mask, region, fill, _variant_key(key, region, fill), donor,
                               settings=settings.fill)
            crops.append(x)
        empty.append(e)
    return jnp.stack(crops), jnp.stack(empty)


@functools.partial(jax.jit, static_argnames=("settings",))
def _reliance_jit(logits_fn, images, masks, keys, targets, donors, *, settings: RelianceSettings):
    n = images.shape[0]
    n_r, n_f = len(settings.regions), len(settings.fills)
    v = n_r * n_f
    crops, empty = jax.vmap(functools.partial(_variants, settings=settings))(images, masks, donors, keys)
    # One forward of originals and variants together, cell-major: with BatchNorm in
    # inference mode rows are independent, and an unchanged row reproduces its original's
    # logits bit for bit within one batch, so a region the model ignores drops exactly 0.
    batch = jnp.concatenate([images[:, None], crops], axis=1).reshape(n * (v + 1), *images.shape[1:])
    logits = logits_fn(batch, jnp.repeat(masks, v + 1, axis=0))
    logits = logits.reshape(n, v + 1, -1).astype(jnp.promote_types(logits.dtype, jnp.float32))
    logp = jax.nn.log_softmax(logits, axis=-1)
    pred_all = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    predicted = pred_all[:, 0]
    target = jnp.where(targets < 0, predicted, targets).astype(jnp.int32)
    lp = jnp.take_along_axis(logp, target[:, None, None], axis=-1)[..., 0]  # (N, V + 1)
    logp0 = lp[:, 0]
    drops = (logp0[:, None] - lp[:, 1:]).reshape(n, n_r, n_f)
    changed = (pred_all[:, 1:] != predicted[:, None]).reshape(n, n_r, n_f)
    if settings.cri_fill is None:
        cri = jnp.full((n,), jnp.nan, logp0.dtype)
        undefined = jnp.ones((n,), bool)
    else:
        fi = settings.fills.index(settings.cri_fill)
        ci, xi = settings.regions.index("cell"), settings.regions.index("context")
        cri, undefined = context_reliance_index(drops[:, xi, fi], drops[:, ci, fi], settings.eps)
        # An empty region's zero drop is no measurement, so no index from it.
        undefined = undefined | empty[:, ci] | empty[:, xi]
        cri = jnp.where(undefined, jnp.nan, cri)
    return RelianceResult(logp0=logp0, target=target, predicted=predicted, drops=drops, changed=changed,
                          empty=empty, cri=cri, cri_undefined=undefined, regions=settings.regions,
                          fills=settings.fills)


def _as_partial(logits_fn) -> Partial:
    # A Partial is a pytree whose arrays are traced arguments and whose function is part of
    # the jit cache key, so one compiled core serves every call with the same function.
    return logits_fn if isinstance(logits_fn, Partial) else Partial(logits_fn)


def reliance_batch(logits_fn: LogitsFn, images: jax.Array, masks: jax.Array, keys: jax.Array,
                   targets: jax.Array, donors: jax.Array | None = None, *,
                   settings: RelianceSettings = RelianceSettings()) -> RelianceResult:
    """The jitted core of `reliance`: one batch, no host-side checks, one forward.

    Args:
      logits_fn: ``(images (B, *S, C), masks (B, *S)) -> logits (B, K)``. It gets every
        variant with the mask of the crop it came from. A `jax.tree_util.Partial` passes
        its bound arrays (e.g. model variables) as traced arguments and is compiled once
        per function; a plain callable is wrapped in one and its closed-over arrays become
        compile-time constants.
      images: ``(N, *S, C)``; masks: ``(N, *S)`` codes; keys: ``(N,)`` `jax.random` keys,
        one per cell; targets: ``(N,)`` int, -1 = predicted class; donors: ``(N, *S, C)``
        or None (needed by "swap": cell i takes ``donors[i]``'s voxels).
      settings: `RelianceSettings` (static: one compilation per setting and shape).

    Returns:
      `RelianceResult`. The forward sees ``N · (1 + n_regions · n_fills)`` crops.
    """
    if "swap" in settings.fills and donors is None:
        raise ValueError("fill 'swap' needs donors: (N, *S, C) crops, cell i takes donors[i]'s voxels")
    return _reliance_jit(_as_partial(logits_fn), images, masks, keys, targets,
                         images if donors is None else donors, settings=settings)


def cell_keys(key: jax.Array, rows) -> jax.Array:
    """One key per cell ``(len(rows),)``: ``fold_in(key, row)``, so a cell's fills depend on its
    row in the dataset, not on how the rows were batched or sharded."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(rows))


def _cell_keys(key, n: int) -> jax.Array:
    """``(n,)`` keys from one key (cell i gets ``fold_in(key, i)``) or ``(n,)`` keys as they are."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    single = key.ndim == (0 if typed else 1)
    if single:
        return cell_keys(key, jnp.arange(n))
    if key.shape[0] != n:
        raise ValueError(f"{key.shape[0]} keys for {n} cells; pass one key or one per cell")
    return key


def _check_batch(images, masks, targets, donors) -> None:
    if images.ndim not in (4, 5):
        raise ValueError(f"images have shape {tuple(images.shape)}; expected (N, Z, Y, X, C) or (N, Y, X, C)")
    if tuple(masks.shape) != tuple(images.shape[:-1]):
        raise ValueError(f"masks have shape {tuple(masks.shape)}; expected {tuple(images.shape[:-1])} "
                         f"(the images' shape {tuple(images.shape)} without the channel axis)")
    if donors is not None and tuple(donors.shape) != tuple(images.shape):
        raise ValueError(f"donors have shape {tuple(donors.shape)}; expected the images' {tuple(images.shape)}")
    if targets is not None and np.shape(targets) != (images.shape[0],):
        raise ValueError(f"targets have shape {np.shape(targets)}; expected ({images.shape[0]},), -1 = predicted")
    lo, hi = (int(v) for v in _code_range(masks))
    if lo < 0 or hi > 2:
        raise ValueError(f"masks hold codes in [{lo}, {hi}]; expected 0 = background, 1 = central cell, "
                         "2 = other cells (a label image must be turned into codes per crop first)")


@jax.jit
def _code_range(masks):
    return jnp.min(masks), jnp.max(masks)


def _chunks(n: int, batch_size: int | None):
    """``(index, valid count)`` per chunk: a slice, or for a short last chunk an index array
    padded with its final cell, so every chunk has one shape and the core compiles once."""
    size = n if batch_size is None else max(1, min(int(batch_size), n))
    for start in range(0, n, size):
        stop = min(start + size, n)
        if stop - start == size:
            yield slice(start, stop), size
        else:
            yield np.concatenate([np.arange(start, stop), np.full(size - (stop - start), stop - 1)]), stop - start


def _over_chunks(n: int, batch_size: int | None, call):
    """``call(index)`` over `_chunks` of N cells, the padding dropped, the chunks' pytrees joined."""
    parts = [jax.tree.map(lambda a, valid=valid: a[:valid], call(idx)) for idx, valid in _chunks(n, batch_size)]
    return parts[0] if len(parts) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *parts)


def reliance(logits_fn: LogitsFn, images, masks, *, key, targets=None, donors=None,
             settings: RelianceSettings = RelianceSettings(), batch_size: int | None = None) -> RelianceResult:
    """Counterfactual reliance of each cell on its background, neighbours, cell and context.

    For each cell, ``target`` = predicted class unless `targets` names one (-1 =
    predicted); ``logp0`` = its log-softmax on the crop as it is; for every (region, fill)
    of `settings` the drop ``logp0 − logp(crop with region replaced by fill)``. The
    variants of a chunk and its originals go through `logits_fn` as one batch.

    Args:
      logits_fn: ``(images (B, *S, C), masks (B, *S)) -> logits (B, K)``; see
        `reliance_batch` (use `efficientnet_logits` or `model_reliance` for a model).
      images: ``(N, Z, Y, X, C)`` (2D: ``(N, Y, X, C)``) float crops, channels last.
      masks: ``(N, Z, Y, X)`` (2D: ``(N, Y, X)``) codes 1 cell, 2 other cells, 0 background.
      key: one `jax.random` key (cell i uses ``fold_in(key, i)``) or ``(N,)`` keys, one
        per cell; a cell's noise depends only on its key, region and fill.
      targets: ``(N,)`` class per cell, -1 or None = predicted.
      donors: ``(N, *S, C)`` donor crops for "swap" (cell i takes ``donors[i]``'s voxels),
        e.g. other cells' crops from control wells.
      settings: `RelianceSettings`.
      batch_size: cells per forward (each forward holds ``batch_size · (1 + n_regions ·
        n_fills)`` crops); None = all at once.

    Returns:
      `RelianceResult` with per-cell arrays; ``cri`` the context-reliance index.
    """
    images = jnp.asarray(images)
    masks = jnp.asarray(masks)
    n = images.shape[0]
    _check_batch(images, masks, targets, donors)
    if "swap" in settings.fills and donors is None:
        raise ValueError("fill 'swap' needs donors: (N, *S, C) crops, cell i takes donors[i]'s voxels")
    keys = _cell_keys(key, n)
    targets = jnp.full((n,), -1, jnp.int32) if targets is None else jnp.asarray(targets, jnp.int32)
    donors = None if donors is None else jnp.asarray(donors, images.dtype)
    fn = _as_partial(logits_fn)
    return _over_chunks(n, batch_size, lambda idx: reliance_batch(
        fn, images[idx], masks[idx], keys[idx], targets[idx], None if donors is None else donors[idx], settings=settings))


@dataclasses.dataclass(frozen=True)
class _EfficientNetLogits:
    # Hashable by value (the model is a frozen Module), so every Partial built from the same
    # architecture shares one compiled core.
    model: EfficientNet

    def __call__(self, variables, images, masks):
        return self.model.apply(variables, images, train=False)


def efficientnet_logits(model: EfficientNet, variables) -> Partial:
    """``logits_fn`` of an `EfficientNet` for `reliance`: ``(images, masks) -> (B, K)``
    logits with BatchNorm in inference mode (masks unused), variables traced, not baked in."""
    return Partial(_EfficientNetLogits(model), variables)


def model_reliance(model: EfficientNet, variables, images, masks, *, key, targets=None, donors=None,
                   settings: RelianceSettings = RelianceSettings(), batch_size: int | None = None
                   ) -> RelianceResult:
    """`reliance` of an `EfficientNet` with ``{"params", "batch_stats"}`` `variables`
    (BatchNorm in inference mode); images ``(N, *S, C)``, masks ``(N, *S)``, other
    arguments as `reliance`."""
    check_images(jnp.asarray(images), model.config)
    return reliance(efficientnet_logits(model, variables), images, masks, key=key, targets=targets,
                    donors=donors, settings=settings, batch_size=batch_size)


# ----------------------------------------------------------------------------- fill sanity


@dataclasses.dataclass(frozen=True)
class FillSanity:
    """How much each fill alone moves control cells when their context is replaced.

    Control cells carry no treatment signal, in the cell or around it, so replacing their
    context should leave them predicted as controls. A fill that moves them measures the
    model's reaction to the fill (an out-of-distribution artefact), not reliance on
    context: its drops are too strong to read, on any cell.

    Attributes:
      fills: fill names.
      mean_abs_change: ``(n_fills,)`` mean over cells of ``|Δ log p(control class)|`` (nats).
      frac_changed: ``(n_fills,)`` fraction of cells whose predicted class changes.
      n_cells: control cells used (those with a non-empty context).
    """

    fills: tuple[str, ...]
    mean_abs_change: np.ndarray
    frac_changed: np.ndarray
    n_cells: int

    def too_strong(self, max_abs_change: float = 0.1, max_frac_changed: float = 0.05) -> tuple[str, ...]:
        """Fills whose effect on controls exceeds either bound (defaults: 0.1 nats ≈ a 10 %
        change of the control probability; 5 % of controls re-classified). Judgement
        calls: set them from the drops you intend to read."""
        bad = (self.mean_abs_change > max_abs_change) | (self.frac_changed > max_frac_changed)
        return tuple(f for f, b in zip(self.fills, bad) if b)

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {f: {"mean_abs_change": float(a), "frac_changed": float(c)}
                for f, a, c in zip(self.fills, self.mean_abs_change, self.frac_changed)}


def fill_sanity(logits_fn: LogitsFn, images, masks, control_class: int, *, key,
                fills: Sequence[str] = FILLS, fill_settings: FillSettings = FillSettings(),
                batch_size: int | None = None) -> FillSanity:
    """Effect of each fill by itself on control cells (see `FillSanity`).

    The context (background + neighbours) of control cell i is replaced by each fill; for
    "swap" by the context voxels of control cell ``(i + 1) mod N`` (another control, never
    itself). The target is `control_class`.

    Args:
      logits_fn: as `reliance` (e.g. `efficientnet_logits(model, variables)`).
      images: ``(N, *S, C)`` crops of control cells; masks: ``(N, *S)`` codes.
      control_class: the class index of controls.
      key: `jax.random` key (noise); fills: names of `FILLS`; fill_settings: `FillSettings`.
      batch_size: as `reliance`.

    Returns:
      `FillSanity`; its means are over the cells with a non-empty context (NaN if none).
    """
    fills = tuple(fills)
    images = jnp.asarray(images)
    n = images.shape[0]
    if "swap" in fills and n < 2:
        raise ValueError("the 'swap' sanity check needs at least 2 control cells (a cell is never its own donor)")
    settings = RelianceSettings(regions=("context",), fills=fills, fill=fill_settings, cri_fill=None)
    out = reliance(logits_fn, images, masks, key=key, targets=jnp.full((n,), int(control_class), jnp.int32),
                   donors=jnp.roll(images, -1, axis=0) if "swap" in fills else None, settings=settings,
                   batch_size=batch_size)
    keep = ~np.asarray(out.empty[:, 0])
    used = int(keep.sum())
    drops = np.asarray(out.drops[:, 0, :], np.float64)[keep]
    changed = np.asarray(out.changed[:, 0, :], np.float64)[keep]
    nan = np.full(len(fills), np.nan)
    return FillSanity(
        fills=fills,
        mean_abs_change=np.abs(drops).mean(axis=0) if used else nan,
        frac_changed=changed.mean(axis=0) if used else nan,
        n_cells=used,
    )


# ----------------------------------------------------------------------------- interchange


def interchange_composites(image: jax.Array, mask: jax.Array, donor: jax.Array, donor_mask: jax.Array
                           ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The two composites of one cell and one donor crop; pure, jit- and vmap-able.

    ``U`` = the union of the two central cells (code 1 in ``mask`` or in ``donor_mask``):

    * context swap: ``U`` from ``image``, everything else from ``donor`` — this cell, with
      whatever surrounds it inside the donor's cell outline, on the donor's context;
    * cell swap: ``U`` from ``donor``, everything else from ``image`` — the donor's cell on
      this cell's context.

    Taking the union (not this cell's outline alone) keeps every voxel of the donor's own
    cell out of the context swap, so a model that reads only the central cell sees no
    donor cell there. Each composite's mask follows the same rule as its voxels (the codes
    of the crop each voxel came from).

    Args:
      image, donor: ``(Z, Y, X, C)`` (2D: ``(Y, X, C)``) crops, channels last.
      mask, donor_mask: ``(Z, Y, X)`` (2D: ``(Y, X)``) codes 1 cell, 2 other cells, 0 background.

    Returns:
      ``(context_swap, context_swap_mask, cell_swap, cell_swap_mask)``; every voxel is a
      bit-identical copy from ``image`` or ``donor`` (``donor`` cast to ``image``'s dtype).
    """
    if mask.shape != image.shape[:-1] or donor.shape != image.shape or donor_mask.shape != mask.shape:
        raise ValueError(f"interchange needs image, donor (*S, C) and masks (*S) of one shape; got image "
                         f"{image.shape}, mask {mask.shape}, donor {donor.shape}, donor_mask {donor_mask.shape}")
    union = (mask == CENTRAL) | (donor_mask == CENTRAL)
    donor = donor.astype(image.dtype)
    donor_mask = donor_mask.astype(mask.dtype)
    u = union[..., None]
    return (jnp.where(u, image, donor), jnp.where(union, mask, donor_mask),
            jnp.where(u, donor, image), jnp.where(union, donor_mask, mask))


@struct.dataclass
class InterchangeResult:
    """Context and cell swaps of N cells with D donors each (`interchange`).

    With ``a`` the class predicted for the cell, ``b`` the class predicted for a donor and
    ``m(x) = logit_b(x) − logit_a(x)`` (= log p(b|x) − log p(a|x)), per (cell, donor):
    ``span = m(donor) − m(cell)`` (≥ 0: how far apart the model puts the two crops),
    ``shift_context = m(context swap) − m(cell)``, ``shift_cell = m(cell swap) − m(cell)``.

    Attributes:
      predicted: ``(N,)`` int32 class of each cell's crop as it is.
      donor_predicted: ``(N, D)`` int32 class of each donor crop.
      valid: ``(N, D)`` bool, the donor is predicted another class (``b ≠ a``); pairs of one
        class have no direction to follow and are left out of every sum.
      span, shift_context, shift_cell: ``(N, D)`` float32, see above.
      follow_context: ``(N,)`` ``Σ shift_context / Σ span`` over valid donors: the share of
        the way from this cell's prediction to the donors' that the model goes when only
        the context is the donor's. 0 = the context does not matter, 1 = the prediction
        follows the context entirely. Can leave [0, 1] (overshoot, or a move away). NaN
        where no donor is valid.
      follow_cell: ``(N,)`` the same for the cell swap (1 = the prediction follows the cell).
      index: ``(N,)`` interchange context-reliance index in [0, 1], see `interchange`.
      undefined: ``(N,)`` bool, no valid donor or no follow above eps (index NaN).
    """

    predicted: jax.Array
    donor_predicted: jax.Array
    valid: jax.Array
    span: jax.Array
    shift_context: jax.Array
    shift_cell: jax.Array
    follow_context: jax.Array
    follow_cell: jax.Array
    index: jax.Array
    undefined: jax.Array

    def __len__(self) -> int:
        return int(self.predicted.shape[0])


def interchange_index(follow_context: jax.Array, follow_cell: jax.Array, eps: float = 1e-3
                      ) -> tuple[jax.Array, jax.Array]:
    """Interchange context-reliance index ``(N,)`` from two follow fractions ``(N,)``.

    With ``c(f) = min(f, 1) if f > eps else 0`` (a follow at or below `eps`, or a move
    away from the donor, is no evidence; an overshoot counts as a full follow)::

        index = c(follow_context) / (c(follow_context) + c(follow_cell))

    0 = the prediction follows the cell and not the context, 1 = the context and not the
    cell, 0.5 = both equally. Both ``c`` = 0, or a NaN follow: NaN and ``undefined``.
    Returns ``(index, undefined)``.
    """
    # The same share as the fill-based index, of follows capped at a full follow (NaN stays NaN).
    return context_reliance_index(jnp.minimum(follow_context, 1), jnp.minimum(follow_cell, 1), eps)


@functools.partial(jax.jit, static_argnames=("eps",))
def _interchange_jit(logits_fn, images, masks, donors, donor_masks, *, eps: float):
    n, d = donors.shape[:2]
    per_cell = jax.vmap(interchange_composites, in_axes=(None, None, 0, 0))
    ctx, ctx_m, cell, cell_m = jax.vmap(per_cell)(images, masks, donors, donor_masks)
    # One forward, cell-major: original, D donors, D context swaps, D cell swaps.
    x = jnp.concatenate([images[:, None], donors.astype(images.dtype), ctx, cell], axis=1)
    m = jnp.concatenate([masks[:, None], donor_masks.astype(masks.dtype), ctx_m, cell_m], axis=1)
    v = 1 + 3 * d
    logits = logits_fn(x.reshape(n * v, *images.shape[1:]), m.reshape(n * v, *masks.shape[1:]))
    logits = logits.reshape(n, v, -1).astype(jnp.promote_types(logits.dtype, jnp.float32))
    original = jnp.broadcast_to(logits[:, :1], (n, d, logits.shape[-1]))  # (N, D, K)
    donor, ctx_swap, cell_swap = logits[:, 1:1 + d], logits[:, 1 + d:1 + 2 * d], logits[:, 1 + 2 * d:]
    a = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)  # (N,)
    b = jnp.argmax(donor, axis=-1).astype(jnp.int32)  # (N, D)

    def margin(z):  # (N, D, K) -> (N, D): logit_b − logit_a for each donor's class b
        # Logit differences, not log-probabilities: the log-softmax normaliser cancels, and a
        # logit that does not change gives a shift of exactly 0.
        return (jnp.take_along_axis(z, b[..., None], axis=-1) - jnp.take_along_axis(z, a[:, None, None], axis=-1))[..., 0]

    m0 = margin(original)
    span = margin(donor) - m0
    shift_ctx = margin(ctx_swap) - m0
    shift_cell = margin(cell_swap) - m0
    valid = b != a[:, None]
    total = jnp.sum(jnp.where(valid, span, 0), axis=1)
    ok = total > 0
    safe = jnp.where(ok, total, 1)
    follow_ctx = jnp.where(ok, jnp.sum(jnp.where(valid, shift_ctx, 0), axis=1) / safe, jnp.nan)
    follow_cell = jnp.where(ok, jnp.sum(jnp.where(valid, shift_cell, 0), axis=1) / safe, jnp.nan)
    index, undefined = interchange_index(follow_ctx, follow_cell, eps)
    return InterchangeResult(predicted=a, donor_predicted=b, valid=valid, span=span, shift_context=shift_ctx,
                             shift_cell=shift_cell, follow_context=follow_ctx, follow_cell=follow_cell,
                             index=index, undefined=undefined)


def interchange_batch(logits_fn: LogitsFn, images: jax.Array, masks: jax.Array, donors: jax.Array,
                      donor_masks: jax.Array, *, eps: float = 1e-3) -> InterchangeResult:
    """The jitted core of `interchange`: one batch, no host-side checks, one forward of
    ``N · (1 + 3·D)`` crops. Arguments as `interchange` (``logits_fn`` as in `reliance_batch`);
    arrays may be sharded along their leading axis."""
    return _interchange_jit(_as_partial(logits_fn), images, masks, donors, donor_masks, eps=float(eps))


def interchange(logits_fn: LogitsFn, images, masks, donors, donor_masks, *, eps: float = 1e-3,
                batch_size: int | None = None) -> InterchangeResult:
    """Does each cell's prediction follow its cell or its context? Context and cell swaps
    with donors of other classes (a per-cell form of the "mixed-next" background test of
    Xiao et al., ICLR 2021).

    Fills (`reliance`) ask what is lost when a region is *removed*; for a context whose
    evidence is an absence (a control cell's plain background) removal says nothing, and
    drops in nats grow with the model's confidence, so they rank confident models above
    unsure ones whatever they read. A swap puts *another class's* context (or cell) in
    place and measures how far the prediction moves toward that class, as a share of the
    distance between the two crops' predictions (`InterchangeResult`): free of the
    model's confidence, and every voxel shown is a real voxel of one of two crops
    (`interchange_composites`; the seam between them is the only artefact).

    Choose donors the model predicts as other classes than the cell (e.g. cells of each
    other class from training wells): a donor predicted as the cell's own class is left
    out (``valid``), and a cell with no valid donor gets NaN.

    Args:
      logits_fn: ``(images (B, *S, C), masks (B, *S)) -> logits (B, K)`` (`efficientnet_logits`
        for a model); it gets each composite with the composite's mask.
      images: ``(N, Z, Y, X, C)`` (2D: ``(N, Y, X, C)``) float crops, channels last.
      masks: ``(N, Z, Y, X)`` (2D: ``(N, Y, X)``) codes 1 cell, 2 other cells, 0 background.
      donors: ``(N, D, *S, C)``: cell i is swapped with each of ``donors[i]``.
      donor_masks: ``(N, D, *S)`` the donors' codes (1 = the donor's own central cell).
      eps: follows at or below it count as none in the index (`interchange_index`).
      batch_size: cells per forward (a forward holds ``batch_size · (1 + 3·D)`` crops);
        None = all at once.

    Returns:
      `InterchangeResult`; ``index`` (0 = follows the cell, 1 = follows the context) is
      `interchange_index` of ``follow_context`` and ``follow_cell``.
    """
    images, masks = jnp.asarray(images), jnp.asarray(masks)
    donors, donor_masks = jnp.asarray(donors), jnp.asarray(donor_masks)
    _check_batch(images, masks, None, None)
    n = images.shape[0]
    if donors.ndim != images.ndim + 1 or donors.shape[0] != n or tuple(donors.shape[2:]) != tuple(images.shape[1:]):
        raise ValueError(f"donors have shape {tuple(donors.shape)}; expected (N, D, *S, C) = ({n}, D, "
                         f"{', '.join(map(str, images.shape[1:]))})")
    if tuple(donor_masks.shape) != tuple(donors.shape[:-1]):
        raise ValueError(f"donor_masks have shape {tuple(donor_masks.shape)}; expected {tuple(donors.shape[:-1])} "
                         "(the donors' shape without the channel axis)")
    if donors.shape[1] < 1:
        raise ValueError("interchange needs at least one donor per cell")
    fn = _as_partial(logits_fn)
    return _over_chunks(n, batch_size, lambda idx: _interchange_jit(
        fn, images[idx], masks[idx], donors[idx], donor_masks[idx], eps=float(eps)))


def model_interchange(model: EfficientNet, variables, images, masks, donors, donor_masks, *, eps: float = 1e-3,
                      batch_size: int | None = None) -> InterchangeResult:
    """`interchange` of an `EfficientNet` with ``{"params", "batch_stats"}`` `variables`
    (BatchNorm in inference mode); arguments and shapes as `interchange`."""
    check_images(jnp.asarray(images), model.config)
    return interchange(efficientnet_logits(model, variables), images, masks, donors, donor_masks, eps=eps,
                       batch_size=batch_size)


# ----------------------------------------------------------------------------- randomisation


def randomized_variables(model_config: ModelConfig, key: jax.Array, calib_images) -> dict:
    """The model-randomisation baseline's weights (Adebayo et al. 2018): the architecture of
    `model_config` re-initialised by `gradcamo_jax.init` from `key`, with its
    BatchNorm statistics calibrated on ``calib_images`` ``(B, *S, C)`` by
    `gradcamo_jax.calibrate_batch_stats` (without it inference-mode activations vanish and
    CAMs are rounding noise). Deterministic per key and calibration batch. Returns
    ``{"params", "batch_stats"}`` for crops shaped like ``calib_images[0]``.
    """
    calib = jnp.asarray(calib_images)
    variables = init(model_config, key, tuple(calib.shape[1:]))
    return calibrate_batch_stats(EfficientNet(model_config), variables, calib)


def corrected_gradcamo(gradcamo: jax.Array, gradcamo_random: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Baseline-corrected Grad-CAMO ``(N,)`` of scores ``g`` (trained) and ``r`` (random model)::

        corrected = (g − r) / (1 − r)   if g > r     share of the headroom above the random
                                                     model that the trained model takes
                  = (g − r) / r         if g < r     share of the random model's score lost
                  = 0                   if g = r

    in [−1, 1]: 0 = no better than a network that learned nothing (image structure and
    architecture alone put that much attention on the cell), 1 = all attention on the cell,
    −1 = none while the random model had some. The plain difference ``g − r`` is capped at
    ``1 − r``, which is small for large or isolated cells (the random model already scores
    high there), so equal differences mean different things across cells; normalising by
    the room available makes the scale the same for every cell (as Cohen's kappa corrects
    agreement for chance). NaN in either score gives NaN and ``undefined = True``.
    Returns ``(corrected, undefined)``.
    """
    g = jnp.asarray(gradcamo)
    r = jnp.asarray(gradcamo_random)
    undefined = jnp.isnan(g) | jnp.isnan(r)
    d = g - r
    # Where g > r, r < 1; where g < r, r > 0: the selected denominator is never 0.
    denom = jnp.where(d > 0, 1 - r, r)
    out = jnp.where(d == 0, 0.0, d / jnp.where(d == 0, 1, denom))
    return jnp.where(undefined, jnp.nan, out), undefined


@struct.dataclass
class RandomBaseline:
    """Grad-CAMO of a trained model beside the same architecture with random weights.

    Attributes (all ``(N,)``):
      gradcamo: the trained model's Grad-CAMO.
      gradcamo_random: the random model's Grad-CAMO for the same crops, layer, method and
        target class (mean over draws, NaN-skipping).
      difference: ``gradcamo − gradcamo_random``.
      corrected: `corrected_gradcamo`, in [−1, 1], 0 = no better than random.
      undefined: either score NaN (a map summing to 0).
      target: class explained (the trained model's prediction unless given).
    """

    gradcamo: jax.Array
    gradcamo_random: jax.Array
    difference: jax.Array
    corrected: jax.Array
    undefined: jax.Array
    target: jax.Array


def random_baseline(model: EfficientNet, variables, images, masks, *, random_variables,
                    layer: str = "stage5", method: str | CamWeights = "gradcam", targets=None) -> RandomBaseline:
    """Per-cell Grad-CAMO of `model` and of its randomised twin, and the corrected score.

    Both are `gradcamo_jax.explain` at the same `layer` with the same `method`; the random
    model explains the class the trained model explains (its own prediction would be an
    arbitrary class), so the two maps differ only in the weights.

    Args:
      model, variables: the trained `EfficientNet` and its ``{"params", "batch_stats"}``.
      images: ``(N, Z, Y, X, C)`` (2D: ``(N, Y, X, C)``); masks: ``(N, Z, Y, X)`` codes.
      random_variables: variables of the same architecture from `randomized_variables`, or
        a sequence of them (draws from several keys); the random score is then the per-cell
        mean over draws (NaN-skipping), which lowers the baseline's own noise. Made once and
        passed in, so a dataset scored in batches uses one random model throughout.
      layer, method, targets: as `explain` (-1 or None = predicted by the trained model).

    Returns:
      `RandomBaseline`.
    """
    draws = [random_variables] if isinstance(random_variables, dict) else list(random_variables)
    if not draws:
        raise ValueError("random_baseline needs at least one set of random variables (see randomized_variables)")
    trained = explain(model, variables, images, masks, layer=layer, targets=targets, method=method)
    scores = jnp.stack([explain(model, rv, images, masks, layer=layer, targets=trained.targets,
                                method=method).scores.cell for rv in draws])
    seen = jnp.sum(~jnp.isnan(scores), axis=0)
    rand = jnp.where(seen > 0, jnp.nansum(scores, axis=0) / jnp.maximum(seen, 1), jnp.nan)
    g = trained.scores.cell
    corrected, undefined = corrected_gradcamo(g, rand)
    return RandomBaseline(gradcamo=g, gradcamo_random=rand, difference=g - rand, corrected=corrected,
                          undefined=undefined, target=trained.targets)


__all__ = [
    "FILLS",
    "REGIONS",
    "FillSanity",
    "FillSettings",
    "InterchangeResult",
    "RandomBaseline",
    "RelianceResult",
    "RelianceSettings",
    "context_reliance_index",
    "corrected_gradcamo",
    "efficientnet_logits",
    "fill_region",
    "fill_sanity",
    "blur_matrix",
    "cell_keys",
    "gaussian_blur",
    "interchange",
    "interchange_batch",
    "interchange_composites",
    "interchange_index",
    "model_interchange",
    "model_reliance",
    "random_baseline",
    "randomized_variables",
    "region_mask",
    "region_moments",
    "reliance",
    "reliance_batch",
]
