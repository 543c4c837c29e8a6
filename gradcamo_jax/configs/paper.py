"""Paper-like training (Gopalakrishnan, Ma & Xie 2024): 3D EfficientNet-B0 on 21×128×128 crops,
6 classes (control + 5 doses), split by well.

    gradcamo train --data DATA --workdir RUN --config paper [--set num_steps=40000 ...]
"""

from gradcamo_jax.config import DataConfig, ModelConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        # The stem strides Y and X only; later stages stop striding z once it would fall
        # below min_size=2, so 21 slices end at 2 instead of vanishing (DESIGN §4).
        model=ModelConfig("b0", num_classes=6, stem_stride=(1, 2, 2)),
        data=DataConfig(
            batch_size=32,
            eval_batch_size=64,
            crop_shape=(21, 128, 128),
            worker_count=4,
            read_threads=4,
            prefetch=8,
        ),
        num_steps=20_000,
        learning_rate=1e-3,
        warmup_steps=1_000,
        weight_decay=0.05,
        grad_clip_norm=1.0,
        label_smoothing=0.1,
        class_weights="balanced",
        compute_dtype="auto",  # bf16 compute on GPU/TPU, float32 on CPU
        log_every=50,
        checkpoint_every=1_000,
        keep_checkpoints=3,
    )
