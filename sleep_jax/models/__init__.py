"""Model registry and the forward passes used by training, evaluation and interop.

Every model is one `Decoder` (models/decoder.py); model.kind (transformer | hybrid | cms)
only chooses its layer list and MLP kind.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from sleep_jax.config import Config


def model_factory(cfg: Config) -> Callable[[nnx.Rngs], nnx.Module]:
  from sleep_jax.models.decoder import Decoder

  if cfg.model.kind not in ("transformer", "hybrid", "cms"):
    raise ValueError(f"unknown model.kind {cfg.model.kind!r}")
  return lambda rngs: Decoder(cfg.model, rngs=rngs, chunk_len=cfg.sleep.chunk_len)


def sleeps(cfg: Config) -> bool:
  """Whether the forward runs Algorithm 1 (chunks and sleep passes): a model with GDN layers
  whose attention is evicted. Without GDN nothing survives a chunk, and without eviction
  there is no chunk to sleep on: one plain causal pass is the same function."""
  from sleep_jax.models.decoder import layer_kinds

  return "gdn" in layer_kinds(cfg.model) and cfg.model.eviction != "none"


def forward(model: nnx.Module, inputs_BT: jax.Array, target_mask_BT: jax.Array, cfg: Config, *,
            training: bool = True, positions_BT: jax.Array | None = None,
            segment_ids_BT: jax.Array | None = None, consolidate_BC: jax.Array | None = None,
            features: bool = False, adapters: dict | None = None):
  """Logits [B, T, V] for next-token prediction, and the sleep passes used per example
  (None when the model does not sleep). Packed text passes positions and segment ids: a
  segment change resets S, conv caches and attention (no information crosses documents).
  consolidate_BC: which chunks sleep (default: sleep.schedule), for a batch that carries it.
  features: the head's input final_norm(h) [B, T, D] instead of the logits (chunked losses:
  ops/chunked_ce.py with `model.head_weight()`).
  adapters: unmerged low-rank adapters (models/adapters.py; a LoRA fine-tune) or None."""
  if sleeps(cfg):
    from sleep_jax.sleep import sleep_forward

    # Adaptive depth (sleep.adaptive_tol) is an inference option: training runs N passes.
    logits, passes_BC = sleep_forward(model, inputs_BT, target_mask_BT, cfg, return_passes=True,
                                      adaptive=False if training else None, positions_BT=positions_BT,
                                      segment_ids_BT=segment_ids_BT, consolidate_BC=consolidate_BC,
                                      features=features, adapters=adapters)
    return logits, passes_BC.max(axis=-1)
  return model(inputs_BT, positions_BT, segment_ids_BT, features=features, adapters=adapters)[0], None


def logits(model: nnx.Module, tokens_BT: jax.Array, cfg: Config) -> jax.Array:
  """One plain causal pass over whole sequences -> float32 [B, T, V] (what `transformers`
  computes for an imported model; for a model with eviction, its N = 1 function)."""
  del cfg  # the model carries its architecture; kept for a uniform public signature
  return model(tokens_BT)[0]
