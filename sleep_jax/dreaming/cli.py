"""`sleep-jax dream CONFIG [key=value ...]`: dreaming and continual learning (paper B), resumable."""

from __future__ import annotations


def cmd_dream(args) -> int:
  from sleep_jax.config import load_config
  from sleep_jax.dreaming.report import markdown
  from sleep_jax.dreaming.run import run_dream

  rows, speed = run_dream(load_config(args.config, args.overrides))
  print(markdown(rows, speed), end="")
  return 0


def register(sub) -> None:
  p = sub.add_parser("dream", help="dreaming + continual learning over days of new facts",
                     description="Pre-train a CMS base model (closed-book facts + reading), then run each method in "
                                 "dreaming.methods through the days; writes RUN_DIR/results.{json,md,png}. "
                                 "Re-running resumes.")
  p.add_argument("config", help="YAML config, e.g. experiments/dream_tiny.yaml")
  p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. dreaming.rounds=1")
  p.set_defaults(func=cmd_dream)
