"""`gradcamo demo --tiny` end to end through the command's parser and dispatch (`cli.main`):
synth → crop → train → score → report, then a rerun that must resume.

Both runs are in this process (as the other CLI tests): the rerun then reuses the first run's
compiled programs and numba's UMAP, which a second interpreter spent ~40 s of CPU rebuilding.
The console script's own start-up (`cli.entry`, the huge-page re-exec) is tested in
test_packaging.py and test_runtime.py.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from gradcamo_jax import cli
from gradcamo_jax.demo import tiny_config


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--tiny", "--out", str(out)]) == 0
    assert "report:" in capsys.readouterr().out
    summary = json.loads((out / "demo.json").read_text())
    plates = [name for name, _ in tiny_config().plates]
    assert [p["signal"] for p in summary["plates"]] == plates == ["cell", "site"]
    for plate in plates:
        report = out / plate / "report"
        assert (report / "index.html").stat().st_size > 1000
        for png in ("umap", "scores_by_dose", "scores_by_site", "attention_split", "overlays", "audit"):
            assert (report / f"{png}.png").stat().st_size > 5000, png
        cells = pd.read_parquet(out / plate / "data" / "cells.parquet")
        prof = pd.concat(pd.read_parquet(p) for p in sorted((out / plate / "profiles").glob("part-*.parquet")))
        assert len(prof) == len(cells)
        assert set(prof["Metadata_Split"]) == {"train", "val", "test"}
        # every score is a fraction or an explicit "undefined" (a map summing to 0), nothing else
        ok = prof["Metadata_GradCAMO"].between(0, 1) | prof["Metadata_GradCAMO_Undefined"]
        assert ok.all()
        # the audit beside Grad-CAMO: the interchange index per cell, in [0, 1] where defined, and
        # undefined (not 0) where no donor was predicted another class (the tiny demo's models
        # may put every pool cell in one class)
        xri, donors = prof["Metadata_Audit_InterchangeIndex"], prof["Metadata_Audit_InterchangeDonors"]
        assert xri.dropna().between(0, 1).all() and donors.between(0, 6).all()
        assert xri[donors == 0].isna().all()
        assert "What you may conclude" in (report / "index.html").read_text()
    index = (out / "index.html").read_text()
    assert "cell/report/index.html" in index and "site/report/index.html" in index
    # a rerun resumes: every stage finds its output and nothing is recomputed or duplicated
    def done():  # what the resumable stages wrote: profile parts (and their times), the training log
        return ({p: p.stat().st_mtime_ns for p in sorted(out.glob("*/profiles/part-*.parquet"))},
                [(out / plate / "run" / "log.jsonl").read_text() for plate in plates])

    before = done()
    assert cli.main(["demo", "--tiny", "--out", str(out)]) == 0
    assert "report:" in capsys.readouterr().out
    prof2 = pd.concat(pd.read_parquet(p) for p in sorted((out / "cell" / "profiles").glob("part-*.parquet")))
    assert len(prof2) == len(pd.read_parquet(out / "cell" / "data" / "cells.parquet"))
    assert done() == before
