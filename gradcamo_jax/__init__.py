"""gradcamo-jax: Grad-CAMO, a per-cell score of whether a profiling model looks at the cell it describes.

Public API::

    from gradcamo_jax import EfficientNet, ModelConfig, explain, grad_cam, gradcamo

    model = EfficientNet(ModelConfig("b0", num_classes=6))
    variables = gradcamo_jax.models.init(model.config, jax.random.key(0), (21, 128, 128, 5))
    out = explain(model, variables, images, masks, layer="stage5")   # images (N, Z, Y, X, C)
    out.scores.cell                                                   # (N,) Grad-CAMO
"""

from gradcamo_jax import audit
from gradcamo_jax.cam import CAM_METHODS, Explanation, explain, grad_cam, make_explain_fn, upsample
from gradcamo_jax.config import STAGE_NAMES, ModelConfig
from gradcamo_jax.metric import GradCAMOResult, gradcamo, summarize
from gradcamo_jax.models.efficientnet import EfficientNet, calibrate_batch_stats, init

__version__ = "0.1.0"

__all__ = [
    "audit",
    "CAM_METHODS",
    "STAGE_NAMES",
    "EfficientNet",
    "Explanation",
    "GradCAMOResult",
    "ModelConfig",
    "explain",
    "grad_cam",
    "gradcamo",
    "calibrate_batch_stats",
    "init",
    "make_explain_fn",
    "summarize",
    "upsample",
]
