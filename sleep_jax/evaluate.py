"""Evaluation: exact-match accuracy of the answer tokens on the held-out split, per difficulty."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

import jax

from sleep_jax import data as data_lib
from sleep_jax import sharding as shd
from sleep_jax.checkpoint import CheckpointError, Checkpointer
from sleep_jax.config import Config
from sleep_jax.train import Trainer


def evaluate(trainer: Trainer, params, *, num_batches: int | None) -> dict[str, Any]:
  """Exact-match accuracy of the answer tokens, overall and per difficulty."""
  cfg = trainer.cfg
  B = cfg.train.batch_size
  slot, slots = shd.process_slot(trainer.mesh, B)
  loss_sum = tokens = 0.0
  hits, counts = defaultdict(int), defaultdict(int)
  passes = []
  for batch in data_lib.make_eval_batches(cfg.data, batch_size=B, num_batches=num_batches,
                                          process_index=slot, process_count=slots):
    local = {k: batch[k] for k in ("tokens", "loss_mask", "positions", "segment_ids") if k in batch}
    out = jax.device_get(trainer.eval_step(params, shd.global_batch(local, trainer.mesh)))
    loss_sum += float(out["loss_sum"])
    tokens += float(out["tokens"])
    b = B // slots  # exact_B is the whole global batch; keep this process's rows
    if "passes_B" in out:
      passes += [p for p, v in zip(out["passes_B"][slot * b:(slot + 1) * b], batch["valid"]) if v]
    for ok, diff, valid in zip(out["exact_B"][slot * b:(slot + 1) * b], batch["difficulty"], batch["valid"]):
      if valid:
        hits[int(diff)] += int(ok)
        counts[int(diff)] += 1
  n = sum(counts.values())
  result = {"eval/loss": loss_sum / max(tokens, 1.0), "eval/accuracy": sum(hits.values()) / max(n, 1),
            "eval/examples": n}
  if passes:  # sleep passes used per example (mean of the max over its chunks)
    result["eval/sleep_passes"] = float(sum(passes) / len(passes))
  for d in sorted(counts):
    result[f"eval/accuracy_d{d}"] = hits[d] / counts[d]
    result[f"eval/examples_d{d}"] = counts[d]
  return result


def restore_for_eval(cfg: Config) -> tuple[Trainer, int, Any]:
  """(trainer, step, params) of the newest readable checkpoint of cfg.run_dir."""
  trainer = Trainer(cfg)
  # A reader: it may run beside a training process, so it never moves a checkpoint aside.
  ckpt = Checkpointer(cfg.run_dir, keep=cfg.checkpoint.keep, async_save=False, set_aside=False)
  restored = ckpt.restore_latest(trainer.abstract_state)
  ckpt.close()
  if restored is None:
    raise CheckpointError(f"no readable checkpoint in {ckpt.directory}")
  step, state, _ = restored
  return trainer, int(step), state["params"]


def evaluate_run_dir(cfg: Config, *, num_batches: int | None = None) -> dict[str, Any]:
  """Restore the newest readable checkpoint of cfg.run_dir and evaluate it on the eval split."""
  trainer, step, params = restore_for_eval(cfg)
  result = {"step": step, **evaluate(trainer, params, num_batches=num_batches)}
  if jax.process_index() == 0:
    with open(os.path.join(cfg.run_dir, "eval_full.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result
