"""Sweeps: a grid (and/or zip) over config keys, one run dir per point; resumable; aggregated.

A sweep file (YAML; relative paths are taken from the working directory, as in configs):

  name: tiny_passes                  # default: the file's stem
  base: experiments/tiny.yaml        # the config every point starts from
  root: runs/sweeps/tiny_passes      # point run dirs are ROOT/<point name>; default runs/sweeps/NAME
  overrides: [train.steps=60]        # key=value applied to every point
  grid: {sleep.passes: [1, 2, 3, 4]} # cartesian product, the last key varying fastest
  zip: {...}                         # equal-length lists taken together: one more grid axis
  points:                            # extra points (baselines); `label` names their table column
    - {label: hard-eviction, model.eviction: hard}
  eval:                              # how every trained point is evaluated
    overrides: [data.eval_examples=512]
    grid: {data.eval_task_options.steps: [1, 4]}   # one evaluation per entry (zip works too)
    batches: null                    # eval batches per evaluation; null: the whole eval split

A point named `passes=2` trains (or resumes) in ROOT/passes=2 with `loop.train`, is evaluated
once per eval entry, and writes ROOT/passes=2/point.json, whose `done: true` marks it
finished; `collect` turns the finished points into ROOT/results.{json,md} and
ROOT/accuracy_vs_passes.png. Points are independent, so a cluster launcher can run each as
`sleep-jax sweep SWEEP.yaml --point I` and collect afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import time
from typing import Any, Optional


from sleep_jax import config as config_lib
from sleep_jax import sweep_results
from sleep_jax.sweep_results import read_record
from sleep_jax.config import Config, ConfigError, read_yaml_mapping

log = logging.getLogger("sleep_jax.sweep")

SWEEP_KEYS = ("name", "base", "root", "overrides", "grid", "zip", "points", "eval")
EVAL_KEYS = ("overrides", "grid", "zip", "batches")
LABEL = "label"
# Keys that change how a point runs, not what it computes: editing them keeps a done point done.
HOW_KEYS = ("run_dir", "mesh.", "distributed.", "checkpoint.", "data.prefetch", "data.data_dir",
            "train.log_every", "train.eval_every", "train.eval_batches")
# Sections `train` never reads (paper B's pipelines): new keys or defaults there must not
# make finished sweep points look stale.
UNREAD_BY_TRAIN = ("seeding.", "dreaming.")


class SweepError(ConfigError):
  """A bad sweep file; one line (a ConfigError, so the CLI prints it without a traceback)."""


@dataclasses.dataclass(frozen=True)
class Point:
  index: int
  name: str
  run_dir: str
  overrides: list[str]  # sweep overrides + this point's values (run_dir excluded)
  label: Optional[str] = None  # baselines: the column they get in the results table


@dataclasses.dataclass(frozen=True)
class EvalEntry:
  name: str  # e.g. "steps=4"; "" when the sweep has no eval grid
  overrides: list[str]  # eval.overrides + this entry's values


@dataclasses.dataclass
class Sweep:
  path: str
  name: str
  base: str
  root: str
  points: list[Point]
  evals: list[EvalEntry]
  eval_batches: Optional[int]
  varied: list[str]  # dotted keys the points vary (grid, zip, points), first-seen order
  eval_varied: list[str]  # dotted keys the eval entries vary
  configs: list[Config]  # resolved train config of each point
  eval_configs: list[list[Config]]  # [point][eval entry]


# ---------------------------------------------------------------------------------------
# Loading and expansion


_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./+-]*")
_YAML_WORDS = ("true", "false", "yes", "no", "on", "off", "null", "nan", "inf")


def _fmt(v: Any) -> str:
  """A value as OmegaConf's dotlist (YAML) parses it back: words plain, all else as JSON."""
  if isinstance(v, str) and _PLAIN.fullmatch(v) and v.lower() not in _YAML_WORDS:
    return v
  return json.dumps(v)


def _safe(s: str) -> str:
  # Point names become directory names and command arguments: keep them shell- and path-safe.
  s = re.sub(r"[^A-Za-z0-9._=,+-]", "_", s).lstrip(".") or "_"
  return s if len(s) <= 100 else s[:87] + "-" + hashlib.blake2b(s.encode(), digest_size=6).hexdigest()


def _short_names(keys: list[str]) -> dict[str, str]:
  """Shortest dotted suffix of each key that no other key ends with (sleep.passes -> passes)."""
  out = {}
  for k in keys:
    parts = k.split(".")
    for n in range(1, len(parts) + 1):
      cand = ".".join(parts[-n:])
      if not any(o != k and (o == cand or o.endswith("." + cand)) for o in keys):
        break
    out[k] = cand
  return out


def _mapping(x: Any, where: str) -> dict:
  if x is None:
    return {}
  if not isinstance(x, dict):
    raise SweepError(f"{where} must be a mapping of key: value")
  return x


def _str_list(x: Any, where: str) -> list[str]:
  if x is None:
    return []
  if not isinstance(x, list) or not all(isinstance(o, str) and "=" in o for o in x):
    raise SweepError(f"{where} must be a list of key=value strings")
  if any(o.split("=", 1)[0].strip() == "run_dir" for o in x):
    raise SweepError(f"{where}: run_dir is set by the sweep (ROOT/<point name>)")
  return list(x)


def _combos(spec: dict, path: str, prefix: str = "") -> Optional[list[dict]]:
  """The points of `grid` x `zip` as ordered {key: value} dicts; None when neither is given."""
  grid = _mapping(spec.get("grid"), f"{path}: {prefix}grid")
  zipped = _mapping(spec.get("zip"), f"{path}: {prefix}zip")
  if not grid and not zipped:
    return None
  for section, table in (("zip", zipped), ("grid", grid)):
    for k, v in table.items():
      if not isinstance(v, list) or not v:
        raise SweepError(f"{path}: {prefix}{section}.{k} must be a non-empty list of values")
  both = [k for k in grid if k in zipped]
  if both:
    raise SweepError(f"{path}: {prefix}grid and {prefix}zip both vary '{both[0]}'")
  axes = []
  if zipped:
    if len({len(v) for v in zipped.values()}) > 1:
      raise SweepError(f"{path}: {prefix}zip lists differ in length: "
                       + ", ".join(f"{k} has {len(v)}" for k, v in zipped.items()))
    axes.append([dict(zip(zipped, values)) for values in zip(*zipped.values())])
  axes += [[{k: x} for x in v] for k, v in grid.items()]
  return [{k: v for d in combo for k, v in d.items()} for combo in itertools.product(*axes)]


def _resolve_base(base: Any, sweep_path: str) -> str:
  if not isinstance(base, str):
    raise SweepError(f"{sweep_path}: 'base' must be the path of a config file")
  beside = os.path.join(os.path.dirname(sweep_path), base)
  if os.path.exists(base) or not os.path.exists(beside):
    return base  # load_config reports a missing file itself
  return beside


def load_sweep(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
  """Parse, expand and validate a sweep file; `overrides` (e.g. from the CLI) apply last."""
  raw = _read(path)
  name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
  base = _resolve_base(raw["base"], path)
  root = str(raw.get("root") or os.path.join("runs", "sweeps", _safe(name)))
  common = _str_list(raw.get("overrides"), f"{path}: overrides") + _str_list(list(overrides), "command-line overrides")
  extra = raw.get("points") or []
  if not isinstance(extra, list) or not all(isinstance(p, dict) and p for p in extra):
    raise SweepError(f"{path}: points must be a list of mappings (key: value, optional label)")
  specs = _combos(raw, path)
  specs = (specs if specs is not None else [] if extra else [{}]) + [dict(p) for p in extra]
  varied = list(dict.fromkeys(k for s in specs for k in s if k != LABEL))
  short = _short_names(varied)
  points, seen = [], {}
  for i, s in enumerate(specs):
    label = s.pop(LABEL, None)
    if label is not None and not isinstance(label, (str, int, float)):
      raise SweepError(f"{path}: point {i}: label must be a string")
    shown = ",".join(f"{short[k]}={sweep_results.show(v)}" for k, v in s.items())
    pname = _safe(str(label) if label is not None else shown or "base")
    if pname in seen:
      raise SweepError(f"{path}: points {seen[pname]} and {i} are both named '{pname}' (give one a label)")
    seen[pname] = i
    points.append(Point(i, pname, os.path.join(root, pname), common + [f"{k}={_fmt(v)}" for k, v in s.items()],
                        None if label is None else str(label)))
  evals, batches, eval_varied = _evals(_mapping(raw.get("eval"), f"{path}: eval"), path)
  sweep = Sweep(path, name, base, root, points, evals, batches, varied, eval_varied, [], [])
  for p in points:  # every point and evaluation must be a valid config before anything runs
    where = f"{path}: point {p.index} ({p.name})"
    sweep.configs.append(_load(base, p.overrides + [f"run_dir={p.run_dir}"], where))
    sweep.eval_configs.append([_load(base, p.overrides + e.overrides + [f"run_dir={p.run_dir}"],
                                     f"{where}, eval {e.name or 'entry'}") for e in evals])
  return sweep


def _read(path: str) -> dict:
  raw = read_yaml_mapping(path, "sweep", SweepError)
  unknown = [k for k in raw if k not in SWEEP_KEYS]
  if unknown:
    raise SweepError(f"{path}: unknown sweep key '{unknown[0]}' (known: {', '.join(SWEEP_KEYS)})")
  if "base" not in raw:
    raise SweepError(f"{path}: missing 'base' (the config every point starts from)")
  return raw


def _evals(ev: dict, path: str) -> tuple[list[EvalEntry], Optional[int], list[str]]:
  """(eval entries, eval batches, the keys the entries vary) of the `eval` section."""
  bad = [k for k in ev if k not in EVAL_KEYS]
  if bad:
    raise SweepError(f"{path}: unknown eval key '{bad[0]}' (known: {', '.join(EVAL_KEYS)})")
  batches = ev.get("batches")
  if batches is not None and (not isinstance(batches, int) or batches < 1):
    raise SweepError(f"{path}: eval.batches must be a positive integer or null")
  common = _str_list(ev.get("overrides"), f"{path}: eval.overrides")
  specs = _combos(ev, path, "eval.") or [{}]
  varied = list(dict.fromkeys(k for s in specs for k in s))
  if LABEL in varied:
    raise SweepError(f"{path}: eval entries take no label")
  short = _short_names(varied)
  return [EvalEntry(",".join(f"{short[k]}={sweep_results.show(v)}" for k, v in s.items()),
                    common + [f"{k}={_fmt(v)}" for k, v in s.items()]) for s in specs], batches, varied


def _load(base: str, overrides: list[str], where: str) -> Config:
  try:
    return config_lib.load_config(base, overrides)
  except SweepError:
    raise
  except ConfigError as e:
    raise SweepError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------
# State of a point


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def fingerprint(sweep: Sweep, index: int) -> str:
  """Hash of what a point computes: its train and eval configs minus HOW_KEYS, eval batches."""
  what = lambda c: {k: v for k, v in _flat(config_lib.to_dict(c)).items()
                    if not k.startswith(HOW_KEYS + UNREAD_BY_TRAIN)}
  blob = json.dumps({"train": what(sweep.configs[index]), "eval": [what(c) for c in sweep.eval_configs[index]],
                     "batches": sweep.eval_batches}, sort_keys=True, default=str)
  return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def point_status(sweep: Sweep, index: int) -> str:
  """done (recorded with this config), partial (something is there), or pending."""
  p = sweep.points[index]
  rec = read_record(p.run_dir)
  if rec and rec.get("done") and rec.get("fingerprint") == fingerprint(sweep, index):
    return "done"
  if rec or os.path.exists(os.path.join(p.run_dir, "config.yaml")):
    return "partial"
  return "pending"


# ---------------------------------------------------------------------------------------
# Running


def check_data(sweep: Sweep, indices: list[int]) -> None:
  """Task and task-option names of these points, checked before any of them trains."""
  from sleep_jax import data as data_lib

  for i in indices:
    if not 0 <= i < len(sweep.points):
      raise SweepError(f"{sweep.path}: no point {i} (the sweep has {len(sweep.points)}: 0..{len(sweep.points) - 1})")
    for cfg in [sweep.configs[i], *sweep.eval_configs[i]]:
      if cfg.data.source == "task":
        try:
          data_lib.builders.task_options(cfg.data)
        except data_lib.DataError as e:
          raise SweepError(f"{sweep.path}: point {i} ({sweep.points[i].name}): {e}") from None


def run_point(sweep: Sweep, index: int) -> dict:
  """Train (or resume) point `index`, evaluate it, write its point.json; skip it if done."""
  import jax

  from sleep_jax import distributed, preflight, run_lock

  check_data(sweep, [index])
  p, cfg = sweep.points[index], sweep.configs[index]
  distributed.maybe_initialize(cfg.distributed)
  preflight.check_train(cfg)
  # The point's lock covers its training and its point.json (train takes it again, re-entrant).
  with run_lock.hold(p.run_dir, what=f"sweep {sweep.path} --point {index}", process=jax.process_index()):
    return _run_point(sweep, index)


def _run_point(sweep: Sweep, index: int) -> dict:
  import jax

  from sleep_jax import loop
  from sleep_jax.evaluate import evaluate_run_dir

  p, cfg = sweep.points[index], sweep.configs[index]
  status = point_status(sweep, index)
  if status == "done":
    log.info("point %d (%s): done, skipped", index, p.name)
    return read_record(p.run_dir)
  log.info("point %d (%s): %s", index, p.name, "resuming" if status == "partial" else "starting")
  t0 = time.perf_counter()
  result = loop.train(cfg)
  evals = []
  for entry, ecfg in zip(sweep.evals, sweep.eval_configs[index]):
    # The loop's own final eval already covers the whole split when nothing is overridden.
    if not entry.overrides and sweep.eval_batches is None and result["eval/examples"] >= cfg.data.eval_examples:
      r = {k: v for k, v in result.items() if k.startswith("eval/")}
    else:
      r = {k: v for k, v in evaluate_run_dir(ecfg, num_batches=sweep.eval_batches).items() if k.startswith("eval/")}
    evals.append((entry, ecfg, r))
  wall_s = time.perf_counter() - t0
  rows = [row for _, ecfg, r in evals for row in sweep_results.point_rows(
      point=p.name, label=p.label, cfg=cfg, ecfg=ecfg, result=r, batches=sweep.eval_batches, wall_s=wall_s,
      varied=sweep_results.varied_values(cfg, ecfg, sweep.varied, sweep.eval_varied))]
  record = {"done": True, "index": index, "name": p.name, "label": p.label, "overrides": p.overrides,
            "fingerprint": fingerprint(sweep, index), "step": result["step"], "resumed": status == "partial",
            "wall_s": wall_s, "evals": [{"name": e.name, "overrides": e.overrides, "result": r} for e, _, r in evals],
            "rows": rows}
  if jax.process_index() == 0:
    sweep_results.write_json(os.path.join(p.run_dir, sweep_results.RECORD), record)
  return record


def collect(sweep: Sweep) -> list[dict]:
  """Rows of every finished point -> ROOT/results.json, results.md, accuracy_vs_passes.png."""
  done = [p for p in sweep.points if point_status(sweep, p.index) == "done"]
  if len(done) < len(sweep.points):
    log.warning("%d of %d points not done (left out): %s", len(sweep.points) - len(done), len(sweep.points),
                ", ".join(p.name for p in sweep.points if p not in done))
  if not done:  # keep results an earlier collect wrote rather than replace them with nothing
    raise SweepError(f"sweep {sweep.name}: no finished point to collect (results under {sweep.root} left as they are)")
  rows = [row for p in done for row in read_record(p.run_dir)["rows"]]
  varied = sweep.varied + [k for k in sweep.eval_varied if k not in sweep.varied]
  varied += [f"eval:{k}" for k in sweep.eval_varied if k in sweep.varied]
  sweep_results.write(rows, varied, sweep.root, name=sweep.name)
  log.info("collected %d rows from %d points into %s", len(rows), len(done), sweep.root)
  return rows


def run_all(sweep: Sweep) -> list[dict]:
  """Every point in order in this process (done ones skipped), then `collect`."""
  import jax
  from tqdm import tqdm

  from sleep_jax.engine import NonFiniteLoss

  check_data(sweep, list(range(len(sweep.points))))
  diverged = []
  bar = tqdm(sweep.points, desc=f"sweep {sweep.name}", unit="point", position=0, dynamic_ncols=True)
  for p in bar:
    bar.set_postfix_str(p.name, refresh=True)
    try:
      run_point(sweep, p.index)
    except NonFiniteLoss as e:  # one diverged point should not cost the others
      log.error("point %d (%s): %s", p.index, p.name, e)
      diverged.append(e)
  bar.close()
  rows = collect(sweep) if jax.process_index() == 0 else []  # one writer of the results files
  if diverged:
    raise diverged[0]
  return rows


def train_command(sweep: Sweep, index: int) -> list[str]:
  p = sweep.points[index]
  return ["sleep-jax", "train", sweep.base, *p.overrides, f"run_dir={p.run_dir}"]


# ---------------------------------------------------------------------------------------
# CLI


def cmd_sweep(args) -> int:
  sweep = load_sweep(args.sweep, args.overrides)
  if args.list:
    for p in sweep.points:
      print(f"{p.index}\t{p.name}\t{p.run_dir}\t{point_status(sweep, p.index)}")
  elif args.dry_run:
    for p in sweep.points:
      print(json.dumps(train_command(sweep, p.index)))
  elif args.collect:
    print(f"{len(collect(sweep))} rows -> {os.path.join(sweep.root, sweep_results.MD)}")
  elif args.point is not None:
    record = run_point(sweep, args.point)
    print(f"point {args.point} ({record['name']}): done, {len(record['rows'])} rows in "
          f"{os.path.join(sweep.points[args.point].run_dir, sweep_results.RECORD)}")
  else:
    run_all(sweep)
    print(open(os.path.join(sweep.root, sweep_results.MD)).read())
  return 0


def register(subparsers) -> None:
  import argparse

  s = subparsers.add_parser(
      "sweep", help="run a grid/zip of configs (one run dir per point), resumable, and aggregate",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Run every point of SWEEP.yaml in order in this process (finished points are skipped, "
                  "interrupted ones resume), then write ROOT/results.json, results.md and "
                  "accuracy_vs_passes.png.\n\n" + __doc__.split("\n", 2)[2])
  s.add_argument("sweep", metavar="SWEEP.yaml")
  s.add_argument("overrides", nargs="*", help="key=value applied to every point after the sweep's own "
                 "(write them before the options: argparse takes no positionals after them)")
  mode = s.add_mutually_exclusive_group()
  mode.add_argument("--point", type=int, metavar="I", help="run only point I (one cluster job); no aggregation")
  mode.add_argument("--collect", action="store_true", help="only aggregate the finished points")
  mode.add_argument("--list", action="store_true",
                    help="print index, name, run_dir, status (done/partial/pending), tab-separated")
  mode.add_argument("--dry-run", action="store_true", help="print each point's `sleep-jax train` command, a JSON list")
  s.set_defaults(func=cmd_sweep)
