"""CPU smoke run: the tiny EfficientNet on small crops, a few hundred steps on a laptop.

Made for the synthetic demo plate (`gradcamo synth --preset demo`, cropped 9×48×48):
crops are centre-cropped to 5×48×48 and binned 2× in Y and X to 5×24×24.

    gradcamo train --data DATA --workdir RUN --config smoke
"""

from gradcamo_jax.config import DataConfig, ModelConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        # momentum 0.9: at 0.99 a 300-step run's running statistics lag and held-out
        # predictions collapse onto one class (see gradcamo_jax/demo.py).
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
