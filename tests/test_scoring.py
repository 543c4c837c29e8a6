"""Bulk scoring to Parquet: the same numbers as `explain` on the whole array, pycytominer-style
columns, CAM audit volumes, resume after a real kill -9 without duplicated or dropped cells."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
from conftest import blob_masks

from gradcamo_jax import EfficientNet, ModelConfig, calibrate_batch_stats, explain, gradcamo, init, scoring
from gradcamo_jax.data import formats
from gradcamo_jax.scoring import PART, ScoreConfig, cam_rows, read_cams, read_profiles, score_dataset

# The quick loop: the profiles equal one `explain` call, their columns, and the part rule; resume,
# errors, CAM samples, shards and other device or process counts in `make test`.
FAST = {
    "test_profiles_equal_one_explain_call_on_all_cells",
    "test_columns_are_pycytominer_style",
    "test_assigned_parts_cover_every_part_once",
    "test_auto_layer_and_coarse_layer_guard",
}

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig("tiny", num_classes=3, stem_stride=(1, 2, 2), conv_impl="xla")
SPATIAL, CHANNELS, N = (5, 20, 16), 3, 37


def make_dataset(path: Path, n: int = N, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, *SPATIAL, CHANNELS)).astype(np.float16)
    masks = blob_masks(n, SPATIAL, seed)
    formats.write_crop_store(path / "crops.zarr", images, masks, attrs={"channels": ["DNA", "ER", "Mito"]})
    cells = pd.DataFrame(
        {
            "Metadata_Plate": "P1",
            "Metadata_Well": [f"A{i % 4:02d}" for i in range(n)],
            "Metadata_Site": [i % 3 for i in range(n)],
            "Metadata_ObjectNumber": np.arange(1, n + 1),
            "Metadata_Dose": np.where(np.arange(n) % 4 == 0, 0.0, 1.6),
            "Metadata_Row": np.arange(n),
            "FileName_Image": "site.tif",  # not Metadata_: must not reach the profiles
        }
    )
    formats.write_cells(cells, path)
    return path


def model_and_variables(seed: int = 0):
    model = EfficientNet(CONFIG)
    key = jax.random.key(seed)
    v = init(CONFIG, key, (*SPATIAL, CHANNELS))
    v = calibrate_batch_stats(model, v, jax.random.normal(jax.random.fold_in(key, 1), (8, *SPATIAL, CHANNELS)))
    return model, v


def load_model(path) -> tuple[EfficientNet, dict]:
    """The subprocess workers' model: `CONFIG` with the test process's variables (`model_file`),
    so a worker compiles only the programs its check is about."""
    with open(path, "rb") as f:
        return EfficientNet(CONFIG), pickle.load(f)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """`model_and_variables()` as host arrays, for the subprocess workers (`load_model`)."""
    path = tmp_path_factory.mktemp("model") / "variables.pkl"
    with open(path, "wb") as f:
        pickle.dump(jax.device_get(model_and_variables()[1]), f)
    return path


# One configuration for the profiles that other runs are compared with.
SCORED = ScoreConfig(layer="stage2", feature_layers=("stage4", "top"), batch_size=8, rows_per_shard=16, cam_sample=5)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    base = tmp_path_factory.mktemp("score")
    data = make_dataset(base / "data")
    model, v = model_and_variables()
    stats = score_dataset(model, v, data, base / "profiles", SCORED, progress=False)
    return base, data, model, v, SCORED, stats


@pytest.fixture(scope="module")
def reference(scored):
    """One `explain` call on all cells of the scored dataset, with maps."""
    base, data, model, v, *_ = scored
    store = formats.open_crops(data)
    return explain(model, v, store.image[:].astype(np.float32), store.mask[:], layer="stage2",
                   feature_layers=("stage4", "top"), return_cam=True)


def test_profiles_equal_one_explain_call_on_all_cells(scored, reference):
    base, data, model, v, cfg, stats = scored
    assert stats["parts"] == 3 and stats["scored_parts"] == 3
    prof = read_profiles(base / "profiles")
    store = formats.open_crops(data)
    ref = reference
    np.testing.assert_array_equal(prof["Metadata_ObjectNumber"], np.arange(1, N + 1))
    np.testing.assert_allclose(prof["Metadata_GradCAMO"], ref.scores.cell, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prof["Metadata_GradCAMO_Neighbors"], ref.scores.neighbors, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prof["Metadata_GradCAMO_Chance"], ref.scores.chance, rtol=1e-6)
    # an independent recomputation of the score from the maps (NumPy, float64)
    cam = np.asarray(ref.cam, np.float64)
    inside = (cam * (store.mask[:] == 1)).sum(axis=(1, 2, 3)) / cam.sum(axis=(1, 2, 3))
    np.testing.assert_allclose(prof["Metadata_GradCAMO"], inside, rtol=1e-5)
    np.testing.assert_array_equal(prof["Metadata_Predicted"], np.argmax(ref.logits, axis=1))
    probs = prof[[f"Metadata_Prob_{k}" for k in range(3)]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-6)
    feats = [c for c in prof.columns if c.startswith("EfficientNetTiny_top_")]
    np.testing.assert_allclose(prof[feats].to_numpy(), ref.features["top"], rtol=1e-5, atol=1e-6)


def test_columns_are_pycytominer_style(scored):
    base, *_ = scored
    prof = read_profiles(base / "profiles")
    meta = [c for c in prof.columns if c.startswith("Metadata_")]
    feats = [c for c in prof.columns if not c.startswith("Metadata_")]
    for col in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber", "Metadata_Dose",
                "Metadata_GradCAMO", "Metadata_GradCAMO_Neighbors", "Metadata_GradCAMO_Background",
                "Metadata_GradCAMO_Chance", "Metadata_GradCAMO_Undefined", "Metadata_Predicted", "Metadata_Target"):
        assert col in meta
    assert "FileName_Image" not in prof.columns
    assert all(c.startswith(("EfficientNetTiny_stage4_", "EfficientNetTiny_top_")) for c in feats)
    assert all(np.issubdtype(prof[c].dtype, np.floating) for c in feats)
    # every part is plain Parquet readable by pandas on its own
    part = pd.read_parquet(base / "profiles" / PART.format(1))
    assert len(part) == 16 and part["Metadata_Row"].iloc[0] == 16


def test_cam_sample_saved_for_audit(scored, reference):
    """The saved float16 maps are `explain`'s maps of the sampled cells (the maps of the one call
    on all cells: a cell's map does not depend on the others in its batch)."""
    base, data, model, v, cfg, _ = scored
    rows, cams = read_cams(base / "profiles")
    np.testing.assert_array_equal(rows, cam_rows(N, 5))
    store = formats.open_crops(data)
    ref_cam, ref_cell = np.asarray(reference.cam)[rows], np.asarray(reference.scores.cell)[rows]
    np.testing.assert_allclose(cams.astype(np.float32), ref_cam, rtol=2e-3, atol=2e-3 * float(np.max(ref_cam)))
    np.testing.assert_allclose(gradcamo(cams.astype(np.float32), store.mask[rows]).cell, ref_cell, atol=2e-3)


def test_rerun_with_other_settings_refuses(scored):
    base, data, model, v, cfg, _ = scored
    with pytest.raises(ValueError, match="another run"):
        score_dataset(model, v, data, base / "profiles", ScoreConfig(layer="stage1", rows_per_shard=16), progress=False)
    stats = score_dataset(model, v, data, base / "profiles", cfg, progress=False)
    assert stats["scored_parts"] == 0


def test_nan_crop_names_the_cell(tmp_path):
    data = make_dataset(tmp_path / "data", n=6)
    store = formats.open_crops(data)
    img = store.image[:]
    img[4, 0, 0, 0, 0] = np.nan
    formats.write_crop_store(data / "crops.zarr", img, store.mask[:])
    model, v = model_and_variables()
    with pytest.raises(ValueError, match=r"crop row 4 .*A00/site 1, object 5"):
        score_dataset(model, v, data, tmp_path / "p", ScoreConfig(layer="stage2", batch_size=4), progress=False)


# The resumable run: parts of 4 cells, so a kill lands between and inside parts.
RESUME = ScoreConfig(layer="stage2", batch_size=4, rows_per_shard=4)

KILLED_WORKER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import test_scoring as t
    import gradcamo_jax.scoring as p
    model, v = t.load_model({model!r})
    orig = p.score_part
    def score_part(*a, **k):  # each part takes a while, so the parent can kill us between and inside parts
        time.sleep(0.4)
        return orig(*a, **k)
    p.score_part = score_part
    p.score_dataset(model, v, {data!r}, sys.argv[1], t.RESUME, progress=False)
    """
)


def _env(**extra: str) -> dict[str, str]:
    """The workers' environment: this session's compile settings and compilation cache, on the CPU."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", **extra}


@pytest.mark.slow
def test_resume_after_kill_neither_duplicates_nor_drops(tmp_path, model_file):
    """A run killed (-9) mid-way and resumed holds each cell once and equals an uninterrupted
    run. Only the killed run needs its own process; the uninterrupted run (first, so the killed
    worker finds its compiled programs in the persistent cache) and the resume run here."""
    data = make_dataset(tmp_path / "data")
    model, v = load_model(model_file)
    clean = tmp_path / "clean"
    score_dataset(model, v, data, clean, RESUME, progress=False)
    script = tmp_path / "worker.py"
    script.write_text(KILLED_WORKER.format(tests=str(ROOT / "tests"), model=str(model_file), data=str(data)))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(killed)], env=_env())
    deadline = time.time() + 300
    while time.time() < deadline and len(list(killed.glob("part-*.parquet"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(killed.glob("part-*.parquet")))
    assert 3 <= done_before < 10, "the kill must land in the middle of the run"
    stats = score_dataset(model, v, data, killed, RESUME, progress=False)
    assert stats["skipped_parts"] == done_before and stats["scored_parts"] == 10 - done_before
    a, b = read_profiles(killed), read_profiles(clean)
    assert len(a) == N
    assert not a.duplicated(["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber"]).any()
    assert not any(formats.is_temporary(p) for p in killed.iterdir()), "killed writer's temporary left behind"
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow
def test_eight_devices_give_the_same_profiles(tmp_path, scored, model_file):
    base, *_ = scored
    script = tmp_path / "w8.py"
    script.write_text(textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import jax
        assert jax.local_device_count() == 8, jax.devices()
        import test_scoring as t
        from gradcamo_jax.scoring import score_dataset
        model, v = t.load_model({str(model_file)!r})
        score_dataset(model, v, {str(base / 'data')!r}, {str(tmp_path / 'p8')!r}, t.SCORED, progress=False)
        """
    ))
    # This session's compile settings (XLA's default optimisation compiles several times slower).
    env = _env(XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip())
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=300)
    a, b = read_profiles(tmp_path / "p8"), read_profiles(base / "profiles")
    # float32 rounding differs with the per-device batch (seen: 1.1e-6 on a feature of -0.012, in
    # a column whose values reach 4); scores and metadata must agree as tightly.
    pd.testing.assert_frame_equal(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- across hosts


def test_assigned_parts_cover_every_part_once():
    for n_parts in (0, 1, 7, 16):
        for count in (1, 2, 3):
            for n_proc in (1, 2, 4):
                got = [k for i in range(count) for p in range(n_proc)
                       for k in scoring.assigned_parts(n_parts, (i, count), (p, n_proc))]
                assert sorted(got) == list(range(n_parts)), (n_parts, count, n_proc)


def test_job_array_shards_give_the_one_process_profiles_and_merge_checks_them(scored, tmp_path):
    base, data, model, v, cfg, _ = scored
    out = tmp_path / "sharded"
    for i in (1, 0):  # any order
        stats = score_dataset(model, v, data, out, cfg, progress=False, shard=(i, 2))
        assert stats["scored_parts"] == len(scoring.assigned_parts(stats["parts"], (i, 2)))
    record = scoring.verify_profiles(out)
    assert record["n_cells"] == N and (out / scoring.COMPLETE).exists()
    pd.testing.assert_frame_equal(read_profiles(out), read_profiles(base / "profiles"))
    # A part holding another part's cells, and a missing part, are named.
    (out / PART.format(1)).write_bytes((out / PART.format(0)).read_bytes())
    with pytest.raises(ValueError, match=r"part-00001\.parquet holds rows \[0, 1, 2\]"):
        scoring.verify_profiles(out)
    with pytest.raises(ValueError, match="each cell once"):
        read_profiles(out)
    (out / PART.format(1)).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 profile parts missing.*every --shard"):
        scoring.verify_profiles(out)


DISTRIBUTED_WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from gradcamo_jax import sharding
    sharding.initialize_distributed("127.0.0.1:" + sys.argv[1], 2, int(sys.argv[2]))
    import jax
    assert jax.process_count() == 2
    import test_scoring as t
    from gradcamo_jax.scoring import score_dataset
    model, v = t.load_model({model!r})
    print(score_dataset(model, v, {data!r}, {out!r}, t.SCORED, progress=False))
    """
)


@pytest.mark.slow
def test_two_processes_give_the_one_process_profiles(scored, tmp_path, model_file):
    """Two `jax.distributed` processes (gloo on 127.0.0.1) split the parts; the merged result is
    the single process's, cell for cell."""
    import socket

    base, data, *_ = scored
    out = tmp_path / "two"
    script = tmp_path / "dist.py"
    script.write_text(DISTRIBUTED_WORKER.format(tests=str(ROOT / "tests"), model=str(model_file), data=str(data),
                                                out=str(out)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env()
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    scoring.verify_profiles(out)
    pd.testing.assert_frame_equal(read_profiles(out), read_profiles(base / "profiles"))
    rows, cams = read_cams(out)
    ref_rows, ref_cams = read_cams(base / "profiles")
    order, ref_order = np.argsort(rows), np.argsort(ref_rows)
    np.testing.assert_array_equal(rows[order], ref_rows[ref_order])
    np.testing.assert_array_equal(cams[order], ref_cams[ref_order])


# ----------------------------------------------------------------------------- layer resolution


def test_auto_layer_and_coarse_layer_guard(tmp_path):
    """"auto" picks the deepest layer with an 8-voxel map in Y and X; a map under 4 voxels is
    refused (it would only restate the cell's volume fraction) unless forced, and the manifest
    records the map size."""
    b0 = ModelConfig("b0", num_classes=6, stem_stride=(1, 2, 2))
    assert scoring.default_layer(b0, (21, 128, 128)) == "stage5"  # (3, 8, 8); stage6 is (2, 4, 4)
    assert scoring.default_layer(ModelConfig("tiny", stem_stride=(1, 2, 2)), (5, 32, 32)) == "stage2"
    assert scoring.default_layer(CONFIG, SPATIAL) == "stage1"  # stem and stage1 (5, 10, 8); stage2 (3, 5, 4)
    with pytest.raises(ValueError, match=r"'stage5' gives a 2×2×2 map on 5×32×32 crops.*'auto' picks 'stage2'"):
        scoring.check_layer_resolution(ModelConfig("tiny", stem_stride=(1, 2, 2)), (5, 32, 32), "stage5")
    data = make_dataset(tmp_path / "data", n=6)
    model, v = model_and_variables()
    with pytest.raises(ValueError, match="too coarse.*--allow-coarse-layer"):
        score_dataset(model, v, data, tmp_path / "p", ScoreConfig(layer="stage4"), progress=False)
    assert not (tmp_path / "p" / scoring.MANIFEST).exists()
    score_dataset(model, v, data, tmp_path / "p", ScoreConfig(layer="stage4", allow_coarse_layer=True, batch_size=8),
                  progress=False)
    manifest = formats.read_json(tmp_path / "p" / scoring.MANIFEST)
    assert manifest["layer"] == "stage4" and manifest["layer_map_shape"] == [2, 2, 2]


def test_audit_columns_equal_the_audit_library_per_cell(tmp_path):
    """`--audit` columns: the same numbers as `audit.model_reliance` and `audit.random_baseline`
    on the whole array (cell keys folded with the row, so batching does not change them).
    8 cells in batches of 3 (the last one padded); 8, so the random model's BatchNorm
    calibration on the first crops reuses `model_and_variables`' compiled calibration."""
    from gradcamo_jax import audit

    n = 8
    data = make_dataset(tmp_path / "data", n=n)
    model, v = model_and_variables()
    cfg = ScoreConfig(layer="stage1", batch_size=3, rows_per_shard=16, audit=True, audit_fills=("noise", "mean"))
    score_dataset(model, v, data, tmp_path / "p", cfg, progress=False)
    prof = read_profiles(tmp_path / "p")
    store = formats.open_crops(data)
    images, masks = store.image[:].astype(np.float32), store.mask[:]
    settings = audit.RelianceSettings(fills=("noise", "mean"))
    base = jax.random.key(0)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(np.arange(n))
    ref = audit.model_reliance(model, v, images, masks, key=keys, settings=settings)
    for region in ("background", "neighbors", "cell", "context"):
        for fill in ("noise", "mean"):
            col = f"Metadata_Audit_Drop_{region.capitalize()}_{fill.capitalize()}"
            np.testing.assert_allclose(prof[col], ref.drop(region, fill), rtol=1e-4, atol=1e-5, err_msg=col)
    np.testing.assert_allclose(prof["Metadata_Audit_ContextReliance"], ref.cri, rtol=1e-4, atol=1e-5)
    rv = audit.randomized_variables(CONFIG, jax.random.key(0), images[:n])
    rb = audit.random_baseline(model, v, images, masks, random_variables=rv, layer="stage1")
    np.testing.assert_allclose(prof["Metadata_GradCAMO_Random"], rb.gradcamo_random, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(prof["Metadata_GradCAMO_Corrected"], rb.corrected, rtol=1e-4, atol=1e-5)
    # Interchange columns: the donors are the pool's most confident cells of each predicted class
    # (all 8 rows are sampled here), recomputed from the model's own logits; the columns equal
    # `audit.interchange` of the whole array with the donors the pool deals to each row.
    logits = np.asarray(jax.jit(lambda x: model.apply(v, x, train=False))(images), np.float64)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    pool = scoring.swap_pool(audit.efficientnet_logits(model, v), store, n, cfg, CONFIG.num_classes)
    np.testing.assert_array_equal(np.sort(pool.rows), np.arange(n))  # 8 cells, at most 8 per class: all kept
    for k, group in enumerate(pool.groups):
        rows_k = pool.rows[group]
        assert (prob[rows_k].argmax(1) == k).all()
        assert np.all(np.diff(prob[rows_k, k]) <= 0)  # most confident first
    idx = pool.donor_index(np.arange(n))
    assert idx.shape == (n, CONFIG.num_classes * cfg.audit_swap_donors)
    np.testing.assert_array_equal(pool.donor_index(np.arange(3, 6)), idx[3:6])  # a row's donors do not depend on the batch
    ref = audit.interchange(audit.efficientnet_logits(model, v), images, masks, pool.images[idx], pool.masks[idx])
    for col, want in (("Metadata_Audit_FollowContext", ref.follow_context), ("Metadata_Audit_FollowCell", ref.follow_cell),
                      ("Metadata_Audit_InterchangeIndex", ref.index)):
        np.testing.assert_allclose(prof[col], want, rtol=1e-4, atol=1e-5, err_msg=col)
    np.testing.assert_array_equal(prof["Metadata_Audit_InterchangeDonors"], np.asarray(ref.valid).sum(1))
    assert np.isfinite(prof["Metadata_Audit_FollowContext"]).any()
    recorded = formats.read_json(tmp_path / "p" / scoring.SWAP_POOL_FILE)
    assert recorded["rows"] == pool.rows.tolist() and recorded["predicted"] == pool.predicted.tolist()
