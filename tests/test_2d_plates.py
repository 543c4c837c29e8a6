"""2D plates (one plane per site, as most of the Cell Painting Gallery): synth → crop → train, which
picks a 2D model from the data → `gradcamo score` → report; the 2D path against `explain` on crops
squeezed by hand; the settings that conflict with the data.

Segmentation is not run here: tools/segment.py already runs Cellpose as a 2D image on one-plane
sites (tests/test_segment.py, the vendor layouts at nz=1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import numpy as np
import pandas as pd
import pytest

from gradcamo_jax import EfficientNet, explain
from gradcamo_jax.config import DataConfig, ModelConfig, TrainConfig, config_to_dict
from gradcamo_jax.data import crop, formats, pipeline, synthetic
from gradcamo_jax.scoring import ScoreConfig, read_cams, read_profiles, score_dataset
from gradcamo_jax.train import config_for_data, load_checkpoint, model_config_for_crops, train_and_evaluate

FIELD = (1, 48, 48)  # one plane per site
CROP = (5, 32, 32)  # five planes asked for: a one-plane site is cropped to one plane anyway
LAYER, METHOD = "stem", "layercam"  # an 8×8 map on the 16×16 crops the model sees

# `gradcamo train --config smoke` as a user would run it on a 2D plate: the preset's per-axis
# (z, y, x) stem stride and its (Z, Y, X) crop and 2× binning, written for stacks, are left as
# they are; only the run is made short.
TRAIN_ARGS = ["--config", "smoke"] + [a for kv in (
    "model.num_classes=3", "model.conv_impl=xla", "num_steps=4", "warmup_steps=1", "log_every=2",
    "checkpoint_every=4", "keep_checkpoints=1", "data.batch_size=8", "data.eval_batch_size=16",
    "data.read_threads=1", "data.prefetch=1", "progress_bar=false") for a in ("--set", kv)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2D plate through `gradcamo train` and `gradcamo score`: (data dir, run dir, profiles dir,
    the summary `gradcamo train` printed)."""
    from gradcamo_jax import cli

    base = tmp_path_factory.mktemp("plate2d")
    # Three wells per class: a train, a validation and a test well, so evaluation runs in 2D too.
    plate = synthetic.write_plate(synthetic.make_config("tiny", field_shape=FIELD, wells_per_dose=3, seed=3),
                                  base / "plate")
    data = crop.crop_plate(plate, base / "data", crop.CropConfig(crop_size=CROP, min_volume=20, workers=0))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["train", "--data", str(data), "--workdir", str(base / "run"), *TRAIN_ARGS]) == 0
        assert cli.main(["score", "--checkpoint", str(base / "run"), "--data", str(data), "--out",
                         str(base / "profiles"), "--layer", LAYER, "--method", METHOD, "--batch-size", "16",
                         "--cam-sample", "8", "--no-progress"]) == 0
    summary = json.loads(printed.getvalue().splitlines()[0])
    return data, base / "run", base / "profiles", summary


def test_2d_plate_crops_trains_a_2d_model_scores_and_reports(run, tmp_path):
    from gradcamo_jax.report import ReportConfig, make_report

    data, workdir, profiles_dir, summary = run
    store = formats.open_crops(data)
    assert store.image.shape[1:] == (1, 32, 32, 5) and store.mask.shape[1:] == (1, 32, 32)
    # The run chose the 2D model, said so, and saved that choice in config.json and the checkpoint.
    assert summary["spatial_dims"] == 2 and summary["val"]["count"] > 0  # validation ran in 2D too
    config, variables = load_checkpoint(workdir, "latest")
    assert config.model.spatial_dims == 2 and config.model.stem_stride == (2, 2)
    assert json.loads((workdir / "config.json").read_text()) == json.loads(json.dumps(config_to_dict(config)))
    assert variables["params"]["stem"]["conv"]["kernel"].shape[:-2] == (3, 3)  # a 3×3 kernel, not 3×3×3
    profiles = read_profiles(profiles_dir)
    assert len(profiles) == len(store)
    assert np.isfinite(profiles["Metadata_GradCAMO"]).all() and not profiles["Metadata_GradCAMO_Undefined"].any()
    assert formats.read_json(profiles_dir / "manifest.json")["layer_map_shape"] == [8, 8]
    rows, cams = read_cams(profiles_dir)
    assert len(rows) == 8 and cams.shape == (8, 16, 16)  # 2D maps on the model's 16×16 grid
    index = make_report(profiles_dir, tmp_path / "report", data_dir=data,
                        config=ReportConfig(umap=False, evaluate=None))
    assert index.exists() and "overlays.png" in index.read_text()
    for name in ("overlays", "scores_by_dose", "scores_by_site", "attention_split"):
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 5000, name


def test_2d_scores_equal_explain_on_crops_squeezed_by_hand(run):
    """The scoring path (pipeline squeeze, binning, batching) against `explain` on the store's crops
    with the plane taken and the 2×2 bins averaged here, independently; a Y/X transpose of the same
    crops scores differently, so the comparison would catch scrambled axes."""
    data, workdir, profiles_dir, _ = run
    config, variables = load_checkpoint(workdir, "latest")
    model = EfficientNet(config.model)
    store = formats.open_crops(data)
    image = store.image[:].astype(np.float32)[:, 0]  # (N, 32, 32, C): the one plane
    mask = store.mask[:][:, 0]
    n, y, x, c = image.shape
    image = image.reshape(n, y // 2, 2, x // 2, 2, c).mean(axis=(2, 4))  # (N, 16, 16, C)
    mask = mask[:, 1::2, 1::2]  # the code at each bin's centre voxel
    got = read_profiles(profiles_dir)["Metadata_GradCAMO"].to_numpy()
    want = np.asarray(explain(model, variables, image, mask, layer=LAYER, method=METHOD).scores.cell)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    swapped = np.asarray(explain(model, variables, image.transpose(0, 2, 1, 3), mask.transpose(0, 2, 1),
                                 layer=LAYER, method=METHOD).scores.cell)
    assert np.abs(swapped - want).max() > 1e-3


# ----------------------------------------------------------------------------- the choice and its conflicts


def test_one_plane_crops_pick_a_2d_model_with_strides_without_z():
    model = ModelConfig("tiny", stem_stride=(1, 2, 2), stage_strides=((1, 1, 1), 2, (1, 2, 2), 2, 1, 2, 1))
    flat = model_config_for_crops(model, (1, 32, 32, 5))
    assert flat.spatial_dims == 2 and flat.stem_stride == (2, 2)
    assert flat.stage_strides == ((1, 1), 2, (2, 2), 2, 1, 2, 1)
    assert dataclasses.replace(flat, spatial_dims=3, stem_stride=model.stem_stride,
                               stage_strides=model.stage_strides) == model  # nothing else changes
    # Stacks keep the model as configured: the same objects, so 3D runs are untouched.
    assert model_config_for_crops(model, (5, 32, 32, 5)) is model
    cfg = TrainConfig(model=model)
    assert config_for_data(cfg, (5, 32, 32, 5)) is cfg
    assert config_for_data(cfg, (1, 32, 32, 5)).model == flat
    # An explicit 2D model on one-plane crops stays as it is.
    two = ModelConfig("tiny", spatial_dims=2, stem_stride=(2, 2))
    assert model_config_for_crops(two, (1, 32, 32, 5)) is two


def test_one_plane_sites_give_one_plane_crops():
    assert crop.site_crop_size((21, 128, 128), (1, 256, 256)) == (1, 128, 128)
    assert crop.site_crop_size((21, 128, 128), (9, 256, 256)) == (21, 128, 128)  # stacks: as asked


def test_model_axes_drop_only_a_single_plane():
    image, mask = np.zeros((4, 1, 6, 7, 5), np.float32), np.zeros((4, 1, 6, 7), np.uint8)
    i2, m2 = pipeline.to_model_axes(image, mask, 2)
    assert i2.shape == (4, 6, 7, 5) and m2.shape == (4, 6, 7)
    assert pipeline.to_model_axes(image[0], mask[0], 2)[0].shape == (6, 7, 5)  # one crop, same path
    assert pipeline.to_model_axes(image, mask, 3)[0] is image
    assert pipeline.model_input_shape((1, 6, 7, 5), 2) == (6, 7, 5)
    assert pipeline.model_input_shape((3, 6, 7, 5), 3) == (3, 6, 7, 5)
    with pytest.raises(ValueError, match=r"Z=3 planes.*model.spatial_dims=3.*data.crop_shape=\(1, 6, 7\)"):
        pipeline.to_model_axes(np.zeros((4, 3, 6, 7, 5)), np.zeros((4, 3, 6, 7)), 2)


def _stack_dataset(config: DataConfig | None = None) -> pipeline.CellDataset:
    """Six in-memory cells of 3×8×8 crops, one per well, three classes, train and val wells."""
    cells = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": [f"A0{i}" for i in range(6)],
                          "Metadata_Class": [0, 1, 2, 0, 1, 2], "Metadata_Split": ["train"] * 3 + ["val"] * 3})
    return pipeline.dataset_from_arrays(np.zeros((6, 3, 8, 8, 5), np.float32), np.zeros((6, 3, 8, 8), np.uint8),
                                        cells, config or DataConfig())


def test_2d_model_on_stacks_is_an_error_naming_the_fix(tmp_path):
    """``model.spatial_dims=2`` on crops with depth: training and scoring stop before any work,
    saying which settings would make it run."""
    two = ModelConfig("tiny", num_classes=3, spatial_dims=2, stem_stride=(2, 2))
    fix = r"Z=3 planes.*use a 3D model \(model.spatial_dims=3\).*data.crop_shape=\(1, 8, 8\)"
    with pytest.raises(ValueError, match=fix):
        model_config_for_crops(two, (3, 8, 8, 5))
    with pytest.raises(ValueError, match=fix):
        train_and_evaluate(TrainConfig(model=two, num_steps=1, progress_bar=False), tmp_path / "run", _stack_dataset())
    assert not (tmp_path / "run" / "config.json").exists()  # nothing recorded for a run that cannot start
    # The fix it names: one plane per crop (the middle one) trains the 2D model.
    flat = TrainConfig(model=two, data=DataConfig(crop_shape=(1, 8, 8)))
    one = _stack_dataset(flat.data)
    assert one.input_shape == (1, 8, 8, 5) and config_for_data(flat, one.input_shape) is flat
    # Scoring a stack with a 2D model: the same message, before reading any crop.
    data = tmp_path / "stack"
    formats.write_crop_store(data / formats.CROPS_STORE, np.zeros((2, 3, 8, 8, 5), np.float16),
                             np.zeros((2, 3, 8, 8), np.uint8), attrs={"channels": list(formats.CHANNELS)})
    formats.write_cells(pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": ["A01", "A02"],
                                      "Metadata_Row": [0, 1]}), data)
    with pytest.raises(ValueError, match=fix):
        score_dataset(EfficientNet(two), {}, data, tmp_path / "profiles", ScoreConfig(layer="stem"), progress=False)
