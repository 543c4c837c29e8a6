"""The package as a user gets it: a built wheel, installed non-editable, used from outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Building and installing a wheel takes a minute: `make test` only.
FAST: set[str] = set()

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from a copy of the tracked files, installed with `pip --target` (no
    dependencies: those come from the test environment). Returns the install folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist")],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("gradcamo_jax-*.whl")
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True,
                   timeout=300)
    return site


def _gradcamo(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`gradcamo ARGS` from the installed copy: the checkout is on no path, so the import must
    resolve to `site` (asserted), as the console script of a normal install would."""
    code = ("import sys, gradcamo_jax, gradcamo_jax.cli as cli; "
            f"assert gradcamo_jax.__file__.startswith({str(site)!r}), gradcamo_jax.__file__; "
            "sys.argv = ['gradcamo', *sys.argv[1:]]; sys.exit(cli.entry())")
    env = {**os.environ, "PYTHONPATH": str(site), "GRADCAMO_HUGEPAGES": "0", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_installed_wheel_finds_its_presets_and_writes_a_plate(installed, tmp_path):
    out = _gradcamo(installed, tmp_path, "train", "--print-config")
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert config["model"]["variant"] == "tiny" and config["num_steps"] == 300  # the default preset: smoke
    paper = _gradcamo(installed, tmp_path, "train", "--config", "paper", "--print-config")
    assert paper.returncode == 0 and json.loads(paper.stdout)["model"]["variant"] == "b0", paper.stderr
    missing = _gradcamo(installed, tmp_path, "train", "--config", "nope", "--print-config")
    assert missing.returncode != 0 and "expected a preset name ['paper', 'smoke']" in missing.stderr
    synth = _gradcamo(installed, tmp_path, "synth", "--preset", "tiny", "--out", "plate")
    assert synth.returncode == 0, synth.stderr
    assert (tmp_path / "plate" / "platemap.csv").is_file()
    assert list((tmp_path / "plate" / "labels").glob("*_labels.tiff"))
