"""PyTorch peers of gradcamo-jax, for tests and benchmarks only (needs the ``[torch]`` extra).

`gradcamo_jax.peers.torch_twin` is the same EfficientNet in PyTorch with our weights copied
in, and the adapters that run third-party CAM libraries on it. The pipeline never imports
this subpackage, so torch stays optional for users.
"""
