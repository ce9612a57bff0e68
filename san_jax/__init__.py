"""san-jax: SAN (Side Adapter Network) for open-vocabulary semantic segmentation in JAX/Flax."""

from san_jax import malloc as _malloc

_malloc.tune()  # before XLA starts its threads: see san_jax/malloc.py
