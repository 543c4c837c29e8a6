"""Process-level settings that make XLA:CPU (and PyTorch on CPU) faster: transparent huge pages.

Why. XLA:CPU allocates each execution's intermediate buffers afresh, and glibc serves
large allocations with new ``mmap`` pages, so every first write to an activation costs
one page fault per 4 KiB. EfficientNet-B0's forward on 8 crops of 5×21×128×128 faults
in hundreds of MB per call; with glibc's malloc backed by transparent huge pages
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc ≥ 2.35, kernel THP in "madvise" or
"always" mode) almost none, and the forward is markedly faster (BENCHMARKS.md,
'Measurements behind code choices', runtime.py). Numbers are unchanged: only where
memory comes from changes.

glibc reads tunables once, at process start, so the setting cannot be applied from
inside a running interpreter: `reexec_with_hugepages` restarts the current command with
it (the `gradcamo` command and the benchmark do this first thing). Set
``GRADCAMO_HUGEPAGES=0`` to opt out; elsewhere (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "GRADCAMO_HUGEPAGES"


def hugepages_active(environ: dict[str, str] | None = None) -> bool:
    """Whether this process was started with glibc's huge-page malloc tunable."""
    env = os.environ if environ is None else environ
    return "glibc.malloc.hugetlb=" in env.get("GLIBC_TUNABLES", "")


def hugepage_environ(environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `environ` (default: this process's) with the huge-page tunable added to
    ``GLIBC_TUNABLES``, keeping any tunables already there (a user's own hugetlb value wins)."""
    env = dict(os.environ if environ is None else environ)
    if not hugepages_active(env):
        tunables = env.get("GLIBC_TUNABLES", "")
        env["GLIBC_TUNABLES"] = f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE
    return env


def _supported() -> bool:
    if sys.platform != "linux":
        return False
    libc, _ = platform.libc_ver()
    return libc == "glibc"


def reexec_with_hugepages(argv: Sequence[str] | None = None) -> None:
    """Restart this Python process with `hugepage_environ` unless it already has it, the
    platform is not Linux/glibc, or ``GRADCAMO_HUGEPAGES=0``. Returns only when no restart
    is needed; otherwise the process image is replaced (same interpreter, same arguments).

    Call it first thing in a command-line entry point, before anything heavy is imported
    or any file is written: never from library code or under a test runner.
    """
    if os.environ.get(OPT_OUT, "1") == "0" or hugepages_active() or not _supported():
        return
    args = list(sys.argv if argv is None else argv)
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if argv is None and main_spec is not None and main_spec.name:
        # Started as `python -m pkg.mod`: restart the same way. Running the module's file as
        # a script would put the package's own folder first on sys.path, where any module
        # named like one of the standard library's would shadow it, and relative imports break.
        name = main_spec.name.removesuffix(".__main__")
        args = ["-m", name, *args[1:]]
    env = hugepage_environ()
    # Guard against a loop if the variable is somehow dropped on the way.
    env[OPT_OUT] = "0"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], env)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: ``VmHWM`` of ``/proc/self/status`` on
    Linux (the high-water mark of the running program's own address space), else
    ``ru_maxrss``. Why not ``ru_maxrss`` alone: Linux keeps it across ``exec``, so a child
    reports at least its parent's peak as its own (seen with the scale script's children;
    BENCHMARKS.md, 'Measurements behind code choices', `peak_rss_mb`)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, kB elsewhere


__all__ = ["HUGEPAGE_TUNABLE", "hugepage_environ", "hugepages_active", "peak_rss_mb", "reexec_with_hugepages"]
