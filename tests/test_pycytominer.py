"""pycytominer interop: profiles from `score_dataset` on a plate cropped by the real crop step go
through pycytominer's `normalize`, `feature_select` and `aggregate`; each profile maps back to its
object (``Metadata_ObjectNumber`` = the cell's label id in its site); and our ZCA-cor sphering
agrees with pycytominer's ``normalize(method="spherize")`` (≥ 1.7.1, the first release whose
spherize centres the data)."""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import pandas as pd
import pytest
from packaging.version import Version
from test_scoring import SCORED, SPATIAL, model_and_variables

from gradcamo_jax.data import crop as C
from gradcamo_jax.data import formats as F
from gradcamo_jax.scoring import read_profiles, score_dataset
from gradcamo_jax.sphering import SpherizeConfig, spherize

pycytominer = pytest.importorskip("pycytominer")  # the `test` extra; it has no __version__ for minversion
if Version(version("pycytominer")) < Version("1.7.1"):
    pytest.skip(f"pycytominer {version('pycytominer')} < 1.7.1 does not centre spherized data", allow_module_level=True)

CHANNELS = ("DNA", "ER", "Mito")  # the channel count of test_scoring's model
FIELD = (5, 40, 40)  # (Z, Y, X) of each site
WELLS = (("A01", "DMSO", 0.0), ("A02", "DMSO", 0.0), ("B01", "cpd", 1.6), ("B02", "cpd", 1.6))
SITES = (1, 2)
CELLS_PER_SITE = 5
CONTROLS = "Metadata_Dose == 0"
CORR = 0.8  # feature_select's correlation threshold; the untrained model's features reach ~0.87


def write_plate(root) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """A plate in the documented input format: per site a ZCYX stack and a label volume whose cells
    are boxes with non-consecutive ids (different in every site), so a row number or a running
    count cannot pass for the label id. Returns the plate map and the labels by site id."""
    rng = np.random.default_rng(0)
    slots = [(y, x) for y in (3, 16, 29) for x in (3, 16, 29)]  # 8×8 boxes in Y, X; 3 planes
    rows, labels_by_site = [], {}
    for well, treatment, dose in WELLS:
        for site in SITES:
            sid = F.site_id("P1", well, site)
            labels = np.zeros(FIELD, np.int32)
            ids = rng.choice(np.arange(2, 500), CELLS_PER_SITE, replace=False)
            for k, i in zip(rng.choice(len(slots), CELLS_PER_SITE, replace=False), ids):
                y, x = slots[k]
                labels[1:4, y:y + 8, x:x + 8] = i
            stack = rng.gamma(2.0, 50.0, (FIELD[0], len(CHANNELS), *FIELD[1:])).astype(np.float32)
            stack += (labels > 0)[:, None] * np.array([400.0, 200.0 + 300.0 * dose, 150.0])[:, None, None]
            F.write_stack(root / f"{sid}.tiff", stack, CHANNELS)
            F.write_labels(root / F.labels_name(sid), labels)
            labels_by_site[sid] = labels
            rows.append({"Metadata_Plate": "P1", "Metadata_Well": well, "Metadata_Site": site,
                         "Metadata_Treatment": treatment, "Metadata_Dose": dose,
                         "FileName_Image": f"{sid}.tiff", "FileName_Labels": F.labels_name(sid)})
    plate_map = pd.DataFrame(rows)
    F.write_plate_map(plate_map, root / "plate_map.csv")
    return plate_map, labels_by_site


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Plate → crop_plate → score_dataset (test_scoring's model and settings, so the compiled
    programs are the ones test_scoring uses) → read_profiles."""
    root = tmp_path_factory.mktemp("pycytominer")
    (root / "plate").mkdir()
    _, labels = write_plate(root / "plate")
    data = C.crop_plate(root / "plate" / "plate_map.csv", root / "data",
                        C.CropConfig(crop_size=SPATIAL, channels=CHANNELS, workers=0, min_volume=10))
    model, v = model_and_variables()
    score_dataset(model, v, data, root / "profiles", SCORED, progress=False)
    return read_profiles(root / "profiles"), F.read_cells(data), labels


def columns(prof: pd.DataFrame) -> tuple[list[str], list[str]]:
    meta = [c for c in prof.columns if c.startswith("Metadata_")]
    return meta, [c for c in prof.columns if c not in meta]


def test_profiles_map_back_to_their_objects(scored):
    prof, cells, labels = scored
    n = len(WELLS) * len(SITES) * CELLS_PER_SITE
    assert len(prof) == len(cells) == n
    key = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber"]
    # The crop step writes the label id into cells.parquet; scoring carries it to the profile of that row.
    pd.testing.assert_frame_equal(prof[key + ["Metadata_Row"]], cells[key + ["Metadata_Row"]])
    assert not prof.duplicated(key).any()
    for sid, site in prof.groupby("Metadata_SiteId"):
        lab = labels[sid]
        assert sorted(site["Metadata_ObjectNumber"]) == sorted(np.unique(lab)[1:].tolist())
        zyx = site[["Metadata_Centroid_Z", "Metadata_Centroid_Y", "Metadata_Centroid_X"]].round().to_numpy(int)
        np.testing.assert_array_equal(lab[tuple(zyx.T)], site["Metadata_ObjectNumber"])
        np.testing.assert_array_equal(site["Metadata_Volume"], [np.sum(lab == i) for i in site["Metadata_ObjectNumber"]])


@pytest.fixture(scope="module")
def pipeline(scored):
    """normalize (standardize on controls) → feature_select → aggregate, all with explicit columns."""
    prof = scored[0]
    meta, feats = columns(prof)
    normalized = pycytominer.normalize(prof, features=feats, meta_features=meta, samples=CONTROLS, method="standardize")
    selected = pycytominer.feature_select(normalized, features=feats,
                                          operation=["variance_threshold", "correlation_threshold"], corr_threshold=CORR)
    kept = [c for c in feats if c in selected.columns]
    agg = pycytominer.aggregate(selected, strata=["Metadata_Plate", "Metadata_Well"], features=kept,
                                operation="median", compute_object_count=True, object_feature="Metadata_ObjectNumber")
    return prof, meta, feats, normalized, selected, kept, agg


def test_normalize_standardizes_by_the_controls(pipeline):
    prof, meta, feats, normalized, *_ = pipeline
    assert feats and all(c.startswith("EfficientNetTiny_") for c in feats)
    assert list(normalized.columns) == meta + feats and len(normalized) == len(prof)
    pd.testing.assert_frame_equal(normalized[meta], prof[meta])  # metadata untouched, ObjectNumber included
    x = prof[feats].to_numpy(np.float64)
    ctrl = prof.eval(CONTROLS).to_numpy()
    mu, sd = x[ctrl].mean(axis=0), x[ctrl].std(axis=0)  # StandardScaler: ddof = 0
    varies = sd > 1e-3 * sd.max()
    assert varies.sum() > len(feats) // 2
    got = normalized[feats].to_numpy(np.float64)
    np.testing.assert_allclose(got[:, varies], ((x - mu) / np.where(varies, sd, 1))[:, varies], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[ctrl][:, varies].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(got[ctrl][:, varies].std(axis=0), 1, rtol=1e-4)


def test_feature_select_leaves_no_pair_above_the_threshold(pipeline):
    prof, meta, feats, normalized, selected, kept, _ = pipeline
    assert list(selected.columns) == meta + kept and len(selected) == len(prof)
    assert 0 < len(kept) < len(feats)
    pd.testing.assert_frame_equal(selected[meta], prof[meta])
    assert (normalized[kept].to_numpy(np.float64).var(axis=0) > 1e-6).all()
    # pycytominer's rule: of each pair with signed Pearson correlation > CORR, one feature goes.
    corr = pd.DataFrame(np.corrcoef(normalized[feats].to_numpy(np.float64), rowvar=False), index=feats, columns=feats)
    k = corr.loc[kept, kept].to_numpy()
    assert k[np.tril_indices(len(kept), -1)].max() <= CORR
    for c in (c for c in feats if c not in kept):  # each dropped feature was (near) constant or correlated
        assert normalized[c].to_numpy(np.float64).var() <= 1e-6 or corr[c].drop(c).max() > CORR, c


def test_aggregate_equals_groupby_median(pipeline):
    prof, meta, feats, normalized, selected, kept, agg = pipeline
    strata = ["Metadata_Plate", "Metadata_Well"]
    want = selected.groupby(strata)[kept].median().reset_index()
    assert list(agg.columns) == strata + ["Metadata_Object_Count"] + kept
    assert agg["Metadata_Well"].tolist() == [w for w, *_ in WELLS]
    np.testing.assert_array_equal(agg["Metadata_Object_Count"], len(SITES) * CELLS_PER_SITE)
    np.testing.assert_allclose(agg[kept].to_numpy(np.float64), want[kept].to_numpy(np.float64), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- sphering vs pycytominer


def sphering_data(n_ctrl: int = 400, n_trt: int = 100, f: int = 8, seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """float64 profiles: controls with a well-conditioned correlation matrix (eigenvalues ≈ 0.5–1.4)
    and feature scales spanning 1e-2 … 1e2 (so ZCA and ZCA-cor differ), treated cells shifted."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(f, f)))
    mix = q @ np.diag(np.sqrt(np.linspace(1.0, 3.0, f))) @ q.T
    scales = np.geomspace(1e-2, 1e2, f)
    x = (rng.normal(size=(n_ctrl + n_trt, f)) @ mix + rng.normal(size=f) * 5) * scales
    x[n_ctrl:] += 0.7 * scales
    feats = [f"F{i}" for i in range(f)]
    df = pd.DataFrame(x, columns=feats)
    df.insert(0, "Metadata_Dose", np.r_[np.zeros(n_ctrl), np.ones(n_trt)])
    df.insert(0, "Metadata_Plate", "P1")
    return df, feats


def spherized_both(df, feats, *, ours: SpherizeConfig, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    theirs = pycytominer.normalize(df, features=feats, meta_features=["Metadata_Plate", "Metadata_Dose"], samples=CONTROLS,
                                   method="spherize", spherize_method="ZCA-cor", spherize_center=True,
                                   spherize_epsilon=epsilon)
    mine = spherize(df, ours, features=feats)
    assert list(mine.columns) == list(theirs.columns)
    return mine[feats].to_numpy(), theirs[feats].to_numpy()


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """The largest elementwise relative difference ``|a − b| / |b|``."""
    return float(np.max(np.abs(a - b) / np.abs(b)))


ZCA_COR = SpherizeConfig(method="ZCA-cor", epsilon=0.0, control_query=CONTROLS, by=())


def test_zca_cor_agrees_with_pycytominer_spherize():
    """Matched settings: ZCA-cor fitted on the controls, every cell centred on the control mean, ε = 0.

    ε must be 0 on both sides because it means different things: we add ε to each eigenvalue λ of
    the controls' correlation matrix (scale 1/√(λ + ε)), pycytominer adds it to each singular value
    s of the standardised control matrix (scale √(n−1)/(s + ε)); see `gradcamo_jax.sphering`. The
    standardisation's ddof (ours 1, StandardScaler's 0) scales every feature by the same √(n/(n−1))
    and whitening undoes any common scale, so it does not matter. Measured: ~1e-10 elementwise
    relative (on entries near 0), ~1e-15 relative to the largest entry.
    """
    df, feats = sphering_data()
    mine, theirs = spherized_both(df, feats, ours=ZCA_COR, epsilon=0.0)
    assert max_rel(mine, theirs) < 1e-6
    np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=0)


def test_default_epsilons_differ_by_the_first_order_term():
    """Each library's default ε = 1e-6 shrinks the direction of eigenvalue λ by ≈ ε/(2λ) (ours) and
    ≈ ε/√(nλ) (pycytominer); relative to the largest entry the outputs stay within ε/λ_min, while
    entries near 0 differ by more than 1e-6 relative: hence ε = 0 in the agreement test."""
    df, feats = sphering_data()
    ctrl = df.query(CONTROLS)[feats].to_numpy()
    lam_min = np.linalg.eigvalsh(np.corrcoef(ctrl, rowvar=False))[0]
    mine, theirs = spherized_both(df, feats, ours=SpherizeConfig("ZCA-cor", 1e-6, CONTROLS, by=()), epsilon=1e-6)
    assert np.max(np.abs(mine - theirs)) / np.max(np.abs(theirs)) < 1e-6 / lam_min
    assert max_rel(mine, theirs) > 1e-6


@pytest.mark.parametrize(
    "ours, epsilon",
    [
        pytest.param(SpherizeConfig("ZCA", 0.0, CONTROLS, by=()), 0.0, id="ZCA-not-cor"),
        pytest.param(SpherizeConfig("ZCA-cor", 0.0, "Metadata_Dose >= 0", by=()), 0.0, id="fitted-on-all-cells"),
        pytest.param(SpherizeConfig("ZCA-cor", 1e-2, CONTROLS, by=()), 1e-2, id="epsilon-conventions"),
    ],
)
def test_a_mismatched_setting_breaks_the_agreement(ours, epsilon):
    """The agreement test can fail: one mismatched setting moves the outputs far beyond 1e-6."""
    df, feats = sphering_data()
    mine, theirs = spherized_both(df, feats, ours=ours, epsilon=epsilon)
    assert max_rel(mine, theirs) > 1e-3


def test_fewer_controls_than_features_agree_on_the_controls_only():
    """With n controls < F features pycytominer whitens the F − n + 1 directions the controls do not
    span by the smallest non-zero singular value; we drop them (`gradcamo_jax.sphering`). The
    controls have no component there, so their outputs agree; other cells' do not."""
    df, feats = sphering_data(n_ctrl=10, n_trt=5, f=20, seed=1)
    mine, theirs = spherized_both(df, feats, ours=ZCA_COR, epsilon=0.0)
    ctrl = df.eval(CONTROLS).to_numpy()
    np.testing.assert_allclose(mine[ctrl], theirs[ctrl], rtol=0, atol=1e-9 * np.abs(theirs[ctrl]).max())
    assert np.abs(mine[~ctrl] - theirs[~ctrl]).max() > 0.1 * np.abs(theirs[~ctrl]).max()
