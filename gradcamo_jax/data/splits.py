"""Train / validation / test split by well: the one rule the crop step and the pipeline share.

Cells of one well are never in two splits (neighbouring cells share the well's plating,
staining and imaging, so a split by cell would leak them). Within each class the wells are
shuffled with a seed and cut by ``(train, val, test)`` fractions, rounded to whole wells,
with these guarantees: a class with ≥ 3 wells gets at least one validation and one test well
(when those fractions are > 0); with 2 wells, one training and one validation well; with 1
well, a training well; and every class keeps at least one training well.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
WELL_KEYS = ("Metadata_Plate", "Metadata_Well")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


def check_fractions(fractions, name: str = "split_fractions") -> tuple[float, float, float]:
    """``(train, val, test)`` as floats; ValueError unless each is ≥ 0, they sum to 1 and train > 0."""
    f = tuple(float(x) for x in fractions)
    if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1) > 1e-6 or f[0] <= 0:
        raise ValueError(f"{name}={fractions}; expected (train, val, test) fractions ≥ 0 summing to 1, train > 0")
    return f


def split_wells(well_classes: Mapping[tuple[str, str], int], fractions=DEFAULT_FRACTIONS,
                seed: int = 0) -> dict[tuple[str, str], str]:
    """(plate, well) → "train" / "val" / "test", stratified by class, whole wells only.

    Args:
      well_classes: (plate, well) → class index of the well's cells.
      fractions: (train, val, test) fractions of each class's wells.
      seed: the shuffle of each class's wells (class k uses ``default_rng([seed, k])``).
    """
    _, f_val, f_test = check_fractions(fractions)
    keys = {(str(p), str(w)): int(k) for (p, w), k in well_classes.items()}
    out: dict[tuple[str, str], str] = {}
    for k in sorted(set(keys.values())):
        in_k = sorted(key for key, c in keys.items() if c == k)
        order = np.random.default_rng([seed, k]).permutation(len(in_k))
        n = len(in_k)
        n_val, n_test = int(round(f_val * n)), int(round(f_test * n))
        if n >= 3:
            n_val, n_test = max(n_val, int(f_val > 0)), max(n_test, int(f_test > 0))
        elif n == 2:
            n_val, n_test = int(f_val > 0), 0
        else:
            n_val = n_test = 0
        # Every class trains: take wells back from the larger held-out split, keeping one
        # validation and one test well while a class has enough wells for both.
        min_val, min_test = (int(f_val > 0), int(f_test > 0)) if n >= 3 else (0, 0)
        while n_val + n_test > n - 1:
            if n_val >= n_test and n_val > min_val or n_test <= min_test:
                n_val -= 1
            else:
                n_test -= 1
        names = ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
        for i, name in zip(order, names):
            out[in_k[i]] = name
    return out


def split_cells(cells: pd.DataFrame, fractions=DEFAULT_FRACTIONS, seed: int = 0) -> np.ndarray:
    """Split name per cell ``(len(cells),)``, by `split_wells` over the cells' wells (a well's
    class is its most frequent ``Metadata_Class``)."""
    missing = [c for c in (*WELL_KEYS, "Metadata_Class") if c not in cells.columns]
    if missing:
        raise ValueError(f"cell table lacks columns {missing}")
    wells = cells.groupby(list(WELL_KEYS), sort=True)["Metadata_Class"].agg(lambda s: s.mode().iloc[0])
    assignment = split_wells(wells.to_dict(), fractions, seed)
    return np.array([assignment[(str(p), str(w))] for p, w in zip(*(cells[c] for c in WELL_KEYS))], dtype=object)


def check_split(cells: pd.DataFrame, split: np.ndarray) -> None:
    """ValueError naming the wells that appear in more than one split, or unknown split names."""
    bad_names = sorted(set(split) - set(SPLITS))
    if bad_names:
        raise ValueError(f"unknown split names {bad_names}; expected {SPLITS}")
    per_well = pd.DataFrame({**{k: cells[k].to_numpy() for k in WELL_KEYS}, "split": split})
    n_splits = per_well.groupby(list(WELL_KEYS))["split"].nunique()
    mixed = n_splits[n_splits > 1]
    if len(mixed):
        raise ValueError(f"wells in more than one split (cells of a well must share a split): {list(mixed.index)[:10]}")


__all__ = ["DEFAULT_FRACTIONS", "SPLITS", "check_fractions", "check_split", "split_cells", "split_wells"]
