"""Models: EfficientNet B0–B7 (2D/3D) and the layers and convolution primitives it is built from."""

from gradcamo_jax.models.efficientnet import EfficientNet, calibrate_batch_stats, init

__all__ = ["EfficientNet", "calibrate_batch_stats", "init"]
