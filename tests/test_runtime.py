"""Huge-page malloc start-up (`gradcamo_jax.runtime`): the environment it builds, when it
restarts a process, and that the restarted process really takes fewer page faults (the
kernel's own counter, not our code, is the witness)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from gradcamo_jax import runtime

# The quick loop: the environment rule; restarts in fresh processes in `make test`.
FAST = {
    "test_environ_adds_the_tunable_and_keeps_the_users",
}


def test_environ_adds_the_tunable_and_keeps_the_users():
    assert runtime.hugepage_environ({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    env = runtime.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" and env["X"] == "1"
    # A user's own hugetlb choice (e.g. 0 to switch it off) is left alone.
    assert runtime.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    assert runtime.hugepages_active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert not runtime.hugepages_active({})


_PROBE = """
import ctypes, json, os, resource, sys
from gradcamo_jax.runtime import reexec_with_hugepages
reexec_with_hugepages()
# glibc's malloc itself (numpy would madvise huge pages on its own), 64 MB written once.
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ptr = libc.malloc(64 * 2**20)
ctypes.memset(ptr, 1, 64 * 2**20)
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "argv": sys.argv[1:], "faults": after - before}))
"""


def _probe(tmp_path: Path, **env_changes) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.OPT_OUT)}
    env.update(env_changes)
    out = subprocess.run([sys.executable, str(script), "--flag", "x y"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc tunables are Linux/glibc only")
def test_restart_sets_the_tunable_keeps_arguments_and_cuts_page_faults(tmp_path):
    plain = _probe(tmp_path, **{runtime.OPT_OUT: "0"})
    assert plain["tunables"] == "" and plain["argv"] == ["--flag", "x y"]
    huge = _probe(tmp_path)
    assert huge["tunables"] == "glibc.malloc.hugetlb=1" and huge["argv"] == ["--flag", "x y"]
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this kernel: the tunable is a no-op")
    # 64 MB in 4 KiB pages is 16384 faults; in 2 MiB pages a few dozen.
    assert plain["faults"] > 8000, plain
    assert huge["faults"] < plain["faults"] / 10, (plain, huge)


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc tunables are Linux/glibc only")
def test_restart_of_a_module_run_stays_a_module_run(tmp_path):
    """`python -m pkg.mod` restarts as `-m pkg.mod` (not as the file, whose folder would then
    lead sys.path, where a module of the package could shadow one of the standard library)."""
    pkg = tmp_path / "probepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(
        "import json, os, sys\nfrom gradcamo_jax.runtime import reexec_with_hugepages\nreexec_with_hugepages()\n"
        "print(json.dumps({'tunables': os.environ.get('GLIBC_TUNABLES', ''), 'argv': sys.argv[1:], 'path0': sys.path[0]}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.OPT_OUT)}
    out = subprocess.run([sys.executable, "-m", "probepkg.mod", "--a", "1"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["tunables"] == "glibc.malloc.hugetlb=1" and got["argv"] == ["--a", "1"]
    assert Path(got["path0"]).resolve() == tmp_path.resolve()


@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM and ru_maxrss surviving exec are Linux behaviour")
def test_peak_rss_is_this_program_s_own_not_the_parent_s():
    """A child started by a parent holding ~500 MB more than it needs reports its own peak,
    not the parent's (ru_maxrss survives exec on Linux).

    The child imports the same package as the parent (jax and flax come with it, ~300 MB),
    so the bound is relative: the parent holds all of that plus the ballast."""
    from gradcamo_jax.runtime import peak_rss_mb

    code = "from gradcamo_jax.runtime import peak_rss_mb; print(peak_rss_mb())"
    ballast = bytearray(500 * 2**20)
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])  # touch every page
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    parent = peak_rss_mb()
    assert parent > 500
    assert 1 < child < parent - 400, (child, parent)
    del ballast
