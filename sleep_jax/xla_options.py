"""XLA compiler options for the jitted train and eval steps.

On XLA:CPU, YNNPACK also takes over elementwise and reduction fusions by default; on this
project's steps XLA's own loop emitters run those faster (hybrid train step 5-8% faster,
`experiments/benchmarks/train_step.py`), so YNNPACK is handed the dots only. The option is
experimental: it is checked once on a tiny program, and a jaxlib that does not know it
compiles with no options (nothing but speed depends on it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def step_compiler_options() -> dict[str, str]:
  if jax.default_backend() != "cpu":
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(jnp.zeros(2)).compile()
  except Exception:  # noqa: BLE001 -- an unknown or renamed option: compile without it
    return {}
  return dict(CPU_OPTIONS)
