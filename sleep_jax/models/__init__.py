"""Model registry: config -> module constructor, and the forward pass used by the train step."""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from sleep_jax.config import Config


def model_factory(cfg: Config) -> Callable[[nnx.Rngs], nnx.Module]:
  if cfg.model.kind == "transformer":
    from sleep_jax.models.transformer import Transformer

    return lambda rngs: Transformer(cfg.model, rngs=rngs)
  if cfg.model.kind == "hybrid":
    from sleep_jax.models.hybrid import HybridLM

    return lambda rngs: HybridLM(cfg.model, rngs=rngs)
  if cfg.model.kind == "cms":
    from sleep_jax.models.cms import CMSTransformer

    return lambda rngs: CMSTransformer(cfg.model, rngs=rngs)
  raise ValueError(f"unknown model.kind {cfg.model.kind!r}")


def forward(model: nnx.Module, inputs_BT: jax.Array, target_mask_BT: jax.Array, cfg: Config, *,
            training: bool = True):
  """Logits [B, T, V] for next-token prediction, and the sleep passes used per example
  (None for the transformer).

  The transformer sees the whole sequence (with its eviction mask); the hybrid model runs
  Algorithm 1, which needs the target mask to tell consolidation chunks from prediction ones.
  """
  if cfg.model.kind == "hybrid":
    from sleep_jax.sleep import sleep_forward

    # Adaptive depth (sleep.adaptive_tol) is an inference option: training runs N passes.
    logits, passes_BC = sleep_forward(model, inputs_BT, target_mask_BT, cfg, return_passes=True,
                                      adaptive=False if training else None)
    return logits, passes_BC.max(axis=-1)
  return model(inputs_BT, chunk_len=cfg.sleep.chunk_len), None
