"""The engineered convolutions ("shifted") against `lax.conv_general_dilated`, the reference.

Everything runs in float64 on random inputs with odd spatial sizes (so ``ceil(n / s)``
rounding is exercised), 1D/2D/3D, strides 1 and 2 and mixed per axis. Values, first
derivatives (VJP to input and kernel) and the second derivatives that a Grad-CAMO
regulariser needs (gradient of a gradient) are compared with the same quantities of
XLA's native convolution, which shares no code with the engineered path.

Each side is compared as one jitted program (`_value_and_vjp`, `jax.jit` of the second
derivatives): run op by op, every one of an engineered conv's hundreds of tap slices was
compiled on its own (several times the compile time of the whole program).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gradcamo_jax.models import conv as convlib

# The quick loop (`make test-fast`): one case per formulation (dense; depthwise fused, looped and
# in output phases, all strided 3D with a mixed stride); the full grids and second derivatives
# run in `make test`.
FAST = {
    "test_auto_picks_shifted_on_cpu_and_rejects_unknown",
    "test_bad_shapes_name_expected_and_actual",
    "test_dead_taps_are_cut_only_on_stride_one_axes",
    "test_value_and_gradients_match_lax_conv_in_float64[fused-3d-k3-s122-dense]",
    "test_value_and_gradients_match_lax_conv_in_float64[fused-3d-k3-s122-depthwise]",
    "test_value_and_gradients_match_lax_conv_in_float64[loop-3d-k3-s122-depthwise]",
    "test_value_and_gradients_match_lax_conv_in_float64[phases-3d-k3-s122-depthwise]",
}


def reference(x, w, strides, depthwise):
    """Plain `lax.conv_general_dilated` with symmetric k // 2 padding, channels-last."""
    nd = len(strides)
    sp = {1: "W", 2: "HW", 3: "DHW"}[nd]
    dn = lax.conv_dimension_numbers(x.shape, w.shape, (f"N{sp}C", f"{sp}IO", f"N{sp}C"))
    pad = [(k // 2, k // 2) for k in w.shape[:nd]]
    groups = x.shape[-1] if depthwise else 1
    return lax.conv_general_dilated(
        x, w, strides, pad, dimension_numbers=dn, feature_group_count=groups, precision=lax.Precision.HIGHEST
    )


def ours(x, w, strides, depthwise):
    fn = convlib.depthwise_conv if depthwise else convlib.conv
    return fn(x, w, strides, impl="shifted")


# (spatial, kernel, strides, cin, cout) — cout ignored for depthwise
CASES = [
    ((9,), 3, (2,), 3, 4),
    ((7, 10), 3, (1, 1), 2, 5),
    ((7, 11), 5, (2, 1), 3, 2),
    ((5, 9, 8), 3, (1, 2, 2), 3, 4),
    ((5, 7, 9), 3, (2, 2, 2), 2, 3),
    ((6, 9, 7), 5, (1, 2, 1), 2, 2),
    ((3, 5, 5), 1, (1, 2, 2), 4, 6),  # pointwise with stride
    ((2, 3, 4), 7, (1, 1, 1), 2, 3),  # kernel larger than every axis: z and y taps cut (7 -> 3, 5), x all live
    ((2, 6, 5), 5, (1, 1, 1), 2, 3),  # dead z taps cut (B0's stage5 at 21 slices): 5 -> 3
    ((1, 4, 6), 3, (1, 1, 1), 3, 2),  # one slice: only the central z taps live (stage7)
]


@pytest.fixture(params=["fused", "loop", "phases"])
def depthwise_path(request, monkeypatch):
    """Which formulations the depthwise convolutions take (they pick by output size): every
    depthwise case runs with the fused tap sum (kernels of ≤ 27 taps; larger ones always
    loop) and its kernel gradient as one whole-array reduction, with the loop over the
    first kernel axis and the blocked kernel gradient (the loop applies to a VJP's forward
    and to the backward's convolutions; an undifferentiated call of ≤ 27 taps always fuses),
    and with input gradients of strided convs split into output phases (the phases' own
    convolutions then pick by size). Caches are cleared so no trace of another path is reused."""
    limit = {"fused": -1, "loop": 2**62, "phases": convlib._LOOP_MAX_BYTES}[request.param]
    monkeypatch.setattr(convlib, "_LOOP_MAX_BYTES", limit)
    # Kernel gradients: one whole-array reduction under "fused", blocks under "loop".
    whole = {"fused": 2**62, "loop": -1, "phases": convlib._WGRAD_WHOLE_MAX_BYTES}[request.param]
    monkeypatch.setattr(convlib, "_WGRAD_WHOLE_MAX_BYTES", whole)
    monkeypatch.setattr(convlib, "_PHASE_MIN_BYTES", -1 if request.param == "phases" else 2**62)
    jax.clear_caches()
    yield request.param
    jax.clear_caches()


def _skip_unswitched(depthwise: bool, path: str, strides) -> None:
    """Skip combinations the `depthwise_path` switch does not change: dense convs, and stride-1
    depthwise convs under "phases" (only strided convs have interior-padded input gradients)."""
    if not depthwise and path != "fused":
        pytest.skip("the formulation switch is depthwise-only")
    if path == "phases" and all(s == 1 for s in strides):
        pytest.skip("output phases only change the input gradient of a strided conv")


def _value_and_vjp(f, strides, depthwise):
    """``jit((x, w, ct) -> (f(x, w), f(x, w) under a VJP, VJP of ct))``: the undifferentiated
    call and the VJP's forward take different formulations (see the depthwise comment below)."""

    def run(x, w, ct):
        y_vjp, vjp = jax.vjp(lambda a, b: f(a, b, strides, depthwise), x, w)
        return f(x, w, strides, depthwise), y_vjp, vjp(ct)

    return jax.jit(run)


def _data(spatial, k, cin, cout, depthwise, seed=0):
    rng = np.random.default_rng(seed)
    nd = len(spatial)
    x = rng.normal(size=(2, *spatial, cin))
    w = rng.normal(size=(*(k,) * nd, 1, cin) if depthwise else (*(k,) * nd, cin, cout))
    return jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64)


@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0])}d-k{c[1]}-s{''.join(map(str, c[2]))}")
def test_value_and_gradients_match_lax_conv_in_float64(case, depthwise, depthwise_path, x64):
    spatial, k, strides, cin, cout = case
    _skip_unswitched(depthwise, depthwise_path, strides)
    if depthwise and k == 1:
        pytest.skip("a 1×1 depthwise conv is a per-channel scale; EfficientNet has none")
    x, w = _data(spatial, k, cin, cout, depthwise)
    ct = jnp.asarray(np.random.default_rng(1).normal(size=jax.eval_shape(
        lambda a, b: reference(a, b, strides, depthwise), x, w).shape))
    y_ref, _, grads_ref = _value_and_vjp(reference, strides, depthwise)(x, w, ct)
    # Under a VJP small depthwise outputs take the loop; undifferentiated, the fused sum.
    y, y_vjp, grads = _value_and_vjp(ours, strides, depthwise)(x, w, ct)
    assert y.shape == y_ref.shape == (2, *(-(-n // s) for n, s in zip(spatial, strides)), y_ref.shape[-1])
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y_vjp, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
@pytest.mark.parametrize(
    "case", [CASES[3], CASES[5], CASES[1], CASES[6]], ids=["3d-k3-s122", "3d-k5-s121", "2d-k3-s11", "3d-k1-s122"]
)
def test_second_derivatives_match_lax_conv(case, depthwise, depthwise_path, x64):
    """Gradient of a function of the input gradient (what a differentiable CAM penalty does)."""
    spatial, k, strides, cin, cout = case
    _skip_unswitched(depthwise, depthwise_path, strides)
    if depthwise and k == 1:
        pytest.skip("a 1×1 depthwise conv is a per-channel scale; EfficientNet has none")
    x, w = _data(spatial, k, cin, cout, depthwise, seed=2)
    ct = jnp.asarray(np.random.default_rng(3).normal(size=reference(x, w, strides, depthwise).shape))

    def penalty(f):
        def inner(a, b):
            gx, gw = jax.grad(lambda a, b: jnp.vdot(f(a, b, strides, depthwise), ct), argnums=(0, 1))(a, b)
            return jnp.sum(jnp.sin(gx)) + jnp.sum(gw**2)

        return jax.jit(jax.grad(inner, argnums=(0, 1)))(x, w)

    for got, want in zip(penalty(ours), penalty(reference)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_float32_and_bfloat16_accumulate_accurately(depthwise_path):
    """bf16 inputs are summed in f32: the error is the inputs' rounding, not the sum's."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(1, 5, 12, 12, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 1, 16)), jnp.float32)
    fn, ref = (jax.jit(lambda x, w, f=f: f(x, w, (1, 1, 1), True)) for f in (ours, reference))
    y32 = fn(x, w)
    np.testing.assert_allclose(y32, ref(x, w), rtol=1e-5, atol=1e-5)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    yb = fn(xb, wb)
    assert yb.dtype == jnp.bfloat16
    exact = ref(xb.astype(jnp.float32), wb.astype(jnp.float32))
    # one bf16 rounding of the result (2^-8 relative), not 27 of them
    np.testing.assert_allclose(np.asarray(yb, np.float32), exact, rtol=2**-7, atol=2**-7 * float(jnp.abs(exact).max()))


def _dilated_reference(x, w, strides, pads):
    """Depthwise valid correlation of ``lax.pad(x, pads)`` by XLA's native convolution, with
    interior padding expressed as ``lhs_dilation`` and low/high pads (negative = crop) as padding."""
    nd = len(strides)
    sp = {1: "W", 2: "HW", 3: "DHW"}[nd]
    c = x.shape[-1]
    wk = w.reshape(*w.shape[:nd], 1, c)
    dn = lax.conv_dimension_numbers(x.shape, wk.shape, (f"N{sp}C", f"{sp}IO", f"N{sp}C"))
    return lax.conv_general_dilated(
        x, wk, strides, [(lo, hi) for lo, hi, _ in pads], lhs_dilation=[it + 1 for _, _, it in pads],
        dimension_numbers=dn, feature_group_count=c, precision=lax.Precision.HIGHEST,
    )


def _vjp_of(f):
    """``jit((x, w, ct) -> (f(x, w), VJP of ct))``, one program per geometry."""

    def run(x, w, ct):
        y, vjp = jax.vjp(f, x, w)
        return y, vjp(ct)

    return jax.jit(run)


def test_output_phases_match_dilated_lax_conv(monkeypatch, x64):
    """`_depthwise_general` on interior-padded inputs (the geometry of a strided conv's input
    gradient, and beyond: even kernels, crops, several dilated axes, phases that read no
    input) against XLA's dilated convolution: values and both VJPs."""
    monkeypatch.setattr(convlib, "_PHASE_MIN_BYTES", -1)
    rng = np.random.default_rng(11)
    tried = 0
    while tried < 12:
        nd = int(rng.integers(1, 4))
        n = tuple(int(v) for v in rng.integers(1, 7, nd))
        k = tuple(int(v) for v in rng.integers(1, 6, nd))
        strides = tuple(int(v) for v in rng.integers(1, 3, nd))
        pads = tuple((int(rng.integers(-1, ki + 1)), int(rng.integers(-1, ki + 1)), int(rng.integers(0, 3))) for ki in k)
        if any(convlib._padded_len(ni, p) < ki for ni, p, ki in zip(n, pads, k)):
            continue
        if not any(it > 0 and s == 1 for (_, _, it), s in zip(pads, strides)):
            continue
        tried += 1
        x = jnp.asarray(rng.normal(size=(2, *n, 3)))
        w = jnp.asarray(rng.normal(size=(*k, 3)))
        ours_fn = lambda a, b, s=strides, p=pads: convlib._depthwise_general(a, b, s, p)  # noqa: E731
        ref_fn = lambda a, b, s=strides, p=pads: _dilated_reference(a, b, s, p)  # noqa: E731
        shape, ref_shape = (jax.eval_shape(f, x, w).shape for f in (ours_fn, ref_fn))
        assert shape == ref_shape, (n, k, strides, pads)
        ct = jnp.asarray(rng.normal(size=shape))
        (y, grads), (y_ref, grads_ref) = (_vjp_of(f)(x, w, ct) for f in (ours_fn, ref_fn))
        np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10, err_msg=str((n, k, strides, pads)))
        for got, want in zip(grads, grads_ref):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10, err_msg=str((n, k, strides, pads)))


@pytest.mark.parametrize("dense_budget", ["default", "small"])
def test_blocked_loops_cover_every_row(dense_budget, monkeypatch):
    """Inputs large enough that the kernel gradient and im2col loop over several blocks,
    with a last block that is mostly padding (the dense forward's larger blocks: whole
    planes by default, padded row blocks with the small budget)."""
    if dense_budget == "small":
        monkeypatch.setattr(convlib, "_DENSE_BLOCK_BYTES", convlib._BLOCK_BYTES)
    jax.clear_caches()
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(1, 3, 67, 45, 24)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 24, 8)) * 0.1, jnp.float32)
    plan = convlib._plan_blocks((3, 34, 23), 27 * 24 * 4)
    assert plan.count > 1 and (plan.count * plan.rows) % 34 != 0, plan
    fwd_plan = convlib._plan_blocks((3, 34, 23), 27 * 24 * 4, convlib._DENSE_BLOCK_BYTES)
    assert fwd_plan.count > 1, fwd_plan
    ct = jnp.asarray(rng.normal(size=(1, 3, 34, 23, 8)), jnp.float32)
    y, grads = _vjp_of(lambda a, b: ours(a, b, (1, 2, 2), False))(x, w, ct)
    y_ref, grads_ref = _vjp_of(lambda a, b: reference(a, b, (1, 2, 2), False))(x, w, ct)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(jnp.abs(want).max()))
    jax.clear_caches()


def test_dead_taps_are_cut_only_on_stride_one_axes():
    w = jnp.arange(5 * 5 * 5 * 2, dtype=jnp.float32).reshape(5, 5, 5, 1, 2)
    assert convlib._live_taps(w, (2, 8, 8), (1, 1, 1)).shape == (3, 5, 5, 1, 2)
    assert convlib._live_taps(w, (1, 4, 4), (1, 1, 1)).shape == (1, 5, 5, 1, 2)
    assert convlib._live_taps(w, (1, 1, 9), (1, 1, 1)).shape == (1, 1, 5, 1, 2)
    np.testing.assert_array_equal(convlib._live_taps(w, (1, 2, 9), (1, 1, 1)), w[2:3, 1:4])
    assert convlib._live_taps(w, (2, 8, 8), (2, 1, 1)).shape == w.shape  # strided: not cut
    assert convlib._live_taps(w, (3, 8, 8), (1, 1, 1)) is w


def test_auto_picks_shifted_on_cpu_and_rejects_unknown():
    assert convlib.resolve_impl("auto") == ("shifted" if jax.default_backend() == "cpu" else "xla")
    with pytest.raises(ValueError, match="impl='cudnn'"):
        convlib.resolve_impl("cudnn")


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "strides", "depthwise", "match"),
    [
        ((2, 5, 5, 3), (3, 3, 3, 4), (1, 1, 1), False, r"x has shape \(2, 5, 5, 3\) \(rank 4\).*expected rank 5"),
        ((2, 5, 5, 5, 3), (3, 3, 4), (1, 1, 1), False, r"kernel has shape \(3, 3, 4\) \(rank 3\)"),
        ((2, 5, 5, 5, 3), (2, 2, 2, 3, 4), (1, 1, 1), False, r"expected odd sizes"),
        ((2, 5, 5, 5, 3), (3, 3, 3, 2, 4), (1, 1, 1), False, r"expected kernel \(3, 3, 3, 3, 4\)"),
        ((2, 5, 5, 5, 3), (3, 3, 3, 1, 4), (1, 1, 1), True, r"expected kernel \(3, 3, 3, 1, 3\)"),
        ((2, 5, 5, 5, 3), (3, 3, 3, 3, 4), (1, 0, 1), False, r"strides=\(1, 0, 1\)"),
    ],
)
def test_bad_shapes_name_expected_and_actual(x_shape, w_shape, strides, depthwise, match):
    x, w = jnp.zeros(x_shape), jnp.zeros(w_shape)
    with pytest.raises(ValueError, match=match):
        ours(x, w, strides, depthwise)


def _kernel_vjp(f, strides):
    """``jit((x, w, ct) -> VJP of ct with respect to the depthwise kernel w alone)``."""
    return jax.jit(lambda x, w, ct: jax.vjp(lambda b: f(x, b, strides, True), w)[1](ct))


def test_blocked_depthwise_kernel_gradient_covers_every_row(monkeypatch):
    """The depthwise kernel gradient's variadic reduction over several blocks (the last
    mostly padding) against XLA's native convolution, strided and not."""
    monkeypatch.setattr(convlib, "_WGRAD_WHOLE_MAX_BYTES", -1)
    monkeypatch.setattr(convlib, "_BLOCK_BYTES", 16 * 1024)  # several blocks at a test-sized input
    jax.clear_caches()
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(1, 3, 67, 45, 24)), jnp.float32)
    for k, strides in [(3, (1, 2, 2)), (5, (1, 1, 1))]:
        w = jnp.asarray(rng.normal(size=(k, k, k, 1, 24)) * 0.1, jnp.float32)
        out = tuple(-(-n // s) for n, s in zip(x.shape[1:4], strides))
        plan = convlib._plan_blocks(out, 24 * 4)
        assert plan.count > 1 and (plan.count * plan.rows) % out[plan.axis] != 0, plan
        ct = jnp.asarray(rng.normal(size=(1, *out, 24)), jnp.float32)
        (got,), (want,) = (_kernel_vjp(f, strides)(x, w, ct) for f in (ours, reference))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    jax.clear_caches()
