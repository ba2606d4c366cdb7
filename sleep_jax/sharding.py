"""Device mesh, logical-axis rules and sharded initialisation.

Parameters carry logical axis names ("embed", "mlp", "heads", ...). Rules from the config map
each logical name to mesh axes ("data", "fsdp", "tensor"), MaxText style. A dimension whose
size the mesh axes do not divide stays replicated (tiny models on big meshes still run).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sleep_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  fixed = math.prod(s for s in sizes if s != -1)
  n_fill = sizes.count(-1)
  if n_fill > 1:
    raise ConfigError("bad mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
  if n_fill == 1:
    if n_devices % fixed:
      raise ConfigError(f"bad mesh: {n_devices} devices are not divisible by the fixed axes ({fixed})")
    sizes[sizes.index(-1)] = n_devices // fixed
  if math.prod(sizes) != n_devices:
    raise ConfigError(f"bad mesh: mesh.data x mesh.fsdp x mesh.tensor = {math.prod(sizes)} but there are {n_devices} devices")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(cfg, len(devices))
  # Auto axes: GSPMD propagates shardings through the model (jax.jit in/out shardings).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _rules_dict(rules: Sequence[Any]) -> dict[str, tuple[str, ...]]:
  out = {}
  for logical, mesh_axes in rules:
    if mesh_axes is None:
      out[logical] = ()
    elif isinstance(mesh_axes, str):
      out[logical] = (mesh_axes,)
    else:
      out[logical] = tuple(mesh_axes)
    for a in out[logical]:
      if a not in MESH_AXES:
        raise ConfigError(f"bad value for config key 'logical_axis_rules': unknown mesh axis '{a}'")
  return out


def logical_to_mesh(logical: P | tuple, shape: tuple[int, ...], mesh: Mesh, rules: Sequence[Any]) -> P:
  """Logical PartitionSpec -> mesh PartitionSpec, dropping axes already used or not dividing."""
  table = _rules_dict(rules)
  used: set[str] = set()
  out = []
  for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
    axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1) if name else ()
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def abstract_model(make: Callable[[nnx.Rngs], nnx.Module]):
  """(graphdef, abstract param dict, logical spec dict) without allocating parameters."""
  abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state))


def param_shardings(abstract_params, logical_specs, mesh: Mesh, rules) -> Any:
  return jax.tree.map(
      lambda a, spec: NamedSharding(mesh, logical_to_mesh(spec, a.shape, mesh, rules)),
      abstract_params, logical_specs, is_leaf=lambda x: isinstance(x, P))


def init_params(make: Callable[[nnx.Rngs], nnx.Module], rng_seed: int, shardings) -> Any:
  """Parameters created directly in their shardings: no host ever holds the whole model."""

  def init():
    return nnx.to_pure_dict(nnx.split(make(nnx.Rngs(rng_seed)))[1])

  return jax.jit(init, out_shardings=shardings)()


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """The contiguous row range [start, stop) of the global batch held by this process."""
  sharding = batch_sharding(mesh, 1)
  idx = sharding.addressable_devices_indices_map((global_batch,))
  starts = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else global_batch) for s in idx.values()})
  start, stop = starts[0][0], max(e for _, e in starts)
  covered = sum(e - s for s, e in starts)
  if covered != stop - start:
    raise RuntimeError("this process's batch rows are not contiguous on the mesh")
  return start, stop


def process_slot(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """(slot, number of slots): this process holds rows [slot*b, (slot+1)*b) of each batch."""
  start, stop = local_batch_rows(mesh, global_batch)
  return start // (stop - start), global_batch // (stop - start)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-process numpy rows -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}
