"""sleep_jax: language models that sleep, in JAX/Flax."""

__version__ = "0.1.0"
