"""Job-array shards: which rows of a table one of N independent jobs handles.

Segmentation, cropping and scoring of a plate split over a SLURM (or any) job array
without `jax.distributed`: job I of N takes rows I, I + N, I + 2N, … (round-robin, so
every shard sees every dose and well position), and a merge step checks that each
row's output is present once.
"""

from __future__ import annotations

import re

import numpy as np


def parse_shard(text: str) -> tuple[int, int]:
    """``"INDEX/COUNT"`` (0-based INDEX) → ``(index, count)``, e.g. ``"3/8"`` for
    ``SLURM_ARRAY_TASK_ID=3`` of ``--array=0-7``. ValueError naming the flag otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise ValueError(f"--shard {text!r}: expected INDEX/COUNT, e.g. 0/4")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: need 0 <= INDEX < COUNT (INDEX is 0-based)")
    return index, count


def shard_rows(n_rows: int, shard: tuple[int, int]) -> np.ndarray:
    """Row numbers ``(≈ n_rows / count,)`` of one shard: every COUNT-th row from INDEX.
    The shards of one COUNT partition ``range(n_rows)``."""
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= INDEX < COUNT")
    return np.arange(index, n_rows, count)


__all__ = ["parse_shard", "shard_rows"]
