"""The confounder study's statistics on hand-made per-cell tables with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from experiments import confounders, study


def _table(rng, mode, seed, scores, marked=None):
    n = len(scores)
    return pd.DataFrame({
        "Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": 1,
        "Metadata_ObjectNumber": np.arange(n), "Metadata_Class": rng.integers(0, 3, n),
        "Marked": marked if marked is not None else np.zeros(n, bool),
        "predicted": rng.integers(0, 3, n), "gradcamo": scores, "neighbors": 0.2, "background": 1 - 0.2 - scores,
        "chance": 0.2, "layer": "stage2", "method": "gradcam", "mode": mode, "seed": seed,
    })


def test_auroc_is_the_rank_statistic():
    """AUROC = P(score of a positive > score of a negative) (+ half the ties), counted by hand."""
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.4, 0.1, 50), rng.normal(0.3, 0.1, 40)
    pos[3] = np.nan
    p = pos[np.isfinite(pos)]
    by_hand = (np.sum(p[:, None] > neg[None]) + 0.5 * np.sum(p[:, None] == neg[None])) / (len(p) * len(neg))
    assert abs(study.auroc(pos, neg) - by_hand) < 1e-12
    assert np.isnan(study.auroc([], neg))


def test_summary_separates_a_cell_model_from_shortcuts_by_construction():
    rng = np.random.default_rng(1)
    parts = []
    for seed in (0, 1, 2):
        parts.append(_table(rng, "cell", seed, rng.uniform(0.6, 0.9, 30)))          # all above
        parts.append(_table(rng, "background", seed, rng.uniform(0.1, 0.4, 30)))    # all below
        parts.append(_table(rng, "site", seed, rng.uniform(0.6, 0.9, 30)))          # same distribution
        marked = np.arange(30) % 2 == 0
        parts.append(_table(rng, "neighbor", seed, np.where(marked, 0.8, 0.2), marked))
    cells = pd.concat(parts, ignore_index=True)
    cells["correct"] = cells["predicted"] == cells["Metadata_Class"]
    config = confounders.Config(seeds=(0, 1, 2), modes=("cell", "background", "neighbor", "site"))
    out = confounders.summarize(cells, config)
    assert out["auroc_cell_model_vs_shortcut"]["background"]["mean"] == 1.0
    assert abs(out["auroc_cell_model_vs_shortcut"]["site"]["mean"] - 0.5) < 0.15
    assert out["neighbor_mode"]["auroc_marked_vs_unmarked"]["mean"] == 1.0
    m = out["modes"]["background"]
    assert abs(m["mean_gradcamo"]["mean"] - cells[cells["mode"] == "background"]["gradcamo"].mean()) < 1e-12
    assert m["mean_gradcamo"]["n"] == 3
    assert m["frac_above_half"]["mean"] == 0.0
    assert out["modes"]["cell"]["frac_above_half"]["mean"] == 1.0


def test_profile_stages_names_the_ops_that_take_the_time():
    """`top_ops` ranks the thunks of a jitted function by traced time and `op_sources` maps
    them back to the JAX ops they came from: a 512² matmul next to a 4-element multiply is first."""
    import jax
    import jax.numpy as jnp

    from experiments import profile_stages

    def f(a, b):
        return jnp.dot(a, a), b * 2.0

    a, b = jnp.ones((512, 512), jnp.float32), jnp.ones((4,), jnp.float32)
    jitted = jax.jit(f)
    jax.block_until_ready(jitted(a, b))
    sources = profile_stages.op_sources(jitted.lower(a, b).compile().as_text())
    assert any("dot_general" in s for s in sources.values())
    ops = profile_stages.top_ops(lambda: jax.block_until_ready(jitted(a, b)), 3, calls=3, sources=sources)
    assert ops and all(o["ms_per_call"] >= 0 and o["count_per_call"] > 0 for o in ops)
    assert "dot_general" in ops[0]["source"], ops
    assert ops[0]["count_per_call"] == 1, ops  # one matmul thunk per call, counted over 3 calls
