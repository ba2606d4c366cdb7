"""Diagnose knowledge seeding: consolidation variants on one finished `sleep-jax seed` run.

  python experiments/diagnose_seeding.py RUN_DIR NAME METHOD [seeding.key=value ...]

Reuses RUN_DIR's teacher, grown student and teacher samples D (a run with at least
methods [teacher, expanded] done), trains METHOD with the seeding overrides into
RUN_DIR/diagnose/NAME, and prints one JSON line: new / old accuracy every eval_every steps
and at the end, divergence to the teacher, wall time. Resumes like any stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import yaml

from sleep_jax import sharding as shd
from sleep_jax.config import load_config
from sleep_jax.data.facts import FactWorld, world_from_config
from sleep_jax.seeding import expand
from sleep_jax.seeding.pipeline import ModelOnMesh, divergence_to_teacher, scores
from sleep_jax.seeding.run import consolidate, prepare


def main(argv: list[str]) -> None:
  run_dir, name, method, *overrides = argv
  cfg = load_config(os.path.join(run_dir, "config.yaml"))
  world = world_from_config(FactWorld, cfg.seeding.facts, "seeding.facts", cfg.model.vocab_size)
  t = ModelOnMesh(cfg, shd.make_mesh(cfg.mesh))
  s = ModelOnMesh(expand.student_config(cfg), shd.make_mesh(cfg.seeding.student_mesh))
  teacher, _, student, _, D = prepare(cfg, world, t, s)
  changes = {}
  for o in overrides:
    key, value = o.split("=", 1)
    changes[key.removeprefix("seeding.")] = yaml.safe_load(value)
  variant = dataclasses.replace(cfg, run_dir=os.path.join(run_dir, "diagnose", name),
                                seeding=dataclasses.replace(cfg.seeding, **changes))
  t0 = time.perf_counter()
  params = consolidate(variant, method, t, s, teacher, student, D, world)
  wall = time.perf_counter() - t0
  evals = []
  mpath = os.path.join(variant.run_dir, "methods", method, "metrics.jsonl")
  if os.path.exists(mpath):
    with open(mpath) as f:
      evals = [{k: round(v, 4) for k, v in r.items() if k.startswith("eval/") or k == "step"}
               for r in map(json.loads, f) if any(k.startswith("eval/") for k in r)]
  row = {"name": name, "method": method, **changes, **{k: round(v, 4) for k, v in scores(s, params, world).items()},
         "divergence_to_teacher": round(divergence_to_teacher(t, teacher, s, params, world), 4),
         "wall_s": round(wall, 1), "evals": evals}
  print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
