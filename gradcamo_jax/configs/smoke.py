"""CPU smoke run: the tiny EfficientNet on small crops, a few hundred steps on a laptop.

Made for the synthetic demo plate (`gradcamo synth --preset demo`, cropped 9×48×48):
crops are centre-cropped to 5×48×48 and binned 2× in Y and X to 5×24×24.

    gradcamo train --data DATA --workdir RUN --config smoke

This is the one small training recipe: `gradcamo_jax.demo` and the studies in
``experiments/`` change only what their plates need (classes, crop transform, logging)
with `dataclasses.replace`.
"""

from gradcamo_jax.config import DataConfig, ModelConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        # BatchNorm momentum 0.9: at 0.99 the running statistics of a 300-step run lag the
        # weights, and held-out (inference-mode) predictions collapse onto one class.
        model=ModelConfig("tiny", num_classes=6, stem_stride=(1, 2, 2), drop_path_rate=0.0, bn_momentum=0.9),
        data=DataConfig(
            batch_size=16,
            eval_batch_size=32,
            crop_shape=(5, 48, 48),
            downsample=(1, 2, 2),
            worker_count=0,
            read_threads=2,
            prefetch=4,
        ),
        num_steps=300,
        learning_rate=3e-3,
        warmup_steps=20,
        weight_decay=1e-4,
        grad_clip_norm=1.0,
        compute_dtype="float32",
        log_every=10,
        checkpoint_every=100,
        keep_checkpoints=2,
        async_checkpointing=False,
    )
