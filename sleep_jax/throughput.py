"""Throughput figures the training loop logs: tokens/s per device, FLOPs per step, MFU.

FLOPs per step come from XLA's cost analysis of the lowered (whole-program, not yet
partitioned) train step, once per jitted step function: they count what the program
computes, remat recomputation included, for the global batch. MFU per device is
(flops_per_step / devices) / step time / the peak of one device: `train.peak_flops_per_device`
when set, else the dense bf16 peak of a known accelerator by its device kind, else on CPU a
[2048, 2048] float32 `jnp.dot` timed once in this process (the same yardstick as
experiments/benchmarks/train_step.py; fake CPU devices share the cores, so each gets its share).
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp

log = logging.getLogger("sleep_jax")

# Dense bf16 peak FLOP/s per chip, matched as substrings of device_kind (first match wins:
# "TPU v5 lite" is v5e, before "TPU v5", which is v5p).
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
)


def known_peak(device_kind: str) -> float | None:
  for name, peak in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


@functools.lru_cache(maxsize=None)
def cpu_dot_peak(n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of the best of `reps` [n, n] x [n, n] float32 jnp.dot calls on device 0, timed
  once per process (every later training start in it reuses the figure)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def peak_flops_per_device(configured: float) -> float | None:
  """The MFU denominator for this process's devices (None: unknown, MFU not logged)."""
  if configured > 0:
    return configured
  dev = jax.local_devices()[0]
  if dev.platform == "cpu":
    return cpu_dot_peak() / jax.local_device_count()
  peak = known_peak(dev.device_kind)
  if peak is None:
    log.warning("no known peak FLOP/s for device kind %r: set train.peak_flops_per_device to log mfu",
                dev.device_kind)
  return peak


def step_flops(jitted_step, *args) -> float | None:
  """FLOPs of one call of a jitted function on `args` (arrays or ShapeDtypeStructs)."""
  try:
    cost = jitted_step.lower(*args).cost_analysis()
  except Exception as e:  # noqa: BLE001 -- a backend without cost analysis: no FLOPs, no MFU
    log.warning("no cost analysis for the train step (%s): flops_per_step and mfu are not logged", e)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


class Throughput:
  """Per-row throughput metrics; FLOPs cached per jitted step function."""

  def __init__(self, tokens_per_step: int, peak_per_device: float | None):
    self.tokens_per_step = tokens_per_step
    self.peak = peak_per_device
    self.devices = jax.device_count()
    self._flops: dict[int, float | None] = {}

  def flops(self, jitted_step, *args) -> float | None:
    key = id(jitted_step)
    if key not in self._flops:
      self._flops[key] = step_flops(jitted_step, *args)
    return self._flops[key]

  def row(self, step_s: float, flops: float | None) -> dict[str, float]:
    step_s = max(step_s, 1e-9)
    tps = self.tokens_per_step / step_s
    out = {"tokens_per_s": tps, "tokens_per_s_per_device": tps / self.devices}
    if flops is not None:
      out["flops_per_step"] = flops
      if self.peak:
        out["mfu"] = flops / self.devices / step_s / self.peak
    return out
