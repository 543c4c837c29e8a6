"""Data parallelism: 8 fake devices == 1 device (jit and pmap), 2 real processes == 1 process.

The multi-device runs need fresh processes (XLA_FLAGS is read when JAX starts), so they
run tests/_sharding_worker.py: one process with 8 devices does every one-process run (one
compilation of the initial state; the two-process run starts from that state), then two
processes with 2 devices each. The helpers below run in this process on its one CPU device.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from _subproc import assert_params_close, load_params, worker_env
from jax.sharding import AxisType

from gradcamo_jax import sharding

# Float32 sums over 8 shards vs 1 reorder additions; a few steps of AdamW keep that at ~1e-6.
RTOL, ATOL = 1e-4, 1e-5
WORKER = Path(__file__).resolve().parent / "_sharding_worker.py"


def test_mesh_is_auto_and_spans_all_devices():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == (sharding.DATA_AXIS,)
    assert mesh.axis_types == (AxisType.Auto,)
    assert mesh.size == jax.device_count()


def test_to_global_and_back():
    mesh = sharding.make_mesh()
    local = {"image": np.arange(24, dtype=np.float32).reshape(4, 3, 2), "label": np.arange(4, dtype=np.int32)}
    glob = sharding.to_global(local, mesh)
    assert glob["image"].shape == (4 * jax.process_count(), 3, 2)
    assert glob["image"].sharding.spec == sharding.batch_sharding(mesh).spec
    np.testing.assert_array_equal(np.asarray(glob["label"]), local["label"])
    tree = {"w": np.ones((2, 3), np.float32), "step": np.int32(7)}
    rep = sharding.replicate(tree, mesh)
    assert rep["w"].sharding.is_fully_replicated
    back = sharding.to_host(rep)
    np.testing.assert_array_equal(back["w"], tree["w"])
    assert back["step"] == 7


def test_pmap_split_and_replicate():
    d = jax.local_device_count()
    split = sharding.pmap_split({"x": np.arange(6 * d).reshape(2 * d, 3)})
    assert split["x"].shape == (d, 2, 3)
    rep = sharding.pmap_replicate({"w": np.arange(3.0)})
    np.testing.assert_array_equal(sharding.pmap_unreplicate(rep)["w"], np.arange(3.0))
    if d > 1:
        with pytest.raises(ValueError, match="does not divide"):
            sharding.pmap_split({"x": np.zeros((d + 1, 2))})


def test_initialize_distributed_is_a_no_op_without_a_coordinator(monkeypatch):
    for name in ("GRADCAMO_COORDINATOR", "GRADCAMO_NUM_PROCESSES", "GRADCAMO_PROCESS_ID", "GRADCAMO_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    assert sharding.initialize_distributed() is False
    monkeypatch.setenv("GRADCAMO_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="coordinator"):
        sharding.initialize_distributed()


def _worker(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, what: str) -> str:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return stdout


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory, jax_cache):
    """One process with 8 devices: the initial state, then 3 steps on 1 device (jit), on a mesh of
    8 (jit), with pmap over 8, and on a mesh of the first 4 (jit; the reference of the two-process
    run). One process, so the initial state is built once."""
    out = tmp_path_factory.mktemp("steps")
    _finish(_worker(["steps", "--out", str(out), "--runs", "jit:1,jit:8,pmap:8,jit:4", "--steps", "3"],
                    worker_env(jax_cache, 8)), "steps")
    return out


def _moved(ref: list[np.ndarray], init: list[np.ndarray]) -> float:
    return max(float(np.abs(a - b).max()) for a, b in zip(ref, init))


@pytest.mark.slow
def test_eight_devices_match_one_device_jit_and_pmap(one_process_runs):
    """Same params after 3 steps on 1 device, on a mesh of 8 (jit) and with pmap over 8.
    BatchNorm statistics are over the global batch of 8 in all three (1 row per device)."""
    out = one_process_runs
    ref, init = load_params(out / "jit_1.npz"), load_params(out / "init.npz")
    assert _moved(ref, init) > 1e-3, "training did not change the parameters; the comparison would be vacuous"
    assert_params_close(load_params(out / "jit_8.npz"), ref, RTOL, ATOL)
    assert_params_close(load_params(out / "pmap_8.npz"), ref, RTOL, ATOL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(one_process_runs, tmp_path, jax_cache):
    """Two real processes (gloo over 127.0.0.1), 2 devices each, each feeding only its rows,
    from the one-process run's initial state; the reference is that process's mesh of 4."""
    port = _free_port()
    env = worker_env(jax_cache, 2)
    procs = [
        _worker(["distributed", "--init", str(one_process_runs / "init.pkl"), "--out", str(tmp_path / "dist.npz"),
                 "--process-id", str(i), "--num-processes", "2", "--port", str(port)], env)
        for i in range(2)
    ]
    for i, p in enumerate(procs):
        _finish(p, f"process {i}")
    ref, init = load_params(one_process_runs / "jit_4.npz"), load_params(one_process_runs / "init.npz")
    assert _moved(ref, init) > 1e-3
    assert_params_close(load_params(tmp_path / "dist.npz"), ref, RTOL, ATOL)
