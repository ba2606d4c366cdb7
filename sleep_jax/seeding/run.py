"""The `seed` pipeline driver: stages in order, one consolidation per method, the results table."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import jax
import numpy as np

from sleep_jax import distributed, engine, preflight, rng_streams, run_lock
from sleep_jax import sharding as shd
from sleep_jax.checkpoint import Checkpointer
from sleep_jax.config import Config, ConfigError
from sleep_jax.data.facts import FactWorld, world_from_config
from sleep_jax.loop import check_saved_config, write_config
from sleep_jax.models import roles
from sleep_jax.seeding import expand, report, steps
from sleep_jax.seeding.methods import check_methods, method_spec
from sleep_jax.seeding.pipeline import (ModelOnMesh, divergence_to_teacher, expand_student, scores,
                                        stage, teacher_samples, to_global, train_teacher)

log = logging.getLogger("sleep_jax")


def _timed(path: str, fn):
  """fn() and its wall time; the time of a stage finished earlier is read back from `path`."""
  t0 = time.perf_counter()
  out = fn()
  wall = time.perf_counter() - t0
  if os.path.exists(path):
    with open(path) as f:
      return out, json.load(f)["wall_s"]
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump({"wall_s": wall}, f)
  return out, wall


def expansion_slots(params, param_roles, level: int, n: int) -> list[int]:
  """The slots a consolidation trains: the student's new expert (the last active slot of
  `level`) and the next n - 1 free ones."""
  active = expand.active_slots(jax.device_get(params), param_roles, level)
  first = active[-1]
  free = [e for e in range(roles.expert_slots(param_roles)) if e not in active]
  if len(free) < n - 1:
    raise ConfigError(f"bad value for config key 'seeding.experts': {n} experts asked, the student's slow level has "
                      f"{len(free) + 1} slots left (model.cms.experts)")
  return [first, *free[:n - 1]]


def consolidate(cfg: Config, name: str, t: ModelOnMesh, s: ModelOnMesh, teacher_params, student_params,
                D: dict[str, np.ndarray], world: FactWorld):
  """Train the student by method `name`; returns its final parameters."""
  sc, spec = cfg.seeding, method_spec(name, cfg.seeding)
  slow = len(cfg.model.cms.d_ff) - 1
  params = student_params
  new_slots = expansion_slots(params, s.roles, slow, sc.experts)
  if spec["train"] == "slow_mlp":  # no expansion: undo the new expert, train existing weights
    params = expand.set_expert(params, s.roles, slow, new_slots[0], active=False)
    train = steps.trainable(s.roles, level=slow, slot=None)
  else:
    for slot in new_slots[1:]:  # B = 0: activating more slots changes nothing until they train
      params = expand.set_expert(params, s.roles, slow, slot, active=True)
    if sc.expert_init == "mlp":
      params = jax.jit(functools.partial(expand.init_experts_from_mlp, param_roles=s.roles, level=slow,
                                         slots=new_slots), out_shardings=s.shardings)(params)
    if sc.router_bias:
      params = jax.jit(functools.partial(expand.set_router_bias, param_roles=s.roles, level=slow, slots=new_slots,
                                         bias=sc.router_bias), out_shardings=s.shardings)(params)
    train = steps.trainable(s.roles, level=slow, slot=new_slots)
  tx = steps.masked_optimizer(train, sc.lr, sc.steps)
  # One stream for every method: they differ by method, not by their random draws.
  shardings, abstract, make = s.train_state(tx, rng_streams.raw_key(cfg.seed, "seeding/consolidate"))
  bsh = shd.batch_sharding(s.mesh)
  if spec["kind"] == "sft":
    fn = jax.jit(functools.partial(steps.sft_step, s.graphdef, tx), in_shardings=(shardings, bsh),
                 out_shardings=(shardings, s.rep), donate_argnums=(0,))
    call = fn
  else:
    hp = {"lam": spec["lam"], "alpha": spec["alpha"], "lam_warmup": spec.get("lam_warmup", 0)}
    fn = steps.jit_step(functools.partial(steps.ks_step, s.graphdef, t.graphdef, tx, cfg, s.cfg, hp, gather=s.rep),
                        shardings,
                        (t.on(s.mesh), s.shardings), bsh, s.rep)
    teacher_on_s = jax.device_put(teacher_params, t.on(s.mesh))
    call = lambda state, batch: fn(state, teacher_on_s, student_params, batch)

  def batch(i):  # rows of D: a pure function of (seed, step)
    idx = rng_streams.numpy(cfg.seed, "seeding/consolidate/batches", i).integers(0, len(D["tokens"]), sc.batch_size)
    return to_global({k: v[idx] for k, v in D.items()}, s.mesh)

  def on_eval(state, _):
    return {f"eval/{k}": v for k, v in scores(s, state["params"], world).items()}

  state = engine.run(stage(cfg, "methods", name, abstract_state=abstract, init=lambda: make(params), step=call,
                            batch=batch, steps=sc.steps, desc=f"consolidate: {name}", on_eval=on_eval,
                            eval_every=sc.eval_every))
  return state["params"]


def run_seed(cfg: Config) -> list[dict]:
  if cfg.model.kind != "cms":
    raise ConfigError("bad value for config key 'model.kind': knowledge seeding needs 'cms'")
  check_methods(cfg.seeding)
  world = world_from_config(FactWorld, cfg.seeding.facts, "seeding.facts", cfg.model.vocab_size)
  distributed.maybe_initialize(cfg.distributed)
  # Checked before the run dir is touched: both meshes and the batches they split.
  preflight.check_mesh(cfg.mesh, cfg.train.batch_size)
  preflight.check_mesh(cfg.seeding.student_mesh, cfg.seeding.batch_size, key="seeding.batch_size")
  t = ModelOnMesh(cfg, shd.make_mesh(cfg.mesh))
  s = ModelOnMesh(expand.student_config(cfg), shd.make_mesh(cfg.seeding.student_mesh))
  with run_lock.hold(cfg.run_dir, what="seed", process=jax.process_index()):
    check_saved_config(cfg)
    write_config(cfg)
    if cfg.seeding.seeds == 1:
      return _run_seed(cfg, world, t, s)
    per_seed = [_run_seed(dataclasses.replace(cfg, seed=cfg.seed + i, run_dir=os.path.join(cfg.run_dir, f"seed{i}")),
                          world, t, s) for i in range(cfg.seeding.seeds)]
    rows = over_seeds(per_seed)
    if jax.process_index() == 0:
      report.write(cfg.run_dir, rows)
    return rows


METRICS = ("accuracy", "new_accuracy", "old_accuracy", "divergence_to_teacher")


def over_seeds(per_seed: list[list[dict]]) -> list[dict]:
  """One row per method: each metric's mean over seeds, its standard deviation
  (`<metric>_std`), the per-seed values, and the total wall time."""
  rows = []
  for i, first in enumerate(per_seed[0]):
    runs = [rows_s[i] for rows_s in per_seed]
    row = {"method": first["method"], "seeds": len(runs)}
    for k in METRICS:
      v = np.array([r[k] for r in runs], np.float64)
      row[k], row[f"{k}_std"] = round(float(v.mean()), 4), round(float(v.std()), 4)
    row["wall_s"] = round(float(sum(r["wall_s"] for r in runs)), 1)
    row["per_seed"] = [{k: r[k] for k in METRICS} for r in runs]
    rows.append(row)
  return rows


def prepare(cfg: Config, world: FactWorld, t: ModelOnMesh, s: ModelOnMesh):
  """The stages every method shares, each resumed if done: (teacher params, teacher wall
  time, grown student params, expansion max |logits diff|, teacher samples D)."""
  rd = cfg.run_dir
  teacher_params, t_wall = _timed(os.path.join(rd, "teacher", "wall.json"), lambda: train_teacher(cfg, world, t))

  ck = Checkpointer(os.path.join(rd, "student_init"), keep=1, async_save=False)
  restored = ck.restore_latest({"params": jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                                        s.abstract, s.shardings), "diff": jax.ShapeDtypeStruct((), np.float32)})
  if restored is None:
    student_params, diff = expand_student(cfg, t, s, teacher_params)
    ck.save(0, {"params": student_params, "diff": np.float32(diff)}, {"step": 0}, wait=True)
  else:
    student_params, diff = restored[1]["params"], float(restored[1]["diff"])
  ck.close()
  log.info("expansion: max |student - teacher| logits = %.2e before the fast experts were reset", diff)
  D = teacher_samples(cfg, world, t, teacher_params)
  return teacher_params, t_wall, student_params, diff, D


def _run_seed(cfg: Config, world: FactWorld, t: ModelOnMesh, s: ModelOnMesh) -> list[dict]:
  rd = cfg.run_dir
  teacher_params, t_wall, student_params, diff, D = prepare(cfg, world, t, s)
  rows = []
  for name in cfg.seeding.methods:
    out = os.path.join(rd, "methods", name, "eval.json")
    if os.path.exists(out):  # finished earlier
      with open(out) as f:
        rows.append(json.load(f))
      continue
    if name == "teacher":
      row = {**scores(t, teacher_params, world), "divergence_to_teacher": 0.0, "wall_s": t_wall}
    elif name == "expanded":
      row = {**scores(s, student_params, world), "wall_s": 0.0,
             "divergence_to_teacher": divergence_to_teacher(t, teacher_params, s, student_params, world)}
    else:
      t0 = time.perf_counter()
      params = consolidate(cfg, name, t, s, teacher_params, student_params, D, world)
      row = {**scores(s, params, world), "wall_s": time.perf_counter() - t0,
             "divergence_to_teacher": divergence_to_teacher(t, teacher_params, s, params, world)}
    row = {"method": name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
           "expansion_max_abs_diff": diff}
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(out), exist_ok=True)
      with open(out, "w") as f:
        json.dump(row, f, indent=2)
    log.info("%s", row)
    rows.append(row)
  if jax.process_index() == 0:
    report.write(rd, rows)
  return rows
