"""Studies and benchmarks of gradcamo-jax, run from the repository root as modules
(``python -m experiments.confounders --quick``). They use the package's public API;
results land in ``experiments/results/`` and their reading in ``experiments/README.md``."""
