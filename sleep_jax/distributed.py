"""Multi-host start-up: `jax.distributed.initialize` when the environment names a cluster.

Explicit: `distributed.coordinator/num_processes/process_id` in the config, or the variables
SLEEP_JAX_COORDINATOR, SLEEP_JAX_NUM_PROCESSES, SLEEP_JAX_PROCESS_ID (what the local launcher
sets). Auto-detected: Slurm (SLURM_NTASKS > 1) and Cloud TPU pods, through JAX's own cluster
detection. Must run before any other JAX call.
"""

from __future__ import annotations

import logging
import os

import jax

from sleep_jax.config import DistributedConfig

log = logging.getLogger("sleep_jax")
_initialized = False


def _explicit(cfg: DistributedConfig) -> tuple[str, int, int] | None:
  coord = cfg.coordinator or os.environ.get("SLEEP_JAX_COORDINATOR")
  if not coord:
    return None
  n = cfg.num_processes if cfg.num_processes is not None else int(os.environ["SLEEP_JAX_NUM_PROCESSES"])
  pid = cfg.process_id if cfg.process_id is not None else int(os.environ["SLEEP_JAX_PROCESS_ID"])
  return coord, n, pid


def _cluster_detected() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def _use_gloo_on_cpu() -> None:
  # Cross-process collectives on CPU need gloo; harmless on TPU/GPU backends.
  if os.environ.get("JAX_PLATFORMS", "cpu").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def maybe_initialize(cfg: DistributedConfig) -> bool:
  """Initialise jax.distributed if asked or detected; True if running multi-process."""
  global _initialized
  if _initialized or cfg.mode == "off":
    return _initialized
  explicit = _explicit(cfg)
  if explicit is not None:
    coord, n, pid = explicit
    _use_gloo_on_cpu()
    jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=pid)
  elif cfg.mode == "on" or _cluster_detected():
    _use_gloo_on_cpu()
    jax.distributed.initialize()
  else:
    return False
  _initialized = True
  log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return True
