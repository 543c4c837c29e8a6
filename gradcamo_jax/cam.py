"""Grad-CAM family and the one-pass `explain`: logits, features, CAMs and Grad-CAMO.

The network runs on the whole batch (one forward to the layer, one vjp of the rest
with a one-hot cotangent per cell; see `layer_gradient`); the maps, their upsampling
and the scores are written for one crop and batched with `jax.vmap`, `jax.jit`
outermost. For a crop ``x`` ``(*S, C)`` and a named layer with activation
``A`` ``(*s, K)``::

    logits, vjp = jax.vjp(forward_from(·, layer), A)     # only the network after `layer`
    G = vjp(onehot(target))                              # ∂ y_target / ∂ A, y = pre-softmax logit
    L = ReLU(Σ_k W_k · A_k)                              # W from the method: (K,) or (*s, K)
    cam = resize(L, S, linear)                           # trilinear in 3D, bilinear in 2D

A CAM method supplies only its weights ``W = method(A, G)`` (pytorch-grad-cam's
convention), so new methods plug in through `CAM_METHODS`. Maps are never
min-max normalised: Grad-CAMO is a ratio and a shift would change it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gradcamo_jax.config import STAGE_NAMES
from gradcamo_jax.metric import GradCAMOResult, scores
from gradcamo_jax.models.efficientnet import EfficientNet, check_images, layer_index

CamWeights = Callable[[jax.Array, jax.Array], jax.Array]
"""``(A, G) -> W``: activation and gradient ``(*s, K)`` of one crop → weights broadcastable to A."""

_EPS = 1e-7


def _spatial(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def gradcam_weights(a: jax.Array, g: jax.Array) -> jax.Array:
    """Grad-CAM (Selvaraju et al. 2017): α_k = mean_v G_k(v). Returns ``(1, …, 1, K)``."""
    return jnp.mean(g, axis=_spatial(g), keepdims=True)


def gradcam_pp_weights(a: jax.Array, g: jax.Array) -> jax.Array:
    """Grad-CAM++ (Chattopadhay et al. 2018) with the exponential-output closed form
    used by pytorch-grad-cam: α = G² / (2G² + Σ_v A · G³), w_k = Σ_v α ReLU(G). ``(1, …, 1, K)``."""
    g2 = g * g
    denom = 2 * g2 + jnp.sum(a, axis=_spatial(a), keepdims=True) * g2 * g + _EPS
    alpha = jnp.where(g != 0, g2 / denom, 0)
    return jnp.sum(alpha * jax.nn.relu(g), axis=_spatial(g), keepdims=True)


def hirescam_weights(a: jax.Array, g: jax.Array) -> jax.Array:
    """HiResCAM (Draelos & Carin 2020): element-wise G, so the map is Σ_k G_k ⊙ A_k. ``(*s, K)``."""
    return g


def layercam_weights(a: jax.Array, g: jax.Array) -> jax.Array:
    """LayerCAM (Jiang et al. 2021): element-wise ReLU(G). ``(*s, K)``."""
    return jax.nn.relu(g)


def xgradcam_weights(a: jax.Array, g: jax.Array) -> jax.Array:
    """XGrad-CAM (Fu et al. 2020): w_k = Σ_v G_k A_k / Σ_v A_k. ``(1, …, 1, K)``."""
    axes = _spatial(a)
    return jnp.sum(g * a, axis=axes, keepdims=True) / (jnp.sum(a, axis=axes, keepdims=True) + _EPS)


CAM_METHODS: dict[str, CamWeights] = {
    "gradcam": gradcam_weights,
    "gradcam++": gradcam_pp_weights,
    "hirescam": hirescam_weights,
    "layercam": layercam_weights,
    "xgradcam": xgradcam_weights,
}


def get_method(method: str | CamWeights) -> CamWeights:
    if callable(method):
        return method
    try:
        return CAM_METHODS[method]
    except KeyError:
        raise ValueError(f"unknown CAM method {method!r}; expected one of {sorted(CAM_METHODS)} or a callable") from None


def cam_from_gradients(a: jax.Array, g: jax.Array, method: str | CamWeights = "gradcam") -> jax.Array:
    """Raw (layer-resolution) map ``(*s,)`` = ReLU(Σ_k W_k A_k) of one crop; ``a``, ``g``: ``(*s, K)``.
    Computed in float32 at least (bf16 activations are promoted)."""
    acc = jnp.promote_types(a.dtype, jnp.float32)
    a = a.astype(acc)
    g = g.astype(acc)
    w = get_method(method)(a, g)
    return jax.nn.relu(jnp.sum(w * a, axis=-1))


def upsample(cam: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Resize one map ``(*s,)`` to ``shape`` with (tri/bi)linear interpolation, half-pixel centres
    (as ``torch.nn.functional.interpolate(..., align_corners=False)``). Non-negative in, non-negative out."""
    shape = tuple(int(n) for n in shape)
    if cam.shape == shape:
        return cam
    return jax.image.resize(cam, shape, method="linear", antialias=False)


def batch_cams(a: jax.Array, g: jax.Array, method: str | CamWeights = "gradcam",
               shape: Sequence[int] | None = None) -> jax.Array:
    """`cam_from_gradients` of every cell, vmapped: ``a``, ``g`` ``(N, *s, K)`` → maps
    ``(N, *s)``, or ``(N, *shape)`` upsampled when `shape` is given."""
    def one(a1, g1):
        cam = cam_from_gradients(a1, g1, method)
        return cam if shape is None else upsample(cam, shape)

    return jax.vmap(one)(a, g)


@struct.dataclass
class Explanation:
    """Output of `explain` / `grad_cam` for N crops.

    Attributes:
      logits: ``(N, num_classes)`` float32, pre-softmax.
      targets: ``(N,)`` int32, the class each map explains (the prediction unless given).
      features: ``{layer: (N, C_layer)}`` float32, spatially averaged activations.
      scores: `GradCAMOResult` with ``(N,)`` fields, or None when no masks were given.
      cam: ``(N, *S)`` maps at crop resolution (or ``(N, *s)`` at layer resolution when not
        upsampled), or None when not requested.
    """

    logits: jax.Array
    targets: jax.Array
    features: dict[str, jax.Array]
    scores: GradCAMOResult | None
    cam: jax.Array | None


def layer_gradient(model, variables, images, targets, layer: str):
    """The pieces every CAM of a batch is built from, with one batched forward and one vjp.

    images ``(N, *S, C)``; targets ``(N,)`` class indices, -1 (or None for all) = the
    predicted class. Returns
    ``(logits (N, K), targets (N,), features, later, a, g)``: ``features``/``later`` the named
    activations before/after `layer` (``{name: (N, *s', K')}``), ``a`` the activation at
    `layer` and ``g`` ``(N, *s, K_layer)`` with ``g[i] = ∂ logit_i[targets[i]] / ∂ a[i]``.
    Only the network after `layer` is differentiated.

    One vjp of the whole batch with the cotangent ``onehot(targets)`` gives every cell its own
    gradient because, with BatchNorm in inference mode, no cell's logits depend on another
    cell's activation: ``∂ Σ_j logit_j[t_j] / ∂ a_i = ∂ logit_i[t_i] / ∂ a_i``. That equals
    ``vmap`` of the per-crop gradient (tests/test_cam.py checks single-crop calls against
    batches in any order) and runs the trunk on the batch, as the plain forward does: under
    vmap the convolutions saw batch-1 shapes and B0's explain took 1.3× its forward.
    """
    feats = model.apply(variables, images, upto=layer, method="features")
    a = feats[layer]
    logits, vjp, later = jax.vjp(lambda act: model.apply(variables, act, layer, method="forward_from"), a,
                                 has_aux=True)
    predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    targets = predicted if targets is None else jnp.where(targets < 0, predicted, targets).astype(jnp.int32)
    (g,) = vjp(jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype))
    return logits, targets, feats, later, a, g


def _explain_batch(model, variables, images, masks, targets, *, layer, method, feature_layers, return_cam, resize):
    """Crops ``(N, *S, C)``, masks ``(N, *S)`` or None, targets ``(N,)`` (-1 = predicted)."""
    logits, targets, feats, later, a, g = layer_gradient(model, variables, images, targets, layer)
    cam = batch_cams(a, g, method, images.shape[1:-1] if resize else None)
    all_feats = {**feats, **later}
    pooled = {
        name: jnp.mean(all_feats[name].astype(logits.dtype), axis=tuple(range(1, images.ndim - 1)))
        for name in feature_layers
    }
    result = scores(cam, masks) if masks is not None else None
    return Explanation(logits=logits, targets=targets, features=pooled, scores=result, cam=cam if return_cam else None)


def soft_gradcamo(model: EfficientNet, variables, images: jax.Array, masks: jax.Array, targets: jax.Array, *,
                  layer: str, method: str | CamWeights = "gradcam") -> jax.Array:
    """Differentiable per-cell Grad-CAMO of `targets`, for a training penalty.

    images ``(N, *S, C)``, masks ``(N, *S)`` codes (1 = central cell), targets ``(N,)`` class
    indices (no -1 here: the penalty explains the true class). Returns ``(N,)``
    ``Σ cam·[mask = 1] / Σ cam`` with the map built exactly as in `explain` (BatchNorm in
    inference mode with the given ``batch_stats``), differentiable with respect to
    ``variables`` through both the activation and its gradient (a gradient of a gradient).
    Where a map sums to 0 the score is 0 (not NaN, which would poison the loss), so the
    penalty ``1 - score`` is at its maximum there; its gradient is then 0 through the ReLU.
    """
    _, _, _, _, a, g = layer_gradient(model, variables, images, targets, layer)
    r = scores(batch_cams(a, g, method, images.shape[1:-1]), masks)
    # The NaN of an undefined score sits in the branch `where` does not select, so no NaN
    # reaches the gradient.
    return jnp.where(r.cam_zero, 0.0, r.cell)


@functools.lru_cache(maxsize=64)
def make_explain_fn(
    model: EfficientNet,
    layer: str,
    method: str | CamWeights = "gradcam",
    *,
    feature_layers: tuple[str, ...] = (),
    return_cam: bool = False,
    with_masks: bool = True,
    resize: bool = True,
) -> Callable:
    """Jitted ``fn(variables, images, masks, targets) -> Explanation`` (masks may be None if
    ``with_masks=False``). The network runs on the batch, the maps per cell (vmap). Cached per setting,
    so repeated calls compile once per input shape. Works on sharded inputs: each cell is
    independent, so XLA partitions the batch axis across the mesh without communication."""
    layer_index(layer)
    for name in feature_layers:
        layer_index(name)
    method_fn = get_method(method)
    fn = functools.partial(
        _explain_batch,
        model,
        layer=layer,
        method=method_fn,
        feature_layers=tuple(feature_layers),
        return_cam=return_cam,
        resize=resize,
    )

    def batched(variables, images, masks, targets):
        return fn(variables, images, masks if with_masks else None, targets)

    return jax.jit(batched)


def _stem_channels(variables) -> int | None:
    try:
        return int(variables["params"]["stem"]["conv"]["kernel"].shape[-2])
    except (KeyError, TypeError):
        return None


def check_inputs(model: EfficientNet, variables, images, masks=None, targets=None, *, finite: bool = True) -> None:
    """Raise ValueError for inputs `explain` cannot score, naming expected and actual shapes
    and the first offending cell. ``finite=True`` scans the pixels (a host/device sync)."""
    cfg = model.config
    check_images(images, cfg, _stem_channels(variables))
    n = images.shape[0]
    if masks is not None and tuple(masks.shape) != tuple(images.shape[:-1]):
        raise ValueError(
            f"masks have shape {tuple(masks.shape)}; expected {tuple(images.shape[:-1])} "
            f"(the images' shape {tuple(images.shape)} without the channel axis)"
        )
    if targets is not None:
        t = np.asarray(targets)
        if t.shape != (n,):
            raise ValueError(f"targets have shape {t.shape}; expected ({n},), one class per cell (-1 = predicted)")
        if ((t < -1) | (t >= cfg.num_classes)).any():
            bad = int(np.argwhere((t < -1) | (t >= cfg.num_classes))[0][0])
            raise ValueError(f"target of cell {bad} is {int(t[bad])}; expected -1 or a class in [0, {cfg.num_classes})")
    if finite:
        ok = np.asarray(_finite_per_cell(jnp.asarray(images)))
        if not ok.all():
            bad = np.flatnonzero(~ok)
            raise ValueError(
                f"images of {bad.size} cell(s) have NaN/inf pixels (first: cell {int(bad[0])}); "
                "fix or drop them before scoring"
            )


@jax.jit
def _finite_per_cell(images):
    return jnp.all(jnp.isfinite(images), axis=tuple(range(1, images.ndim)))


def _targets_array(targets, n: int) -> jax.Array:
    if targets is None:
        return jnp.full((n,), -1, jnp.int32)
    return jnp.asarray(targets, jnp.int32)


def explain(
    model: EfficientNet,
    variables,
    images,
    masks,
    *,
    layer: str = "stage5",
    targets=None,
    method: str | CamWeights = "gradcam",
    feature_layers: Sequence[str] | None = None,
    return_cam: bool = False,
    check: bool = True,
) -> Explanation:
    """Logits, pooled features, CAMs and Grad-CAMO of a batch of crops in one jitted pass.

    Args:
      model: an `EfficientNet` (BatchNorm runs in inference mode).
      variables: ``{"params", "batch_stats"}``.
      images: ``(N, Z, Y, X, C)`` (3D) or ``(N, Y, X, C)`` (2D) float crops; may be a
        sharded `jax.Array` (batch over a mesh axis).
      masks: ``(N, Z, Y, X)`` / ``(N, Y, X)`` integer codes, 0 background, 1 central cell,
        2 other cells; or None to skip the scores.
      layer: named activation to explain (`gradcamo_jax.config.STAGE_NAMES`).
      targets: ``(N,)`` class per cell, -1 (or None for all) = the predicted class.
      method: a key of `CAM_METHODS` or a weights callable ``(A, G) -> W``.
      feature_layers: layers whose spatially pooled activations to return (default: `layer`).
      return_cam: also return the upsampled maps ``(N, *S)``.
      check: validate shapes, targets and pixel finiteness first (ValueError naming the cell).

    Returns:
      `Explanation` with ``scores.cell`` the per-cell Grad-CAMO ``(N,)``.
    """
    if check:
        check_inputs(model, variables, images, masks, targets)
    feature_layers = (layer,) if feature_layers is None else tuple(feature_layers)
    fn = make_explain_fn(model, layer, method, feature_layers=feature_layers, return_cam=return_cam,
                         with_masks=masks is not None, resize=True)
    masks = None if masks is None else jnp.asarray(masks)
    return fn(variables, images, masks, _targets_array(targets, images.shape[0]))


def grad_cam(
    model: EfficientNet,
    variables,
    images,
    *,
    layer: str = "stage5",
    targets=None,
    method: str | CamWeights = "gradcam",
    upsample_to_input: bool = True,
    check: bool = True,
) -> Explanation:
    """Class activation maps of a batch of crops (no masks needed).

    Args as `explain`. Returns an `Explanation` whose ``cam`` is ``(N, *S)`` (crop
    resolution) or ``(N, *s)`` (layer resolution when ``upsample_to_input=False``),
    with ``logits`` and ``targets``; ``scores`` is None.
    """
    if check:
        check_inputs(model, variables, images, None, targets)
    fn = make_explain_fn(model, layer, method, return_cam=True, with_masks=False, resize=upsample_to_input)
    return fn(variables, images, None, _targets_array(targets, images.shape[0]))


__all__ = [
    "CAM_METHODS",
    "Explanation",
    "GradCAMOResult",
    "STAGE_NAMES",
    "batch_cams",
    "cam_from_gradients",
    "explain",
    "grad_cam",
    "layer_gradient",
    "make_explain_fn",
    "soft_gradcamo",
    "upsample",
]
