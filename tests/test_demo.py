"""`gradcamo demo --tiny` end to end through the real command: synth → crop → train → score → report."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from gradcamo_jax.demo import tiny_config


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "gradcamo_jax.cli", "demo", "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report:" in proc.stdout
    summary = json.loads((out / "demo.json").read_text())
    plates = [name for name, _ in tiny_config().plates]
    assert [p["signal"] for p in summary["plates"]] == plates == ["cell", "site"]
    for plate in plates:
        report = out / plate / "report"
        assert (report / "index.html").stat().st_size > 1000
        for png in ("umap", "scores_by_dose", "scores_by_site", "attention_split", "overlays"):
            assert (report / f"{png}.png").stat().st_size > 5000, png
        cells = pd.read_parquet(out / plate / "data" / "cells.parquet")
        prof = pd.concat(pd.read_parquet(p) for p in sorted((out / plate / "profiles").glob("part-*.parquet")))
        assert len(prof) == len(cells)
        assert set(prof["Metadata_Split"]) == {"train", "val", "test"}
        # every score is a fraction or an explicit "undefined" (a map summing to 0), nothing else
        ok = prof["Metadata_GradCAMO"].between(0, 1) | prof["Metadata_GradCAMO_Undefined"]
        assert ok.all()
    index = (out / "index.html").read_text()
    assert "cell/report/index.html" in index and "site/report/index.html" in index
    # a rerun resumes: every stage finds its output and nothing is recomputed or duplicated
    again = subprocess.run([sys.executable, "-m", "gradcamo_jax.cli", "demo", "--tiny", "--out", str(out)],
                           capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    prof2 = pd.concat(pd.read_parquet(p) for p in sorted((out / "cell" / "profiles").glob("part-*.parquet")))
    assert len(prof2) == len(pd.read_parquet(out / "cell" / "data" / "cells.parquet"))
