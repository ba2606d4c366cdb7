"""Metric sinks: metrics.jsonl (one JSON object per logged step) and TensorBoard events.

Only process 0 writes. On resume, lines past the restored step are dropped so that the file
reads exactly like an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax


def _clean(v: Any) -> Any:
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/Inf
  return v


class MetricWriter:
  def __init__(self, run_dir: str, *, resume_step: int = 0, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(run_dir, exist_ok=True)
    truncate_after(self.path, resume_step)
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), flush_secs=10)
    self._file = open(self.path, "a")

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _clean(v) for k, v in values.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()


def truncate_after(path: str, step: int) -> None:
  """Keep only rows with row["step"] <= step (a resumed run re-logs the rest)."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line)
      except (ValueError, KeyError):
        continue  # a torn last line from a killed process
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def read_metrics(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
