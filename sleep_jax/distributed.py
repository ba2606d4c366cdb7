"""Multi-host start-up: `jax.distributed.initialize` when the environment names a cluster.

Explicit: `distributed.coordinator/num_processes/process_id` in the config, or the variables
SLEEP_JAX_COORDINATOR, SLEEP_JAX_NUM_PROCESSES, SLEEP_JAX_PROCESS_ID (what the local launcher
sets). Auto-detected: Slurm (SLURM_NTASKS > 1) and Cloud TPU pods, through JAX's own cluster
detection. Must run before any other JAX call.

Time-outs that hold on a loaded machine: start-up waits SLEEP_JAX_DISTRIBUTED_TIMEOUT
seconds (default 600) for every process; on CPU, XLA's collective "stuck" limit is raised
to the same; and right after start-up the processes meet at a coordination-service barrier
(same time-out) and run one tiny all-device collective, so that gloo builds its
communicator while every process is there (its key-value rendezvous gives up after 30 s,
which a process still restoring or compiling on a busy machine can miss).
"""

from __future__ import annotations

import logging
import os

import jax

from sleep_jax.config import DistributedConfig

log = logging.getLogger("sleep_jax")
_initialized = False
_synced = False
_STUCK_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"


def timeout_s() -> int:
  return int(os.environ.get("SLEEP_JAX_DISTRIBUTED_TIMEOUT", "600"))


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
    flags = os.environ.get("XLA_FLAGS", "")
    if _STUCK_FLAG not in flags:  # read when the CPU client is created, i.e. after this
      os.environ["XLA_FLAGS"] = f"{flags} {_STUCK_FLAG}={timeout_s()}".strip()


def maybe_initialize(cfg: DistributedConfig) -> bool:
  """Initialise jax.distributed if asked or detected; True if running multi-process."""
  global _initialized
  if _initialized or cfg.mode == "off":
    return _initialized
  explicit = _explicit(cfg)
  if explicit is not None:
    coord, n, pid = explicit
    _use_gloo_on_cpu()
    jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=pid,
                               initialization_timeout=timeout_s())
  elif cfg.mode == "on" or _cluster_detected():
    _use_gloo_on_cpu()
    jax.distributed.initialize(initialization_timeout=timeout_s())
  else:
    return False
  _initialized = True
  log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  # Now, while the processes are together: orbax (restore, step listing) and the first
  # step may run the first collective much later on one process than on another.
  sync_before_first_collective()
  return True


def sync_before_first_collective() -> None:
  """Multi-process only, once per process: a barrier with a long time-out, then one tiny
  collective over every device (see the module docstring)."""
  global _synced
  if _synced or jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed
  from jax.experimental import multihost_utils

  client = jax_distributed.global_state.client
  if client is not None:
    client.wait_at_barrier("sleep_jax_first_collective", timeout_in_ms=timeout_s() * 1000)
  multihost_utils.sync_global_devices("sleep_jax_first_collective")
  _synced = True
