"""Convolution primitives of the 2D/3D EfficientNet, with a formulation chosen per backend.

Layout is channels-last throughout:

* activations ``x``: ``(B, *S, C)`` with ``S = (X,)``, ``(Y, X)`` or ``(Z, Y, X)``;
* dense kernels ``w``: ``(*K, Cin, Cout)`` (flax ``nn.Conv`` layout);
* depthwise kernels ``w``: ``(*K, 1, C)`` (flax ``nn.Conv(feature_group_count=C)`` layout).

Padding is always symmetric ``k // 2`` per axis with odd kernels, so an axis of
length ``n`` with stride ``s`` comes out with ``ceil(n / s)`` positions, exactly as
PyTorch's ``Conv*d(padding=k // 2)``.

Why two formulations. On GPU/TPU ``lax.conv_general_dilated`` lowers to cuDNN / the
TPU convolution unit and is the right choice ("xla"). XLA:CPU has no good kernel for
grouped (depthwise) or few-channel convolutions (a depthwise 3×3×3 conv at
(8, 21, 64, 64, 96) takes seconds there; see BENCHMARKS.md, 'Measurements behind code
choices', conv.py module docstring), so "shifted" rewrites them:

* depthwise: a sum over kernel taps of strided slices of the zero-padded input times
  the tap's per-channel weights, which XLA fuses into one elementwise loop (small
  outputs and kernels of more than 27 taps: a loop over the first kernel axis, see
  `_depthwise_loop`); its kernel gradient is one variadic reduction of all taps' products;
* dense with kernel > 1 (the stem, few input channels): im2col — the taps' strided
  views stacked on the channel axis — then one matmul, block by block;
* 1×1: a (strided) slice and a matmul, for every impl except "xla"; its kernel gradient
  is blocked like the others (`_pointwise_matmul`).

Both kernel > 1 formulations are written as *valid* correlations of ``lax.pad(x, pads)``
(``pads`` per axis ``(low, high, interior)``). That family is closed under
differentiation: the input gradient is the same correlation of the cotangent, padded
and dilated, with the flipped kernel (`_transposed_geometry`), and the kernel gradient
is a "weight-gradient" correlation whose own derivatives are again members. Every
piece has a hand-written VJP built from the others, so gradients of any order stay on
the fast path. Forward mode (``jax.jvp``/``jacfwd``) is not available for "shifted"
kernels > 1 (they are ``jax.custom_vjp``); use ``impl="xla"`` for that.

Reductions whose taps would each re-read the whole input from memory (kernel
gradients, im2col) run as a loop over cache-sized blocks of output rows
(`_plan_blocks`): XLA:CPU does not tile across fusions, and 27 passes over a 250 MB
activation are memory-bound, several times slower than blocks (same section).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Impl = Literal["auto", "xla", "shifted"]

# Per spatial axis ``(low, high, interior)`` zero padding, as `lax.pad` takes it (low/high
# may be negative: a crop).
Pads = tuple[tuple[int, int, int], ...]

_IMPLS = ("auto", "xla", "shifted")
_SPATIAL_LETTERS = {1: "W", 2: "HW", 3: "DHW"}

# Bytes of one block of a blocked loop. Each block is read once per kernel tap, so it
# should stay in the per-core L2 (≥ 512 KiB on current x86) with room for the taps' copies.
_BLOCK_BYTES = 384 * 1024

# Bytes of im2col patches per block of the dense forward and kernel gradient
# (`_dense_fwd_impl`, `_dense_wgrad_impl`). Larger than `_BLOCK_BYTES` because each block
# ends in one matmul whose fixed cost dominates small blocks: a matmul of a few hundred
# patch rows runs at about half the rate of one of a few thousand, so one 64×64 output
# plane (2.2 MB of patches) per block makes the B0 stem and its kernel gradient faster
# than `_BLOCK_BYTES` blocks. See BENCHMARKS.md, 'Measurements behind code choices',
# `_DENSE_BLOCK_BYTES`.
_DENSE_BLOCK_BYTES = 2304 * 1024

# Kernels with more taps than this are always summed by `_depthwise_loop`: XLA:CPU's single
# fusion of a 5×5×5 kernel's 125 taps is several times slower than the loop over its first
# axis at every size tried. See BENCHMARKS.md, 'Measurements behind code choices',
# `_MAX_FUSED_TAPS`.
_MAX_FUSED_TAPS = 27

# Depthwise outputs up to this many bytes (accumulation dtype, whole array) are summed by
# `_depthwise_loop`; larger ones, with at most `_MAX_FUSED_TAPS` taps, by one fused tap sum.
# The loop speeds up the backward of the small late-stage outputs (8×2×4×4×1152, 1.2 MB)
# and slows down the first stages' 3×3×3 forward (8×11×64×64×32, 46 MB). See BENCHMARKS.md,
# 'Measurements behind code choices', `_LOOP_MAX_BYTES`.
_LOOP_MAX_BYTES = 4 * 2**20

# Depthwise kernel gradients whose input is at most this many bytes are one reduction over
# the whole array; larger ones loop over cache-sized blocks (`_depthwise_wgrad_impl`).
# Unblocked is faster for inputs of 1.4 and 5.9 MB and slower than blocks at 46 MB. See
# BENCHMARKS.md, 'Measurements behind code choices', `_WGRAD_WHOLE_MAX_BYTES`.
_WGRAD_WHOLE_MAX_BYTES = 8 * 2**20

# Interior-padded depthwise correlations (input gradients of strided convs) with outputs
# above this many bytes run as output phases (`_depthwise_phases`). The phases win on
# large outputs and are mixed below ~6 MB (faster at some sizes, slower at others), where
# the phases' extra fusions and interleaving copy cost about what the skipped zero products
# save. See BENCHMARKS.md, 'Measurements behind code choices', `_PHASE_MIN_BYTES`.
_PHASE_MIN_BYTES = 8 * 2**20


# ----------------------------------------------------------------------------- public API


def resolve_impl(impl: Impl) -> Literal["xla", "shifted"]:
    """The concrete formulation for `impl`: "auto" → "shifted" on CPU, "xla" on GPU/TPU."""
    if impl not in _IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {_IMPLS}")
    if impl == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "xla"
    return impl


def conv(x: jax.Array, w: jax.Array, strides: Sequence[int], *, impl: Impl = "auto") -> jax.Array:
    """Dense N-d convolution (cross-correlation, as in every DL framework), channels-last.

    Args:
      x: ``(B, *S, Cin)`` with ``len(S)`` in {1, 2, 3}.
      w: ``(*K, Cin, Cout)``, every ``k`` odd.
      strides: ``len(S)`` positive ints.
      impl: "auto", "xla" or "shifted" (see the module docstring).

    Returns:
      ``(B, *S', Cout)`` with ``S'[i] = ceil(S[i] / strides[i])`` (padding ``k // 2``), in
      the common dtype of ``x`` and ``w`` (accumulated in at least float32 for "shifted").
    """
    strides = _check_strides(strides)
    resolved = resolve_impl(impl)
    x, w = _common_dtype(x, w)
    _check_shapes(x, w, strides, depthwise=False)
    if resolved == "xla":
        return _xla_conv(x, w, strides, groups=1)
    w = _live_taps(w, _spatial(x, len(strides)), strides)
    ksize = w.shape[: len(strides)]
    if math.prod(ksize) == 1:
        return _pointwise(x, w, strides)
    return _dense(x, w, strides, _same_pads(ksize))


def depthwise_conv(x: jax.Array, w: jax.Array, strides: Sequence[int], *, impl: Impl = "auto") -> jax.Array:
    """Depthwise N-d convolution (one filter per channel), channels-last.

    Args:
      x: ``(B, *S, C)`` with ``len(S)`` in {1, 2, 3}.
      w: ``(*K, 1, C)``, every ``k`` odd.
      strides: ``len(S)`` positive ints.
      impl: "auto", "xla" or "shifted" (see the module docstring).

    Returns:
      ``(B, *S', C)`` with ``S'[i] = ceil(S[i] / strides[i])`` (padding ``k // 2``), in
      the common dtype of ``x`` and ``w`` (accumulated in at least float32 for "shifted").
    """
    strides = _check_strides(strides)
    resolved = resolve_impl(impl)
    x, w = _common_dtype(x, w)
    _check_shapes(x, w, strides, depthwise=True)
    if resolved == "xla":
        return _xla_conv(x, w, strides, groups=x.shape[-1])
    w = _live_taps(w, _spatial(x, len(strides)), strides)
    ksize = w.shape[: len(strides)]
    return _depthwise(x, w.reshape(*ksize, x.shape[-1]), strides, _same_pads(ksize), True)


def _live_taps(w: jax.Array, n: Sequence[int], strides: tuple[int, ...]) -> jax.Array:
    """``w (*K, ...)`` cut to the taps that can read a pixel: on a stride-1 axis of length
    ``n`` with padding ``k // 2``, tap offsets ``|d| >= n`` read only zero padding for every
    output. The cut is symmetric (odd kernels, same output size) and exact, also for the
    kernel gradient (the dead taps' gradient is 0; slicing's transpose puts 0 there).
    Why: deep 3D stages have few z-slices (B0 at 21 slices: z = 2 at stage5, 1 at stage6/7),
    where a 5×5×5 kernel has 75 or 25 live taps of 125 and a 3×3×3 one 9 of 27."""
    nd = len(strides)
    cut = []
    for length, k, s in zip(n, w.shape[:nd], strides):
        r = k // 2
        keep = min(r, length - 1) if s == 1 else r
        cut.append(slice(r - keep, r + keep + 1))
    if all(c.stop - c.start == k for c, k in zip(cut, w.shape[:nd])):
        return w
    return w[tuple(cut)]


# ----------------------------------------------------------------------------- validation


def _check_strides(strides: Sequence[int]) -> tuple[int, ...]:
    try:
        strides = tuple(int(s) for s in strides)
    except TypeError:
        raise ValueError(f"strides={strides!r}; expected a tuple of 1 to 3 positive ints, one per spatial axis") from None
    if len(strides) not in (1, 2, 3) or any(s < 1 for s in strides):
        raise ValueError(f"strides={strides}; expected 1 to 3 positive ints, one per spatial axis")
    return strides


def _check_shapes(x: jax.Array, w: jax.Array, strides: tuple[int, ...], depthwise: bool) -> None:
    """Raise ValueError naming the expected and actual shapes unless x, w, strides agree."""
    nd = len(strides)
    kind = "depthwise_conv" if depthwise else "conv"
    k_axes = ", ".join(f"K{i}" for i in range(nd))
    w_layout = f"({k_axes}, 1, C)" if depthwise else f"({k_axes}, Cin, Cout)"
    x_layout = f"(B, {', '.join('S' + str(i) for i in range(nd))}, {'C' if depthwise else 'Cin'})"
    if x.ndim != nd + 2:
        raise ValueError(
            f"{kind}: x has shape {tuple(x.shape)} (rank {x.ndim}); with {nd} strides {strides} "
            f"expected rank {nd + 2}, {x_layout}"
        )
    if w.ndim != nd + 2:
        raise ValueError(
            f"{kind}: kernel has shape {tuple(w.shape)} (rank {w.ndim}); with {nd} strides {strides} "
            f"expected rank {nd + 2}, {w_layout}"
        )
    ksize = tuple(w.shape[:nd])
    if any(k % 2 == 0 for k in ksize):
        raise ValueError(
            f"{kind}: kernel has shape {tuple(w.shape)}, spatial size {ksize}; expected odd sizes "
            "(padding is symmetric k // 2)"
        )
    cin = x.shape[-1]
    if depthwise and (w.shape[-2] != 1 or w.shape[-1] != cin):
        raise ValueError(
            f"{kind}: kernel has shape {tuple(w.shape)}, x has shape {tuple(x.shape)}; "
            f"expected kernel {(*ksize, 1, cin)} = {w_layout} with C = {cin}"
        )
    if not depthwise and w.shape[-2] != cin:
        raise ValueError(
            f"{kind}: kernel has shape {tuple(w.shape)}, x has shape {tuple(x.shape)}; "
            f"expected kernel {(*ksize, cin, w.shape[-1])} = {w_layout} with Cin = {cin}"
        )


def _common_dtype(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    dtype = jnp.result_type(x, w)
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def _acc_dtype(dtype) -> jnp.dtype:
    """Accumulation dtype: at least float32 (bf16 sums over 27+ taps lose digits); f64 stays f64."""
    return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------- xla


def _xla_conv(x: jax.Array, w: jax.Array, strides: tuple[int, ...], groups: int) -> jax.Array:
    """`lax.conv_general_dilated`, channels-last. The output keeps the input dtype: cuDNN and
    the TPU accumulate bf16 in f32 internally, and an f32 output would cost a round trip."""
    nd = len(strides)
    sp = _SPATIAL_LETTERS[nd]
    dn = lax.conv_dimension_numbers(x.shape, w.shape, (f"N{sp}C", f"{sp}IO", f"N{sp}C"))
    padding = [(k // 2, k // 2) for k in w.shape[:nd]]
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn, feature_group_count=groups)


# ----------------------------------------------------------------------------- geometry helpers


def _same_pads(ksize: Sequence[int]) -> Pads:
    return tuple((k // 2, k // 2, 0) for k in ksize)


def _pad_spatial(x: jax.Array, pads: Pads) -> jax.Array:
    """Zero-pad the spatial axes of ``(..., *S, C)`` with `lax.pad` configs (negative = crop)."""
    lead = [(0, 0, 0)] * (x.ndim - 1 - len(pads))
    return lax.pad(x, jnp.zeros((), x.dtype), [*lead, *pads, (0, 0, 0)])


def _padded_len(n: int, pad: tuple[int, int, int]) -> int:
    lo, hi, it = pad
    return lo + hi + n + max(n - 1, 0) * it


def _out_size(n: Sequence[int], ksize: Sequence[int], strides: Sequence[int], pads: Pads) -> tuple[int, ...]:
    """Output size per axis of the valid correlation of ``pad(x, pads)``: ``(L - k) // s + 1``."""
    return tuple((_padded_len(ni, p) - k) // s + 1 for ni, k, s, p in zip(n, ksize, strides, pads))


def _taps(ksize: Sequence[int]) -> list[tuple[int, ...]]:
    """Kernel tap indices in row-major order (the order of ``w.reshape(-1, ...)``)."""
    return list(itertools.product(*(range(k) for k in ksize)))


def _tap_view(
    xp: jax.Array, tap: Sequence[int], out: Sequence[int], strides: Sequence[int], channels: int | None = None
) -> jax.Array:
    """The view of padded ``xp (..., *L, C)`` that kernel tap `tap` multiplies:
    ``xp[..., t0::s0, t1::s1, ..., :channels]`` cut to `out` positions per spatial axis
    (all C channels unless `channels` is given)."""
    nd = len(tap)
    lead = xp.ndim - 1 - nd
    start = (0,) * lead + tuple(tap) + (0,)
    limit = xp.shape[:lead] + tuple(t + (o - 1) * s + 1 for t, o, s in zip(tap, out, strides))
    limit += (xp.shape[-1] if channels is None else channels,)
    return lax.slice(xp, start, limit, (1,) * lead + tuple(strides) + (1,))


def _im2col(xp: jax.Array, ksize: Sequence[int], strides: Sequence[int], out: Sequence[int]) -> jax.Array:
    """Patches ``(..., *out, prod(K) * Cin)`` of padded ``xp (..., *L, Cin)``, tap-major on the
    last axis (index ``tap * Cin + c``), matching ``w.reshape(prod(K) * Cin, Cout)``.

    With a stride ``s > 1`` on the last spatial axis, that axis is viewed as groups of ``s``
    positions ``(L / s, s * Cin)``: taps ``q*s … q*s + s - 1`` of one output read group
    ``o + q`` whole, so they are one contiguous piece (the stem's 27 pieces of 5 channels
    become 18 of 10 or 5, which makes its forward faster; see BENCHMARKS.md,
    'Measurements behind code choices', `_im2col`)."""
    nd = len(ksize)
    s, k, o = strides[-1], ksize[-1], out[-1]
    if s == 1 or k == 1:
        views = [_tap_view(xp, t, out, strides) for t in _taps(ksize)]
    else:
        groups = -(-k // s)
        need = s * (o + groups - 1)  # >= (o - 1) * s + k: every tap's reach
        ax = xp.ndim - 2
        have = xp.shape[ax]
        if have >= need:
            xp = lax.slice_in_dim(xp, 0, need, axis=ax)
        else:
            xp = _pad_spatial(xp, ((0, 0, 0),) * (nd - 1) + ((0, need - have, 0),))
        c = xp.shape[-1]
        xq = xp.reshape(*xp.shape[:ax], need // s, s * c)
        # Group q covers taps q*s … q*s + s - 1; the last may hold fewer than s.
        views = [
            _tap_view(xq, (*t, q), out, (*strides[:-1], 1), channels=min(s, k - q * s) * c)
            for t in _taps(ksize[:-1])
            for q in range(groups)
        ]
    # Concatenated as (positions, channels) matrices: XLA:CPU fused the stem's im2col markedly
    # slower when the pieces kept unit axes (1, 64, 64, 5) than as (64, 64, 5) or (4096, 5)
    # (BENCHMARKS.md, 'Measurements behind code choices', `_im2col`).
    shape = views[0].shape[:-1]
    cols = jnp.concatenate([v.reshape(-1, v.shape[-1]) for v in views], axis=-1)
    return cols.reshape(*shape, cols.shape[-1])


def _transposed_geometry(
    n: Sequence[int], m: Sequence[int], ksize: Sequence[int], strides: Sequence[int], pads: Pads
) -> tuple[tuple[int, ...], Pads]:
    """Strides and pads that turn the input gradient of a valid correlation into another one.

    Forward: ``y[j] = sum_t P[j*s + t] w[t]`` with ``P = pad(x, (lo, hi, it))``, so x's
    element i sits at ``P[lo + i*(it+1)]``. Then ``dx[i] = sum_u D[i*(it+1) + u] w[k-1-u]``
    with ``D = pad(g, (k-1-lo, hi', s-1))``: the cotangent dilated by the forward stride,
    read with stride ``it+1``, against the flipped kernel. ``hi'`` makes ``D`` exactly
    ``(n-1)*(it+1) + k`` long (it may be negative: a crop). Applying this twice gives back
    ``(strides, pads)`` up to the high pads, which only trim unread zeros.
    """
    t_strides, t_pads = [], []
    for ni, mi, k, s, (lo, _, it) in zip(n, m, ksize, strides, pads):
        lo_t = k - 1 - lo
        hi_t = (ni - 1) * (it + 1) + k - lo_t - ((mi - 1) * s + 1)
        t_strides.append(it + 1)
        t_pads.append((lo_t, hi_t, s - 1))
    return tuple(t_strides), tuple(t_pads)


def _spatial(a: jax.Array, nd: int) -> tuple[int, ...]:
    return tuple(a.shape[-1 - nd : -1])


# ----------------------------------------------------------------------------- blocked loops


class _Blocks(NamedTuple):
    """Loop over blocks of output positions: every spatial axis before `axis` one position
    at a time, `rows` positions of `axis` per block (`count` blocks, the last zero-padded),
    the axes after `axis` whole."""

    axis: int
    rows: int
    count: int


def _plan_blocks(out: Sequence[int], bytes_per_position: int, budget: int | None = None) -> _Blocks:
    """The outermost axis whose rows (positions right of it) fit in `budget` bytes (default
    `_BLOCK_BYTES`), with as many rows per block as fit, spread evenly so the last block is
    not mostly padding."""
    budget = _BLOCK_BYTES if budget is None else budget
    for axis in range(len(out)):
        row = math.prod(out[axis + 1 :]) * bytes_per_position
        if row <= budget or axis == len(out) - 1:
            want = max(1, min(out[axis], budget // max(row, 1)))
            count = -(-out[axis] // want)
            return _Blocks(axis, -(-out[axis] // count), count)
    raise AssertionError("unreachable")


def _block_padded_input(
    x: jax.Array, pads: Pads, ksize: Sequence[int], strides: Sequence[int], out: Sequence[int], blocks: _Blocks
) -> jax.Array:
    """``pad(x, pads)`` with extra high zeros on the blocked axis, so that the zero-padded last
    block reads inside the array (`lax.dynamic_slice` would silently shift a block that does not)."""
    a = blocks.axis
    need = (blocks.count * blocks.rows - 1) * strides[a] + ksize[a]
    lo, hi, it = pads[a]
    extra = max(0, need - _padded_len(x.shape[-1 - len(pads) + a], pads[a]))
    return _pad_spatial(x, tuple((lo, hi + extra, it) if i == a else p for i, p in enumerate(pads)))


def _loop_indices(i: jax.Array, lead: int, out: Sequence[int], blocks: _Blocks) -> tuple[jax.Array, list[jax.Array]]:
    """Decode loop counter `i` into (leading index, output start per spatial axis)."""
    sizes = (lead, *out[: blocks.axis], blocks.count)
    idx = []
    for size in reversed(sizes):
        idx.append(i % size)
        i = i // size
    b, *pos = reversed(idx)
    starts = [*pos[:-1], pos[-1] * blocks.rows] + [jnp.zeros_like(b)] * (len(out) - blocks.axis - 1)
    return b, starts


def _block_shape(out: Sequence[int], blocks: _Blocks) -> tuple[int, ...]:
    """Spatial shape of one block of output positions."""
    a = blocks.axis
    return (1,) * a + (blocks.rows,) + tuple(out[a + 1 :])


def _slice_block(
    xp: jax.Array, b, starts, shape: Sequence[int], ksize: Sequence[int], strides: Sequence[int], tap=None
) -> jax.Array:
    """From ``xp (Lead, *L, C)``: the input window of the output block at `starts` of spatial
    `shape` — all taps' halo (``tap=None``, shape ``(1, *((o-1)*s + k), C)``), or only tap
    `tap`'s strided view (``(1, *shape, C)``)."""
    zero = jnp.zeros_like(b)
    if tap is None:
        begin = [st * s for st, s in zip(starts, strides)]
        size = [(o - 1) * s + k for o, s, k in zip(shape, strides, ksize)]
    else:
        begin = [st * s + t for st, s, t in zip(starts, strides, tap)]
        size = [(o - 1) * s + 1 for o, s in zip(shape, strides)]
    win = lax.dynamic_slice(xp, (b, *begin, zero), (1, *size, xp.shape[-1]))
    if tap is None or all(s == 1 for s in strides):
        return win
    return lax.slice(win, (0,) * win.ndim, win.shape, (1, *strides, 1))


def _flatten_lead(a: jax.Array, nd: int) -> jax.Array:
    return a.reshape(-1, *a.shape[a.ndim - 1 - nd :])


# ----------------------------------------------------------------------------- dense, shifted


def _matmul_last(x: jax.Array, w2: jax.Array, out_dtype=None) -> jax.Array:
    """``x (..., Cin) @ w2 (Cin, Cout)`` accumulated in at least f32, returned in `out_dtype`
    (default x's dtype)."""
    y = lax.dot_general(x, w2, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=_acc_dtype(x.dtype))
    return y.astype(out_dtype or x.dtype)


def _pointwise(x: jax.Array, w: jax.Array, strides: tuple[int, ...]) -> jax.Array:
    """1×…×1 conv: subsample, then a matmul over channels (`_pointwise_matmul`). ``w`` is
    ``(1, …, 1, Cin, Cout)``."""
    nd = len(strides)
    if any(s > 1 for s in strides):
        out = tuple(-(-n // s) for n, s in zip(_spatial(x, nd), strides))
        x = _tap_view(x, (0,) * nd, out, strides)
    return _pointwise_matmul(x, w)


@jax.custom_vjp
def _pointwise_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x (..., *S, Cin) @ w (1, …, 1, Cin, Cout)`` with a VJP whose kernel gradient is the
    blocked `_dense_wgrad`. Why: autodiff's ``x^T g`` contracts the long position axis of two
    channels-last arrays, and XLA:CPU first transposes the cotangent to channels-first (at
    stage2's expand, 8×11×64×64×96, a copy that costs more than the matmul after it); per
    cache-sized block the same product costs a fraction of that copy alone (BENCHMARKS.md,
    'Measurements behind code choices', `_pointwise_matmul`)."""
    return _matmul_last(x, w.reshape(w.shape[-2:]))


def _pointwise_matmul_fwd(x, w):
    return _pointwise_matmul(x, w), (x, w)


def _pointwise_matmul_bwd(res, g):
    x, w = res
    nd = w.ndim - 2
    dx = _pointwise_matmul(g, jnp.swapaxes(w, -1, -2))
    return dx, _dense_wgrad(x, g, (1,) * nd, (1,) * nd, ((0, 0, 0),) * nd)


_pointwise_matmul.defvjp(_pointwise_matmul_fwd, _pointwise_matmul_bwd)


def _dense_fwd_impl(x: jax.Array, w: jax.Array, strides: tuple[int, ...], pads: Pads) -> jax.Array:
    """Valid correlation of ``pad(x, pads)``: ``x (..., *S, Cin)``, ``w (*K, Cin, Cout)`` →
    ``(..., *S', Cout)``; im2col + matmul one block of output rows at a time, so the
    patches (``prod(K)`` × larger than the input) stay in cache. `lax.map` stacks the blocks'
    outputs in order, so the result is a reshape of the stack (no zero-filled buffer to update)."""
    nd = len(strides)
    ksize, cout = w.shape[:nd], w.shape[-1]
    out = _out_size(_spatial(x, nd), ksize, strides, pads)
    cols = math.prod(ksize) * x.shape[-1]
    blocks = _plan_blocks(out, cols * x.dtype.itemsize, _DENSE_BLOCK_BYTES)
    xp = _flatten_lead(_block_padded_input(x, pads, ksize, strides, out, blocks), nd)
    lead = xp.shape[0]
    bshape = _block_shape(out, blocks)
    w2 = w.reshape(cols, cout)

    def block(i):
        b, starts = _loop_indices(i, lead, out, blocks)
        win = _slice_block(xp, b, starts, bshape, ksize, strides)
        # A 2-D matmul: XLA:CPU ran the same product as a rank-5 dot_general slower
        # (BENCHMARKS.md, 'Measurements behind code choices', `_dense_fwd_impl`).
        return _matmul_last(_im2col(win, ksize, strides, bshape).reshape(-1, cols), w2)

    a = blocks.axis
    y = lax.map(block, jnp.arange(lead * math.prod(out[:a]) * blocks.count))
    y = y.reshape(lead, *out[:a], blocks.count * blocks.rows, *out[a + 1 :], cout)
    y = lax.slice_in_dim(y, 0, out[a], axis=1 + a)
    return y.reshape(*x.shape[: x.ndim - 1 - nd], *out, cout)


def _dense_wgrad_impl(x: jax.Array, g: jax.Array, ksize: tuple[int, ...], strides: tuple[int, ...], pads: Pads):
    """``dw[t, c, o] = sum_{lead, j} pad(x)[..., j*s + t, c] * g[..., j, o]`` → ``(*K, Cin, Cout)``
    in x's dtype: per block, the transposed patches times the cotangent block."""
    nd = len(strides)
    out = _spatial(g, nd)
    cols = math.prod(ksize) * x.shape[-1]
    blocks = _plan_blocks(out, cols * x.dtype.itemsize, _DENSE_BLOCK_BYTES)
    xp = _flatten_lead(_block_padded_input(x, pads, ksize, strides, out, blocks), nd)
    gf = _flatten_lead(g, nd)
    gf = _pad_spatial(gf, tuple((0, blocks.rows * blocks.count - o if i == blocks.axis else 0, 0) for i, o in enumerate(out)))
    lead = xp.shape[0]
    bshape = _block_shape(out, blocks)
    acc = _acc_dtype(x.dtype)

    def body(i, dw):
        b, starts = _loop_indices(i, lead, out, blocks)
        win = _slice_block(xp, b, starts, bshape, ksize, strides)
        patches = _im2col(win, ksize, strides, bshape).reshape(-1, cols)
        gb = lax.dynamic_slice(gf, (b, *starts, jnp.zeros_like(b)), (1, *bshape, g.shape[-1])).reshape(-1, g.shape[-1])
        return dw + lax.dot_general(patches, gb, (((0,), (0,)), ((), ())), preferred_element_type=acc)

    dw = jnp.zeros((cols, g.shape[-1]), acc)
    dw = lax.fori_loop(0, lead * math.prod(out[: blocks.axis]) * blocks.count, body, dw)
    return dw.reshape(*ksize, x.shape[-1], g.shape[-1]).astype(x.dtype)


def _dense_input_grad(g: jax.Array, w: jax.Array, n: Sequence[int], strides: tuple[int, ...], pads: Pads):
    """Input gradient of `_dense`: ``g (..., *S', Cout)``, ``w (*K, Cin, Cout)`` → ``(..., *n, Cin)``.

    col2im: the patches' cotangent ``g @ w^T`` scattered back through the transpose of
    im2col (a sum of prod(K) interior-padded slices, one fusion). Faster on the stem than
    the equivalent correlation of the stride-dilated cotangent, whose ``prod(K) * Cout``-wide
    patches are mostly zeros (BENCHMARKS.md, 'Measurements behind code choices',
    `_dense_input_grad`). Plain JAX ops, so it differentiates.
    """
    nd = len(strides)
    ksize, cin = w.shape[:nd], w.shape[-2]
    m = _spatial(g, nd)
    dpatches = _matmul_last(g, w.reshape(-1, w.shape[-1]).T)
    x_aval = jax.ShapeDtypeStruct((*g.shape[: g.ndim - 1 - nd], *n, cin), g.dtype)
    (dx,) = jax.linear_transpose(lambda x: _im2col(_pad_spatial(x, pads), ksize, strides, m), x_aval)(dpatches)
    return dx


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x: jax.Array, w: jax.Array, strides: tuple[int, ...], pads: Pads) -> jax.Array:
    """`_dense_fwd_impl` with a VJP made of `_dense_input_grad` and `_dense_wgrad` (autodiff
    through the blocked loop would accumulate every block's input cotangent into a
    full-size array)."""
    return _dense_fwd_impl(x, w, strides, pads)


def _dense_fwd(x, w, strides, pads):
    return _dense(x, w, strides, pads), (x, w)


def _dense_bwd(strides, pads, res, g):
    x, w = res
    nd = len(strides)
    dx = _dense_input_grad(g, w, _spatial(x, nd), strides, pads)
    return dx, _dense_wgrad(x, g, w.shape[:nd], strides, pads)


_dense.defvjp(_dense_fwd, _dense_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense_wgrad(x: jax.Array, g: jax.Array, ksize: tuple[int, ...], strides: tuple[int, ...], pads: Pads):
    """Kernel gradient of `_dense`; itself differentiable (for grad-of-grad) through `_dense`."""
    return _dense_wgrad_impl(x, g, ksize, strides, pads)


def _dense_wgrad_fwd(x, g, ksize, strides, pads):
    return _dense_wgrad(x, g, ksize, strides, pads), (x, g)


def _dense_wgrad_bwd(ksize, strides, pads, res, dw_bar):
    # dw is bilinear in (x, g): its cotangent dw_bar plays the kernel's role in both partials.
    x, g = res
    x_bar = _dense_input_grad(g, dw_bar, _spatial(x, len(strides)), strides, pads)
    return x_bar, _dense(x, dw_bar, strides, pads)


_dense_wgrad.defvjp(_dense_wgrad_fwd, _dense_wgrad_bwd)


# ----------------------------------------------------------------------------- depthwise, shifted


def _depthwise_impl(x: jax.Array, w: jax.Array, strides: tuple[int, ...], pads: Pads, fuse_small: bool = False) -> jax.Array:
    """Valid strided depthwise correlation of ``pad(x, pads)``: ``x (..., *S, C)``, ``w (*K, C)``.

    ``y[j] = sum_t pad(x)[j*s + t] * w[t]`` per channel, accumulated in at least f32: a loop
    over the leading kernel axis for small outputs and for kernels of more than
    `_MAX_FUSED_TAPS` taps (`_LOOP_MAX_BYTES`, see `_depthwise_loop`), one fused elementwise
    sum over taps otherwise. ``fuse_small``: small outputs too take the fused sum (kernels of
    at most `_MAX_FUSED_TAPS` taps), for a forward that nothing differentiates: there the
    loop only costs (several times the fused sum at 8×2×8×8×480, 3×3×3; BENCHMARKS.md,
    'Measurements behind code choices', `_depthwise_impl`), while under a VJP the loop's
    materialised sum is what keeps XLA from recomputing the taps in the backward.
    """
    nd = len(strides)
    ksize = w.shape[:nd]
    acc = _acc_dtype(x.dtype)
    out = _out_size(_spatial(x, nd), ksize, strides, pads)
    xp = _pad_spatial(x, pads)
    wa = w.astype(acc)
    out_bytes = math.prod(x.shape[: x.ndim - 1 - nd]) * math.prod(out) * x.shape[-1] * jnp.dtype(acc).itemsize
    small = out_bytes <= _LOOP_MAX_BYTES and not fuse_small
    if nd > 1 and ksize[0] > 1 and (small or math.prod(ksize) > _MAX_FUSED_TAPS):
        return _depthwise_loop(xp, wa, ksize, strides, out).astype(x.dtype)
    y = None
    for t in _taps(ksize):
        term = _tap_view(xp, t, out, strides).astype(acc) * wa[t]
        y = term if y is None else y + term
    return y.astype(x.dtype)


def _depthwise_loop(xp: jax.Array, wa: jax.Array, ksize, strides, out) -> jax.Array:
    """The depthwise correlation as a loop over the leading kernel axis, each iteration one
    fusion of the remaining taps added to the carried sum; in ``wa``'s dtype.

    Why: the fused tap sum is an elementwise loop fusion, and XLA:CPU duplicates such
    fusions into each consumer. In a backward pass, the activation derivative needs the
    conv output, so the 125-tap sum of a 5×5×5 block was recomputed twice more inside the
    cotangent's fusions (stage6's vjp cost several forwards; BENCHMARKS.md, 'Measurements
    behind code choices', `_depthwise_loop`). A loop carry is a
    materialised buffer that cannot be duplicated. It costs one read-modify-write of the
    sum per kernel slice, which is why large outputs keep the single fusion.
    """
    nd = len(strides)
    ax = xp.ndim - 1 - nd
    span = (out[0] - 1) * strides[0] + 1
    inner = _taps(ksize[1:])

    def body(t0, y):
        xs = lax.dynamic_slice_in_dim(xp, t0, span, axis=ax)
        w0 = lax.dynamic_index_in_dim(wa, t0, axis=0, keepdims=False)
        part = None
        for t in inner:
            term = _tap_view(xs, (0, *t), out, strides).astype(wa.dtype) * w0[t]
            part = term if part is None else part + term
        return y + part

    y0 = jnp.zeros((*xp.shape[:ax], *out, xp.shape[-1]), wa.dtype)
    return lax.fori_loop(0, ksize[0], body, y0)


def _depthwise_wgrad_impl(x: jax.Array, g: jax.Array, ksize: tuple[int, ...], strides: tuple[int, ...], pads: Pads):
    """``dw[t, c] = sum_{lead, j} pad(x)[..., j*s + t, c] * g[..., j, c]`` → ``(*K, C)`` in x's dtype.

    All ``prod(K)`` tap sums are one variadic reduction (`_tap_sums`), so the products are
    formed in one pass over the positions: as separate reductions, each of the
    ``prod(K)`` sums was its own kernel launch over the block (slower; BENCHMARKS.md,
    'Measurements behind code choices', `_depthwise_wgrad_impl`).
    Inputs above `_WGRAD_WHOLE_MAX_BYTES` loop over cache-sized blocks of positions:
    unblocked, the pass streams x and g from memory once per tap row."""
    nd = len(strides)
    out = _spatial(g, nd)
    c = g.shape[-1]
    acc = _acc_dtype(x.dtype)
    taps = _taps(ksize)
    if x.size * x.dtype.itemsize <= _WGRAD_WHOLE_MAX_BYTES:
        xp = _flatten_lead(_pad_spatial(x, pads), nd)
        gf = _flatten_lead(g, nd).astype(acc)
        views = [_tap_view(xp, t, out, strides).astype(acc) for t in taps]
        return jnp.stack(_tap_sums(views, gf)).reshape(*ksize, c).astype(x.dtype)
    blocks = _plan_blocks(out, c * x.dtype.itemsize)
    xp = _flatten_lead(_block_padded_input(x, pads, ksize, strides, out, blocks), nd)
    gf = _flatten_lead(g, nd)
    gf = _pad_spatial(gf, tuple((0, blocks.rows * blocks.count - o if i == blocks.axis else 0, 0) for i, o in enumerate(out)))
    lead = xp.shape[0]
    bshape = _block_shape(out, blocks)

    def body(i, dw):
        b, starts = _loop_indices(i, lead, out, blocks)
        gb = lax.dynamic_slice(gf, (b, *starts, jnp.zeros_like(b)), (1, *bshape, c)).astype(acc)
        views = [_slice_block(xp, b, starts, bshape, ksize, strides, tap=t).astype(acc) for t in taps]
        return dw + jnp.stack(_tap_sums(views, gb))

    dw = jnp.zeros((math.prod(ksize), c), acc)
    dw = lax.fori_loop(0, lead * math.prod(out[: blocks.axis]) * blocks.count, body, dw)
    return dw.reshape(*ksize, c).astype(x.dtype)


def _tap_sums(views: list[jax.Array], g: jax.Array) -> tuple[jax.Array, ...]:
    """``sum over all but the last axis of (v * g)`` for every ``v`` in `views` (each the shape
    of ``g``, ``(..., C)``): one variadic `lax.reduce`, i.e. one loop with ``len(views)``
    accumulators, instead of ``len(views)`` separate reductions."""
    zero = jnp.zeros((), g.dtype)
    return lax.reduce(
        [v * g for v in views],
        [zero] * len(views),
        lambda a, b: tuple(ai + bi for ai, bi in zip(a, b)),
        tuple(range(g.ndim - 1)),
    )


def _depthwise_general(x: jax.Array, w: jax.Array, strides: tuple[int, ...], pads: Pads) -> jax.Array:
    """`_depthwise` for any geometry. When the output is larger than `_PHASE_MIN_BYTES`, every
    axis read at stride 1 from an interior-padded input (the input gradient of a strided
    conv) is split into output phases (`_depthwise_phases`)."""
    nd = len(strides)
    out = _out_size(_spatial(x, nd), w.shape[:nd], strides, pads)
    out_bytes = math.prod(x.shape[: x.ndim - 1 - nd]) * math.prod(out) * x.shape[-1] * x.dtype.itemsize
    if out_bytes > _PHASE_MIN_BYTES:
        for a, ((_, _, it), s) in enumerate(zip(pads, strides)):
            if it > 0 and s == 1:
                return _depthwise_phases(x, w, strides, pads, a)
    return _depthwise(x, w, strides, pads, False)


def _depthwise_phases(x: jax.Array, w: jax.Array, strides: tuple[int, ...], pads: Pads, a: int) -> jax.Array:
    """Polyphase form of `_depthwise` along spatial axis `a`, where ``strides[a] == 1`` and
    ``pads[a] = (lo, hi, it)`` with ``it > 0``: ``x (..., *S, C)``, ``w (*K, C)``.

    Why: the input gradient of a stride-s conv correlates the cotangent dilated by s (s - 1
    zeros between elements) with the flipped kernel, so (s - 1)/s of the products per axis
    are with zeros: 7/8 for a stride-2 3D conv, which then runs at input resolution (stage3's
    5×5×5 input gradient was one of the costly parts of B0's train step; BENCHMARKS.md, 'Measurements
    behind code choices', `_depthwise_phases`). With ``P = it + 1``, output
    ``i = q·P + r`` only meets taps ``u ≡ lo - r (mod P)``, and those read ``x[q + m + c_r]``
    for the ``m``-th of them: phase r is a dense stride-1 correlation of x with the kernel
    slice ``w[u0::P]``. The P phases, interleaved, are the output; every tap is used by
    exactly one phase, so the work is that of the forward conv.
    """
    nd = len(strides)
    ax = x.ndim - 1 - nd + a
    n, k = x.shape[ax], w.shape[a]
    lo, _, it = pads[a]
    period = it + 1
    out = _padded_len(n, pads[a]) - k + 1
    rows = -(-out // period)
    phases = []
    for r in range(period):
        n_r = -(-(out - r) // period) if out > r else 0
        u0 = (lo - r) % period
        m_r = -(-(k - u0) // period) if k > u0 else 0
        c = (r + u0 - lo) // period  # exact: r + u0 ≡ lo (mod P)
        # Phase r reads x[c : c + n_r + m_r - 1]; a phase that reads none of x is zero.
        if n_r == 0 or m_r == 0 or c >= n or c + n_r + m_r - 1 <= 0:
            y = None
        else:
            w_r = lax.slice_in_dim(w, u0, k, stride=period, axis=a)
            sub = tuple((-c, n_r + m_r - 1 - n + c, 0) if i == a else p for i, p in enumerate(pads))
            y = _depthwise_general(x, w_r, strides, sub)
            y = lax.pad(y, jnp.zeros((), y.dtype), [(0, rows - n_r if i == ax else 0, 0) for i in range(y.ndim)])
        phases.append(y)
    template = next(y for y in phases if y is not None) if any(y is not None for y in phases) else None
    if template is None:
        shape = list(x.shape)
        shape[ax] = out
        for i, (ni, ki, si, pi) in enumerate(zip(_spatial(x, nd), w.shape[:nd], strides, pads)):
            if i != a:
                shape[x.ndim - 1 - nd + i] = (_padded_len(ni, pi) - ki) // si + 1
        return jnp.zeros(shape, x.dtype)
    phases = [jnp.zeros_like(template) if y is None else y for y in phases]
    y = jnp.stack(phases, axis=ax + 1)
    y = y.reshape(*y.shape[:ax], rows * period, *y.shape[ax + 2 :])
    return lax.slice_in_dim(y, 0, out, axis=ax)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise(x: jax.Array, w: jax.Array, strides: tuple[int, ...], pads: Pads, fuse_small: bool) -> jax.Array:
    """`_depthwise_impl` with a VJP made of `_depthwise` and `_depthwise_wgrad` (autodiff of
    the taps' slices would be a sum of prod(K) interior-padded arrays, which XLA:CPU runs
    poorly, and its kernel gradient would not be blocked). ``fuse_small`` applies only when
    nothing differentiates the call (the VJP's forward always loops over small outputs)."""
    return _depthwise_impl(x, w, strides, pads, fuse_small)


def _depthwise_fwd(x, w, strides, pads, fuse_small):
    return _depthwise_impl(x, w, strides, pads), (x, w)


def _depthwise_bwd(strides, pads, fuse_small, res, g):
    x, w = res
    nd = len(strides)
    ksize = w.shape[:nd]
    t_strides, t_pads = _transposed_geometry(_spatial(x, nd), _spatial(g, nd), ksize, strides, pads)
    dx = _depthwise_general(g, jnp.flip(w, axis=tuple(range(nd))), t_strides, t_pads)
    return dx, _depthwise_wgrad(x, g, ksize, strides, pads)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_wgrad(x: jax.Array, g: jax.Array, ksize: tuple[int, ...], strides: tuple[int, ...], pads: Pads):
    """Kernel gradient of `_depthwise`; itself differentiable (for grad-of-grad) through
    `_depthwise`, so differentiating it never goes through the blocked loop."""
    return _depthwise_wgrad_impl(x, g, ksize, strides, pads)


def _depthwise_wgrad_fwd(x, g, ksize, strides, pads):
    return _depthwise_wgrad(x, g, ksize, strides, pads), (x, g)


def _depthwise_wgrad_bwd(ksize, strides, pads, res, dw_bar):
    # dw is bilinear in (x, g): its cotangent dw_bar plays the kernel's role in both partials.
    x, g = res
    nd = len(strides)
    t_strides, t_pads = _transposed_geometry(_spatial(x, nd), _spatial(g, nd), ksize, strides, pads)
    x_bar = _depthwise_general(g, jnp.flip(dw_bar, axis=tuple(range(nd))), t_strides, t_pads)
    g_bar = _depthwise(x, dw_bar, strides, pads, False)
    return x_bar, g_bar


_depthwise_wgrad.defvjp(_depthwise_wgrad_fwd, _depthwise_wgrad_bwd)


__all__ = ["Impl", "conv", "depthwise_conv", "resolve_impl"]
