"""Context remedies (`DataConfig.context_remedy`): the augmentation and the input transform leave
the central cell's voxels bit-identical; "randomize" replaces only context voxels, by the audit's
fills with their stated statistics; a "mask" model's context reliance is exactly 0; scoring
applies the run's inference transform; the same seed gives the same batches."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from conftest import blob_masks

from gradcamo_jax import EfficientNet, ModelConfig, audit, calibrate_batch_stats, explain, init
from gradcamo_jax.config import DataConfig, TrainConfig, config_from_dict, config_to_dict
from gradcamo_jax.data import formats, pipeline
from gradcamo_jax.scoring import ScoreConfig, read_profiles, remedy_logits, score_dataset

FAST = {
    "test_context_transform",
    "test_every_remedy_keeps_the_central_cell_bit_identical",
    "test_randomize_noise_changes_only_context_with_its_moments",
    "test_randomize_swap_copies_a_control_cells_context",
    "test_same_seed_same_batches",
    "test_mask_model_has_zero_context_reliance",
    "test_config_checks_and_round_trip",
    "test_scoring_applies_the_runs_inference_transform",
}

SPATIAL, CHANNELS, N = (5, 16, 16), 3, 12
AUG_OFF = dict(flip_xy=False, rot90_xy=False, intensity_scale=0.0, intensity_shift=0.0)


def cells_arrays(n: int = N, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = (rng.normal(size=(n, *SPATIAL, CHANNELS)) * [1.0, 2.0, 0.5] + [0.2, -1.0, 3.0]).astype(np.float32)
    masks = blob_masks(n, SPATIAL, seed)
    labels = np.arange(n) % 3  # class 0 = controls: cells 0, 3, 6, 9
    return images, masks, labels


def source(n: int = N, seed: int = 0) -> pipeline.ArraySource:
    images, masks, labels = cells_arrays(n, seed)
    return pipeline.ArraySource(images, masks, labels)


def first_batches(src, config: DataConfig, seed: int = 0, k: int = 2) -> list[dict]:
    ds = pipeline.train_dataset(src, config, seed)
    return [ds[t] for t in range(k)]


def test_context_transform():
    images, masks, _ = cells_arrays(4)
    cell = masks == 1
    for remedy in ("none", "randomize"):
        assert pipeline.context_transform(images, masks, remedy) is images
    for xp in (np, jnp):
        x, m = xp.asarray(images), xp.asarray(masks)
        masked = np.asarray(pipeline.context_transform(x, m, "mask"))
        att = np.asarray(pipeline.context_transform(x, m, "attenuate", 0.25))
        assert masked.dtype == att.dtype == np.float32
        np.testing.assert_array_equal(masked[cell], images[cell])  # bit-identical cell
        np.testing.assert_array_equal(att[cell], images[cell])
        assert np.all(masked[~cell] == 0) and not np.signbit(masked[~cell]).any()  # +0, as a select gives
        np.testing.assert_array_equal(att[~cell], images[~cell] * np.float32(0.25))
    with pytest.raises(ValueError, match="context remedy"):
        pipeline.context_transform(images, masks, "blur")
    with pytest.raises(ValueError, match="mask shape"):
        pipeline.context_transform(images, masks[:, 0], "mask")


@pytest.mark.parametrize("augmented", [True, False])
def test_every_remedy_keeps_the_central_cell_bit_identical(augmented):
    """Against remedy "none" at the same seed (flips, rotations and jitter on or off): masks and
    labels identical, the central cell's voxels bit for bit, context changed as the remedy says."""
    src = source()
    base = {} if augmented else AUG_OFF
    ref = first_batches(src, DataConfig(batch_size=4, **base))
    for remedy in ("randomize", "mask", "attenuate"):
        cfg = DataConfig(batch_size=4, context_remedy=remedy, randomize_prob=1.0, **base)
        for r, b in zip(ref, first_batches(src, cfg)):
            np.testing.assert_array_equal(b["mask"], r["mask"])
            np.testing.assert_array_equal(b["index"], r["index"])
            cell = r["mask"] == 1
            np.testing.assert_array_equal(b["image"][cell], r["image"][cell], err_msg=remedy)
            ctx = ~cell
            if remedy == "mask":
                assert np.all(b["image"][ctx] == 0)
            elif remedy == "attenuate":
                np.testing.assert_array_equal(b["image"][ctx], r["image"][ctx] * np.float32(cfg.context_factor))
            else:
                assert np.mean(b["image"][ctx] != r["image"][ctx]) > 0.99


def test_randomize_noise_changes_only_context_with_its_moments():
    """The "noise" fill: the audit's matched noise, per crop and channel the context's own mean
    and SD (exactly, to rounding); every non-context voxel unchanged; validation unchanged."""
    src = source()
    cfg = DataConfig(batch_size=4, context_remedy="randomize", randomize_prob=1.0, randomize_fill="noise", **AUG_OFF)
    ref = first_batches(src, DataConfig(batch_size=4, **AUG_OFF))
    for r, b in zip(ref, first_batches(src, cfg)):
        for x0, x1, m in zip(r["image"], b["image"], r["mask"]):
            ctx = m != 1
            np.testing.assert_array_equal(x1[~ctx], x0[~ctx])
            assert np.all(x1[ctx] != x0[ctx])
            np.testing.assert_allclose(x1[ctx].mean(0), x0[ctx].mean(0), atol=2e-5)
            np.testing.assert_allclose(x1[ctx].std(0), x0[ctx].std(0), rtol=1e-4)
    # The augmentation is for training only: validation crops are as stored.
    ev = pipeline.eval_dataset(src, cfg)[0]
    np.testing.assert_array_equal(ev["image"][:N], src.images)


def test_randomize_swap_copies_a_control_cells_context():
    """The "swap" fill: the context voxels of another control cell's crop, bit for bit."""
    src = source()
    cfg = DataConfig(batch_size=4, context_remedy="randomize", randomize_prob=1.0, randomize_fill="swap", **AUG_OFF)
    controls = np.flatnonzero(src.labels == 0)
    for b in first_batches(src, cfg, k=3):
        for x1, m, idx in zip(b["image"], b["mask"], b["index"]):
            ctx = m != 1
            np.testing.assert_array_equal(x1[~ctx], src.images[idx][~ctx])
            donors = [j for j in controls if j != idx and np.array_equal(src.images[j][ctx], x1[ctx])]
            assert len(donors) == 1, f"cell {idx}: context is not one other control cell's"


def test_randomize_probability_and_fallback():
    """p = 0 leaves crops as remedy "none" gives them; "swap" without a control cell falls back to noise."""
    src = source()
    ref = first_batches(src, DataConfig(batch_size=4))
    for r, b in zip(ref, first_batches(src, DataConfig(batch_size=4, context_remedy="randomize", randomize_prob=0.0))):
        np.testing.assert_array_equal(b["image"], r["image"])
    no_controls = pipeline.ArraySource(src.images, src.masks, np.ones(N, np.int64))
    cfg = DataConfig(batch_size=4, context_remedy="randomize", randomize_prob=1.0, randomize_fill="swap", **AUG_OFF)
    b = first_batches(no_controls, cfg, k=1)[0]
    ctx = b["mask"] != 1
    assert np.all(b["image"][ctx] != src.images[b["index"]][ctx])


def test_same_seed_same_batches():
    src = source()
    for remedy in ("randomize", "mask", "attenuate"):
        cfg = DataConfig(batch_size=4, context_remedy=remedy)
        a, b = first_batches(src, cfg, seed=3, k=3), first_batches(src, cfg, seed=3, k=3)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x["image"], y["image"])
    # Another seed draws other noise for the same cells (rng stream (seed, position, 1)).
    cfg = DataConfig(batch_size=4, context_remedy="randomize", randomize_prob=1.0, randomize_fill="noise", **AUG_OFF)
    a = pipeline._LoadTrain(src, pipeline.grain.MapDataset.range(N), cfg, 0)(0)
    b = pipeline._LoadTrain(src, pipeline.grain.MapDataset.range(N), cfg, 1)(0)
    ctx = a["mask"] != 1
    assert np.all(a["image"][ctx] != b["image"][ctx])
    np.testing.assert_array_equal(a["image"][~ctx], b["image"][~ctx])


def test_mask_model_has_zero_context_reliance(tiny3d):
    """A model trained with "mask" sees its input through the mask: through `scoring.remedy_logits`
    every fill of the background, neighbours or context drops its log-probability by exactly 0,
    and the context-reliance index is 0 wherever it is defined. "attenuate" does not have that
    guarantee (the context still reaches the model)."""
    images, masks = tiny3d.images, tiny3d.masks
    donors = np.roll(images, 1, axis=0)
    settings = audit.RelianceSettings(fills=audit.FILLS, cri_fill="noise")
    fn = remedy_logits(tiny3d.model, tiny3d.variables, "mask")
    res = audit.reliance(fn, images, masks, key=jax.random.key(0), donors=donors, settings=settings)
    for region in ("background", "neighbors", "context"):
        for fill in audit.FILLS:
            np.testing.assert_array_equal(np.asarray(res.drop(region, fill)), 0.0, err_msg=f"{region}/{fill}")
    cri = np.asarray(res.cri)
    assert np.isfinite(cri).any() and np.all(cri[np.isfinite(cri)] == 0)
    assert np.any(np.abs(np.asarray(res.drops[:, res.regions.index("cell")])) > 0)
    # The interchange test agrees: swapping in another cell's context moves nothing.
    order = np.stack([(np.arange(4) + k) % 4 for k in (1, 2, 3)], axis=1)
    sw = audit.interchange(fn, images, masks, images[order], masks[order])
    np.testing.assert_array_equal(np.asarray(sw.shift_context), 0.0)
    assert np.any(np.abs(np.asarray(sw.shift_cell)) > 0)
    att = audit.reliance(remedy_logits(tiny3d.model, tiny3d.variables, "attenuate", 0.25), images, masks,
                         key=jax.random.key(0), donors=donors, settings=settings)
    assert np.any(np.asarray(att.drop("context", "noise")) != 0)
    # "none"/"randomize" take the audit's own logits function.
    assert remedy_logits(tiny3d.model, tiny3d.variables, "randomize").func == audit.efficientnet_logits(
        tiny3d.model, tiny3d.variables).func


def test_config_checks_and_round_trip():
    for bad in (dict(context_remedy="blur"), dict(context_factor=0.0), dict(context_factor=1.0),
                dict(randomize_prob=1.5), dict(randomize_fill="mean")):
        with pytest.raises(ValueError, match="DataConfig"):
            DataConfig(**bad)
    cfg = TrainConfig(data=DataConfig(context_remedy="attenuate", context_factor=0.4))
    back = config_from_dict(TrainConfig, config_to_dict(cfg))
    assert back == cfg and back.data.context_remedy == "attenuate" and back.data.context_factor == 0.4
    # A run recorded before the fields existed reads as remedy "none".
    old = config_to_dict(TrainConfig())
    for k in ("context_remedy", "context_factor", "randomize_prob", "randomize_fill", "control_class"):
        old["data"].pop(k)
    assert config_from_dict(TrainConfig, old) == TrainConfig()


# ----------------------------------------------------------------------------- scoring

CONFIG = ModelConfig("tiny", num_classes=3, stem_stride=(1, 2, 2), conv_impl="xla")


def make_store(path: Path, n: int = 10) -> Path:
    images, masks, _ = cells_arrays(n)
    formats.write_crop_store(path / "crops.zarr", images.astype(np.float16), masks,
                             attrs={"channels": ["DNA", "ER", "Mito"]})
    formats.write_cells(pd.DataFrame({
        "Metadata_Plate": "P1", "Metadata_Well": [f"A{i % 4:02d}" for i in range(n)],
        "Metadata_Site": 0, "Metadata_ObjectNumber": np.arange(1, n + 1),
        "Metadata_Dose": np.where(np.arange(n) % 4 == 0, 0.0, 1.0), "Metadata_Row": np.arange(n),
    }), path)
    return path


def test_scoring_applies_the_runs_inference_transform(tmp_path):
    """`score_dataset(data_config=run's DataConfig)` scores a "mask"/"attenuate" model on the
    transformed crops: its profiles equal `explain` of the transformed crops and differ from
    the untransformed ones (so a scoring path that forgot the transform fails here); the
    manifest records the remedy; the audit columns of a "mask" model show no context reliance."""
    data = make_store(tmp_path / "data")
    model = EfficientNet(CONFIG)
    key = jax.random.key(0)
    v = calibrate_batch_stats(model, init(CONFIG, key, (*SPATIAL, CHANNELS)),
                              jax.random.normal(jax.random.fold_in(key, 1), (8, *SPATIAL, CHANNELS)))
    store = formats.open_crops(data)
    images, masks = store.image[:].astype(np.float32), store.mask[:]
    feats = lambda p: p[[c for c in p.columns if c.startswith("EfficientNetTiny_top_")]].to_numpy()  # noqa: E731
    for remedy in ("mask", "attenuate"):
        dcfg = DataConfig(context_remedy=remedy, context_factor=0.5)
        out = tmp_path / remedy
        cfg = ScoreConfig(layer="stage1", feature_layers=("top",), batch_size=4, rows_per_shard=16,
                          audit=remedy == "mask", audit_fills=("noise", "blur"))
        score_dataset(model, v, data, out, cfg, data_config=dcfg, progress=False)
        prof = read_profiles(out)
        x = pipeline.context_transform(images, masks, remedy, 0.5)
        ref = explain(model, v, x, masks, layer="stage1", feature_layers=("top",))
        raw = explain(model, v, images, masks, layer="stage1", feature_layers=("top",))
        np.testing.assert_allclose(feats(prof), ref.features["top"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(prof["Metadata_GradCAMO"], ref.scores.cell, rtol=1e-5, atol=1e-6)
        assert np.abs(feats(prof) - raw.features["top"]).max() > 1e-3
        manifest = formats.read_json(out / "manifest.json")
        assert manifest["context_remedy"]["remedy"] == remedy
        if remedy == "mask":
            for region in ("Background", "Neighbors", "Context"):
                for fill in ("Noise", "Blur"):
                    np.testing.assert_array_equal(prof[f"Metadata_Audit_Drop_{region}_{fill}"], 0.0)
    # Without a remedy the manifest is as before (no new key), and crop_shape must agree with data_config.
    score_dataset(model, v, data, tmp_path / "none", ScoreConfig(layer="stage1", batch_size=4), progress=False)
    assert "context_remedy" not in formats.read_json(tmp_path / "none" / "manifest.json")
    with pytest.raises(ValueError, match="disagree"):
        score_dataset(model, v, data, tmp_path / "bad", ScoreConfig(layer="stage1"), crop_shape=(3, 8, 8),
                      data_config=DataConfig(), progress=False)


def test_training_records_the_remedy_and_validates_through_it(tmp_path):
    """A short "mask" run: the checkpoint's config carries the remedy (what scoring needs), and
    training runs with each remedy (a few steps)."""
    from gradcamo_jax.train import load_checkpoint, train_and_evaluate

    images, masks, labels = cells_arrays(24)
    cells = pd.DataFrame({"Metadata_Plate": "P1", "Metadata_Well": [f"W{i % 12:02d}" for i in range(24)],
                          "Metadata_Class": np.arange(24) % 12 % 3})
    for remedy in ("randomize", "mask"):
        dcfg = DataConfig(batch_size=4, eval_batch_size=8, split_fractions=(0.5, 0.25, 0.25), context_remedy=remedy)
        ds = pipeline.dataset_from_arrays(images, masks, cells, dcfg)
        cfg = TrainConfig(model=dataclasses.replace(CONFIG, num_classes=3), data=dcfg, num_steps=2, warmup_steps=1,
                          checkpoint_every=2, async_checkpointing=False, progress_bar=False)
        out = train_and_evaluate(cfg, tmp_path / remedy, ds)
        assert out["step"] == 2
        loaded, _ = load_checkpoint(tmp_path / remedy, "latest")
        assert loaded.data.context_remedy == remedy
    # `gradcamo score` on the "mask" run scores through the run's transform (it used to pass
    # only the crop shape and binning, so a mask model was scored on unmasked crops).
    from gradcamo_jax import cli

    data = make_store(tmp_path / "data")
    assert cli.main(["score", "--checkpoint", str(tmp_path / "mask"), "--step", "latest", "--data", str(data),
                     "--out", str(tmp_path / "scored"), "--layer", "stage1", "--batch-size", "4",
                     "--audit", "--audit-swap-donors", "1", "--no-progress"]) == 0
    manifest = formats.read_json(tmp_path / "scored" / "manifest.json")
    assert manifest["context_remedy"]["remedy"] == "mask" and manifest["audit"]["swap_donors"] == 1
    # Through the run's transform, a masked model's prediction cannot follow a swapped context:
    # the context swap's masked input is the original's, bit for bit.
    from gradcamo_jax.scoring import read_profiles

    prof = read_profiles(tmp_path / "scored")
    fc = prof["Metadata_Audit_FollowContext"]
    assert ((fc == 0) | fc.isna()).all()
    assert (prof["Metadata_Audit_Drop_Context_Noise"] == 0).all()
