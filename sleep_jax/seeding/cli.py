"""`sleep-jax seed CONFIG [key=value ...]`: knowledge seeding (paper B), resumable."""

from __future__ import annotations


def cmd_seed(args) -> int:
  from sleep_jax.config import load_config
  from sleep_jax.seeding.report import markdown
  from sleep_jax.seeding.run import run_seed

  rows = run_seed(load_config(args.config, args.overrides))
  print(markdown(rows), end="")
  return 0


def register(sub) -> None:
  p = sub.add_parser("seed", help="knowledge seeding: teacher -> expand -> consolidate -> evaluate",
                     description="Train a small CMS teacher on facts (new ones in a fast expert), grow it into a "
                                 "larger student on its own mesh, consolidate by each method in seeding.methods, "
                                 "and write RUN_DIR/results.{json,md,png}. Re-running resumes.")
  p.add_argument("config", help="YAML config, e.g. experiments/seed_tiny.yaml")
  p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. seeding.steps=50")
  p.set_defaults(func=cmd_seed)
