"""Training presets shipped with the package: ``gradcamo train --config NAME``.

Each module defines ``get_config() -> TrainConfig``:

* ``paper``: 3D EfficientNet-B0 on 21×128×128 crops, 6 classes (Gopalakrishnan et al. 2024).
* ``smoke``: the tiny EfficientNet on small crops, a few hundred CPU steps. The one small
  recipe: the demo and the studies in ``experiments/`` derive theirs from it.
"""

PRESETS = ("paper", "smoke")
