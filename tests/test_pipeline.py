"""The grain pipeline: split by well, per-process shards, augmentation alignment, exact resume.

No JAX compilation here: everything is NumPy and grain, so these tests are fast.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from gradcamo_jax.config import DataConfig
from gradcamo_jax.data import pipeline as pl
from gradcamo_jax.data import splits


def cell_table(wells_per_class=(4, 4, 4), cells_per_well=5, plates=("P1",)) -> pd.DataFrame:
    rows = []
    for plate in plates:
        for k, n_wells in enumerate(wells_per_class):
            for w in range(n_wells):
                for _ in range(cells_per_well):
                    rows.append({"Metadata_Plate": plate, "Metadata_Well": f"{chr(65 + k)}{w:02d}", "Metadata_Class": k})
    return pd.DataFrame(rows)


def arrays(n, shape=(3, 8, 8, 2), seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, *shape)).astype(np.float32)
    masks = rng.integers(0, 3, (n, *shape[:3])).astype(np.uint8)
    return images, masks


CFG = DataConfig(batch_size=8, eval_batch_size=6, split_fractions=(0.5, 0.25, 0.25), read_threads=1, prefetch=2)


def small_dataset(cfg=CFG, **kw):
    cells = cell_table(**kw)
    images, masks = arrays(len(cells))
    return pl.dataset_from_arrays(images, masks, cells, cfg), images, masks


# ----------------------------------------------------------------------------- split


def test_split_keeps_wells_whole_and_stratifies():
    cells = cell_table(wells_per_class=(4, 5, 8), plates=("P1", "P2"))
    split = splits.split_cells(cells, (0.5, 0.25, 0.25), seed=3)
    per_well = pd.DataFrame({"w": cells.Metadata_Plate + cells.Metadata_Well, "s": split}).groupby("w")["s"].nunique()
    assert (per_well == 1).all()
    for k in range(3):
        in_k = split[cells.Metadata_Class.to_numpy() == k]
        assert {"train", "val", "test"} <= set(in_k), k  # every class is evaluated and trained
    # Deterministic per seed, different across seeds.
    assert (splits.split_cells(cells, (0.5, 0.25, 0.25), seed=3) == split).all()
    assert (splits.split_cells(cells, (0.5, 0.25, 0.25), seed=4) != split).any()


def test_split_small_classes_keep_a_training_well():
    cells = cell_table(wells_per_class=(1, 2, 3))
    split = splits.split_cells(cells, (0.1, 0.5, 0.4), seed=0)
    for k, expected in enumerate(({"train"}, {"train", "val"}, {"train", "val", "test"})):
        assert set(split[cells.Metadata_Class.to_numpy() == k]) == expected


def test_stored_split_is_used_and_checked():
    cells = cell_table()
    stored = np.where(cells.Metadata_Well.str.endswith("00"), "val", "train")
    cfg = DataConfig()  # split_fractions=None: the stored split
    assert (pl.cell_splits(cells.assign(Metadata_Split=stored), cfg) == stored).all()
    mixed = stored.copy()
    mixed[0] = "val" if mixed[0] == "train" else "train"  # one cell of a well in another split
    with pytest.raises(ValueError, match="more than one split"):
        pl.cell_splits(cells.assign(Metadata_Split=mixed), cfg)
    computed = pl.cell_splits(cells.assign(Metadata_Split=stored), dataclasses.replace(cfg, split_fractions=(0.5, 0.25, 0.25)))
    assert not (computed == stored).all()


# ----------------------------------------------------------------------------- batches


def test_process_shards_concatenate_to_the_global_batch():
    data, _, _ = small_dataset()
    src = data.sources["train"]
    whole = pl.train_dataset(src, CFG, seed=5)
    for count in (2, 4):
        parts = [pl.train_dataset(src, CFG, seed=5, process_index=p, process_count=count) for p in range(count)]
        for t in (0, 3, 11):
            got = {k: np.concatenate([part[t][k] for part in parts]) for k in whole[t]}
            for k, v in whole[t].items():
                np.testing.assert_array_equal(got[k], v, err_msg=f"{k} step {t} P={count}")
    with pytest.raises(ValueError, match="does not divide"):
        pl.train_dataset(src, CFG, seed=5, process_index=0, process_count=3)


def test_epochs_are_permutations_reshuffled_each_epoch():
    data, _, _ = small_dataset()
    src = data.sources["train"]
    ds = pl.train_dataset(src, dataclasses.replace(CFG, batch_size=len(src)), seed=1)
    e0, e1 = ds[0]["index"], ds[1]["index"]
    assert sorted(e0) == sorted(src.indices) == sorted(e1)
    assert (e0 != e1).any()
    other_seed = pl.train_dataset(src, dataclasses.replace(CFG, batch_size=len(src)), seed=2)[0]["index"]
    assert (other_seed != e0).any()


def test_iterator_state_resumes_exactly():
    data, _, _ = small_dataset()
    ds = pl.train_dataset(data.sources["train"], CFG, seed=0)
    it = pl.make_iterator(ds, CFG)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = pl.make_iterator(ds, CFG)
    resumed.set_state(state)
    for a in expected:
        b = next(resumed)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(expected[0]["image"], ds[5]["image"])  # batch t is a pure function of t


def test_augmentation_keeps_mask_aligned_and_is_deterministic():
    cfg = dataclasses.replace(CFG, intensity_scale=0.0, intensity_shift=0.0)
    cells = cell_table()
    images, masks = arrays(len(cells), shape=(3, 8, 8, 2))
    images[..., 1] = masks  # channel 1 is the mask: any misalignment shows
    data = pl.dataset_from_arrays(images, masks, cells, cfg)
    ds = pl.train_dataset(data.sources["train"], cfg, seed=0)
    changed = 0
    for t in range(6):
        b = ds[t]
        np.testing.assert_array_equal(b["image"][..., 1], b["mask"])
        changed += sum(not np.array_equal(b["mask"][i], masks[b["index"][i]]) for i in range(len(b["index"])))
        # Same seed and step, same augmentation.
        np.testing.assert_array_equal(pl.train_dataset(data.sources["train"], cfg, seed=0)[t]["image"], b["image"])
    assert changed > 0  # flips/rotations happened
    plain = dataclasses.replace(cfg, flip_xy=False, rot90_xy=False)
    b = pl.train_dataset(data.sources["train"], plain, seed=0)[0]
    np.testing.assert_array_equal(b["image"], images[b["index"]])


def test_intensity_jitter_is_per_channel_affine():
    cfg = dataclasses.replace(CFG, flip_xy=False, rot90_xy=False, intensity_scale=0.2, intensity_shift=0.1)
    data, images, _ = small_dataset(cfg)
    b = pl.train_dataset(data.sources["train"], cfg, seed=0)[0]
    for i in range(3):
        x, y = images[b["index"][i]], b["image"][i]
        for c in range(x.shape[-1]):
            slope, intercept = np.polyfit(x[..., c].ravel(), y[..., c].ravel(), 1)
            assert 0.8 <= slope <= 1.2 and abs(intercept) <= 0.1 + 1e-6
            np.testing.assert_allclose(y[..., c], slope * x[..., c] + intercept, atol=1e-4)


def test_eval_covers_each_cell_once_with_padding():
    data, images, _ = small_dataset()
    src = data.sources["val"]
    seen = []
    for count in (1, 2):
        idx, valid = [], []
        for p in range(count):
            ds = pl.eval_dataset(src, CFG, p, count)
            idx.append(np.concatenate([b["index"] for b in ds]))
            valid.append(np.concatenate([b["valid"] for b in ds]))
            assert all(len(b["index"]) == CFG.eval_batch_size // count for b in ds)
        got = np.concatenate(idx)[np.concatenate(valid)]
        assert sorted(got) == sorted(src.indices)
        seen.append(sorted(got))
    b = pl.eval_dataset(src, CFG)[0]
    np.testing.assert_array_equal(b["image"], images[b["index"]])  # no augmentation


def test_centre_crop_and_downsample():
    cfg = dataclasses.replace(CFG, crop_shape=(3, 6, 6), downsample=(1, 2, 3))
    image = np.arange(5 * 10 * 12 * 2, dtype=np.float32).reshape(5, 10, 12, 2)
    mask = np.zeros((5, 10, 12), np.uint8)
    mask[2, 5, 7] = 1  # crop voxel (1, 3, 4): the centre of bin (1, 1, 1)
    out, m = pl.centre_crop_and_bin(image, mask, cfg.crop_shape, cfg.downsample)
    assert out.shape == (3, 3, 2, 2) and m.shape == (3, 3, 2)
    assert pl.transform_shape(image.shape, cfg.crop_shape, cfg.downsample) == out.shape
    crop = image[1:4, 2:8, 3:9]
    np.testing.assert_allclose(out[0, 0, 0], crop[0, :2, :3].reshape(-1, 2).mean(0))
    assert m.sum() == 1 and m[1, 1, 1] == 1  # the centre voxel keeps its code


def test_crop_store_source_reads_rows(tmp_path):
    from gradcamo_jax.data import formats

    cells = cell_table(wells_per_class=(2, 2), cells_per_well=3)
    images, masks = arrays(len(cells), shape=(3, 8, 8, 5))
    formats.write_crop_store(tmp_path / formats.CROPS_STORE, images, masks)
    # Rows of the table are not in store order: Metadata_Row maps them.
    perm = np.random.default_rng(0).permutation(len(cells))
    formats.write_cells(cells.iloc[perm].assign(Metadata_Row=perm), tmp_path)
    data = pl.open_dataset(str(tmp_path), DataConfig(split_fractions=(0.5, 0.5, 0.0)))
    assert data.input_shape == (3, 8, 8, 5) and data.num_classes == 2
    for src in data.sources.values():
        for i in range(len(src)):
            ex = src[i]
            np.testing.assert_allclose(ex["image"], images[ex["index"]], atol=1e-2)  # float16 store
            np.testing.assert_array_equal(ex["mask"], masks[ex["index"]])
            assert ex["label"] == cells.Metadata_Class[ex["index"]]
    assert sum(len(s) for s in data.sources.values()) == len(cells)


@pytest.mark.slow
def test_two_workers_give_the_same_batches_and_throughput():
    """grain worker processes (mp_prefetch) deliver exactly the in-process batches; prints cells/s."""
    import absl.flags

    absl.flags.FLAGS.mark_as_parsed()
    data, _, _ = small_dataset()
    ds = pl.train_dataset(data.sources["train"], CFG, seed=0)
    it = pl.make_iterator(ds, dataclasses.replace(CFG, worker_count=2))
    for t in range(6):
        b = next(it)
        np.testing.assert_array_equal(b["image"], ds[t]["image"])
    state = it.get_state()
    resumed = pl.make_iterator(ds, dataclasses.replace(CFG, worker_count=2))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["index"], ds[6]["index"])
    assert pl.throughput(it, 5) > 0
