"""`sleep-jax dream CONFIG`: pre-train the base model, then every method lives through the days.

RUN_DIR/
  base/                    pre-training stage (closed-book old facts + reading)
  base_reading.json        the base model's in-context reading accuracy, measured once (through its own forward:
                           for a sleeping hybrid, across the passage's eviction) and closed-book
  vmap_speedup.json        isolated copies: vmapped vs a sequential loop, same dreams
  methods/<m>/seed<s>/day<d>.json  accuracy on every day's facts and on the old facts after day d
  methods/<m>/seed<s>/checkpoints  params, generator adapter, its optimizer and the dream memory after each day
  results.json / .md / .png        per method: the mean over dreaming seeds, their spread, each seed
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax import distributed, engine, preflight, rng_streams, run_lock
from sleep_jax import sharding as shd
from sleep_jax.checkpoint import Checkpointer
from sleep_jax.config import Config, ConfigError
from sleep_jax.data.days import DayWorld
from sleep_jax.data.facts import world_from_config
from sleep_jax.dreaming import dreams as D
from sleep_jax.dreaming import report
from sleep_jax.dreaming.harness import METHODS, Dreamer, run_day, vmap_speedup
from sleep_jax.loop import check_saved_config, write_config
from sleep_jax.models import sleeps
from sleep_jax.models.decoder import mlp_kind
from sleep_jax.seeding.pipeline import stage, to_global
from sleep_jax.train import Trainer

log = logging.getLogger("sleep_jax")


def _check(cfg: Config) -> DayWorld:
  if mlp_kind(cfg.model) != "cms":  # days are written into slow-level CMS experts
    raise ConfigError(f"bad value for config key 'model.mlp': dreaming needs CMS MLP levels (model.kind=cms, or "
                      f"model.mlp=cms on a {cfg.model.kind}), got {mlp_kind(cfg.model)!r}")
  for m in cfg.dreaming.methods:
    if m not in METHODS:
      raise ConfigError(f"bad value for config key 'dreaming.methods': unknown method {m!r} (known: {', '.join(METHODS)})")
  world = world_from_config(DayWorld, cfg.dreaming.world, "dreaming.world", cfg.model.vocab_size)
  dc = cfg.dreaming
  if dc.write_targets not in ("attributes", "statements"):
    raise ConfigError("bad value for config key 'dreaming.write_targets': use 'attributes' or 'statements'")
  if dc.generator not in ("per_day", "carried"):
    raise ConfigError("bad value for config key 'dreaming.generator': use 'per_day' or 'carried'")
  if dc.memory < 0:
    raise ConfigError("bad value for config key 'dreaming.memory': need memory >= 0 (0: off)")
  if dc.seeds < 1:
    raise ConfigError("bad value for config key 'dreaming.seeds': need at least 1")
  if dc.top_k + dc.random_extra > dc.dreams or dc.top_k < 1:
    raise ConfigError("bad value for config key 'dreaming.top_k': need 1 <= top_k and top_k + random_extra <= dreams")
  return world


def pretrain(cfg: Config, world: DayWorld, trainer: Trainer):
  B = cfg.train.batch_size
  seed = rng_streams.seed(cfg.seed, "dreaming/base")
  batch = lambda i: to_global(dict(zip(("tokens", "loss_mask"), world.pretrain_batch(seed, i, B))), trainer.mesh)
  state = engine.run(stage(cfg, "base", abstract_state=trainer.abstract_state, init=trainer.init_state,
                            step=trainer.train_step, batch=batch, steps=cfg.train.steps,
                            desc="base: old facts + reading"))
  return state["params"]


def base_reading(cfg: Config, world: DayWorld, graphdef, params, n_fresh: int = 8) -> dict:
  """The base model's reading, in context, through the forward it was trained with (a
  sleeping hybrid reads the passage chunk by chunk, sleeps on each and evicts its KV cache
  before the QA): share of restated statements right, on each day's passage and on n_fresh
  passages of fresh random attributes; with the same weights at sleep.passes = 1 too (what
  the sleep passes add), and the closed-book accuracy on the old facts."""
  import dataclasses

  stmt = functools.partial(D.statement_accuracy, start=world.passage_len, stmt_len=world.stmt_len)
  rng = rng_streams.numpy(cfg.seed, "dreaming/base_reading")
  fresh = [world.reading_probes(*world.fresh_facts(rng)) for _ in range(n_fresh)]
  days = [world.reading_probes(p, world.facts.table[p[:, 0], p[:, 1]]) for p in map(world.day_pairs, range(world.days))]
  one_pass = dataclasses.replace(cfg, sleep=dataclasses.replace(cfg.sleep, passes=1))
  out = {"sleeps": sleeps(cfg), "chunk_len": cfg.sleep.chunk_len, "passes": cfg.sleep.passes,
         "passage_len": world.passage_len}
  for name, c in (("", cfg), ("_passes1", one_pass)):
    acc = jax.jit(functools.partial(stmt, graphdef, cfg=c))
    for what, rows in (("days", days), ("fresh", fresh)):
      out[f"reading_{what}{name}"] = float(np.mean([acc(params, jnp.asarray(t), jnp.asarray(m)) for t, m in rows]))
  probes, pmask = world.probes(world.old_pairs())
  out["old_closed_book"] = float(jax.jit(functools.partial(D.probe_scores, graphdef, cfg=cfg))(
      params, jnp.asarray(probes), jnp.asarray(pmask))[0])
  return out


def summarize(R: np.ndarray, old: float) -> dict:
  """R[t, d]: accuracy on day d's facts after day t (continual-learning metrics)."""
  D = len(R)
  prev = range(D - 1)
  return {
      "new_accuracy": float(np.mean([R[d, d] for d in range(D)])),
      "old_accuracy": old,
      "backward_transfer": float(np.mean([R[-1, d] - R[d, d] for d in prev])) if D > 1 else 0.0,
      "forgetting": float(np.mean([R[d:D - 1, d].max() - R[-1, d] for d in prev])) if D > 1 else 0.0,
  }


def dream_seed(cfg: Config, s: int) -> int:
  """Dreaming seed s's own seed: every method lives through the days on the same draws."""
  return rng_streams.seed(cfg.seed, f"dreaming/seed{s}")


def run_method(cfg: Config, world: DayWorld, dreamer: Dreamer, method: str, base_params, s: int = 0) -> dict:
  """One method through every day with dreaming seed s (resumes per day)."""
  mdir = os.path.join(cfg.run_dir, "methods", method, f"seed{s}")
  os.makedirs(mdir, exist_ok=True)
  seed = dream_seed(cfg, s)
  gen, opt = dreamer.fresh_generator(base_params, seed)
  init = {"params": base_params, "gen": gen, "opt": opt, "memory": dreamer.empty_memory()}
  ck = Checkpointer(mdir, keep=1, async_save=False)
  restored = ck.restore_latest(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), init))
  done, state = (0, init) if restored is None else (restored[0], restored[1])
  for day in range(done, world.days):
    t0 = time.perf_counter()
    state, info = run_day(dreamer, method, state, day, seed)
    params = jax.block_until_ready(state["params"])  # dispatch is asynchronous: time the work, not its scheduling
    row = {"day": day, "wall_s": time.perf_counter() - t0, **info,
           "day_accuracy": [dreamer.accuracy(params, world.day_pairs(d)) for d in range(world.days)],
           "old_accuracy": dreamer.accuracy(params, world.old_pairs())}
    log.info("%s seed %d day %d: new %.3f old %.3f %s", method, s, day, row["day_accuracy"][day], row["old_accuracy"],
             info)
    if jax.process_index() == 0:
      with open(os.path.join(mdir, f"day{day}.json"), "w") as f:
        json.dump(row, f)
    ck.save(day + 1, state, {"day": day + 1}, wait=True)
  ck.close()
  rows = []
  for d in range(world.days):
    with open(os.path.join(mdir, f"day{d}.json")) as f:
      rows.append(json.load(f))
  R = np.array([r["day_accuracy"] for r in rows])
  return {"method": method, **summarize(R, rows[-1]["old_accuracy"]), "wall_s": sum(r["wall_s"] for r in rows),
          "per_day_new": [float(R[d, d]) for d in range(world.days)], "per_day_old": [r["old_accuracy"] for r in rows]}


METRICS = ("new_accuracy", "old_accuracy", "backward_transfer", "forgetting")


def over_seeds(per_seed: list[dict]) -> dict:
  """One method's row: every metric's mean over dreaming seeds, its standard deviation
  (`<metric>_std`, 0 for one seed), the per-seed values, and the total wall time."""
  row = {"method": per_seed[0]["method"], "seeds": len(per_seed)}
  for k in METRICS:
    v = np.array([r[k] for r in per_seed])
    row[k], row[f"{k}_std"] = float(v.mean()), float(v.std())
  row["wall_s"] = float(sum(r["wall_s"] for r in per_seed))
  for k in ("per_day_new", "per_day_old"):
    row[k] = np.mean([r[k] for r in per_seed], axis=0).tolist()
  row["per_seed"] = [{k: r[k] for k in METRICS} for r in per_seed]
  return row


def run_dream(cfg: Config) -> tuple[list[dict], dict]:
  world = _check(cfg)
  distributed.maybe_initialize(cfg.distributed)
  preflight.check_mesh(cfg.mesh, cfg.train.batch_size)  # before the run dir is touched
  trainer = Trainer(cfg, mesh=shd.make_mesh(cfg.mesh))
  with run_lock.hold(cfg.run_dir, what="dream", process=jax.process_index()):
    check_saved_config(cfg)
    write_config(cfg)
    return _run_dream(cfg, world, trainer)


def measured_once(cfg: Config, name: str, measure) -> dict:
  """RUN_DIR/name: measure() on the base model, written once and read back on resume; measured
  again if the base has trained on since (train.steps may grow on resume)."""
  path = os.path.join(cfg.run_dir, name)
  if os.path.exists(path):
    with open(path) as f:
      out = json.load(f)
    if out.get("base_steps") == cfg.train.steps:
      return out
  out = {"base_steps": cfg.train.steps, **measure()}
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(out, f, indent=2)
    os.replace(path + ".tmp", path)
  return out


def _run_dream(cfg: Config, world: DayWorld, trainer: Trainer) -> tuple[list[dict], dict]:
  base_params = pretrain(cfg, world, trainer)
  reading = measured_once(cfg, "base_reading.json", lambda: base_reading(cfg, world, trainer.graphdef, base_params))
  log.info("base reading (in context, %s): days %.3f fresh %.3f (sleep.passes=1: days %.3f fresh %.3f); "
           "old closed-book %.3f", "across eviction, sleeping" if reading["sleeps"] else "one pass",
           reading["reading_days"], reading["reading_fresh"], reading["reading_days_passes1"],
           reading["reading_fresh_passes1"], reading["old_closed_book"])
  dreamer = Dreamer(cfg, trainer.graphdef, world)
  speed = measured_once(cfg, "vmap_speedup.json", lambda: vmap_speedup(
      dreamer, base_params, 0, rng_streams.seed(cfg.seed, "dreaming/vmap_speedup")))
  log.info("isolated copies: vmapped vs a sequential loop, speed-up %.2fx (%d copies, max |diff| %.1e)",
           speed["speedup"], speed["copies"], speed["max_abs_diff"])
  rows = [over_seeds([run_method(cfg, world, dreamer, m, base_params, s) for s in range(cfg.dreaming.seeds)])
          for m in cfg.dreaming.methods]
  rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
  if jax.process_index() == 0:
    report.write(cfg.run_dir, rows, speed, reading)
  return rows, speed
