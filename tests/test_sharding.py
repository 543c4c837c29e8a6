"""Data parallelism: 8 fake devices == 1 device (jit and pmap), 2 real processes == 1 process.

The multi-device runs need fresh processes (XLA_FLAGS is read when JAX starts), so they
run tests/_train_worker.py; the helpers below run in this process on its one CPU device.
"""

from __future__ import annotations

import socket

import jax
import numpy as np
import pytest
from _subproc import assert_params_close, load_params, run_worker, start_worker, worker_env
from jax.sharding import AxisType

from gradcamo_jax import sharding

# Float32 sums over 8 shards vs 1 reorder additions; a few steps of AdamW keep that at ~1e-6.
RTOL, ATOL = 1e-4, 1e-5


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


@pytest.mark.slow
def test_eight_devices_match_one_device_jit_and_pmap(tmp_path, jax_cache):
    """Same params after 3 steps on 1 device, on a mesh of 8 (jit) and with pmap over 8.
    BatchNorm statistics are over the global batch of 8 in all three (1 row per device)."""
    out = tmp_path / "p"
    run_worker(["steps", "--out", str(out), "--runs", "jit:1,jit:8,pmap:8", "--steps", "3"], worker_env(jax_cache, 8))
    ref, init = load_params(f"{out}_jit_1.npz"), load_params(f"{out}_init.npz")
    moved = max(float(np.abs(a - b).max()) for a, b in zip(ref, init))
    assert moved > 1e-3, "training did not change the parameters; the comparison would be vacuous"
    assert_params_close(load_params(f"{out}_jit_8.npz"), ref, RTOL, ATOL)
    assert_params_close(load_params(f"{out}_pmap_8.npz"), ref, RTOL, ATOL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tmp_path, jax_cache):
    """Two real processes (gloo over 127.0.0.1), 2 devices each, each feeding only its rows."""
    port = _free_port()
    env = worker_env(jax_cache, 2)
    procs = [
        start_worker(["distributed", "--out", str(tmp_path / "dist.npz"), "--process-id", str(i),
                      "--num-processes", "2", "--port", str(port)], env)
        for i in range(2)
    ]
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, f"{stdout[-2000:]}\n{stderr[-4000:]}"
    run_worker(["steps", "--out", str(tmp_path / "ref"), "--runs", "jit:4", "--steps", "3"], worker_env(jax_cache, 4))
    ref, init = load_params(tmp_path / "ref_jit_4.npz"), load_params(tmp_path / "ref_init.npz")
    assert max(float(np.abs(a - b).max()) for a, b in zip(ref, init)) > 1e-3
    assert_params_close(load_params(tmp_path / "dist.npz"), ref, RTOL, ATOL)
