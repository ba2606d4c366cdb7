"""Sweeps: grid/zip expansion and naming, one-line errors, status and aggregation, and a
tiny two-point sweep that is killed mid-point, resumed and aggregated."""

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from sleep_jax import cli
from sleep_jax import sweep as sweep_lib
from sleep_jax.metrics import read_metrics
from sleep_jax.sweep import SweepError, load_sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "tiny.yaml")


def _write(tmp_path, spec, name="sweep.yaml"):
  path = tmp_path / name
  path.write_text(yaml.safe_dump(spec, sort_keys=False))
  return str(path)


def _spec(tmp_path, **kw):
  return {"base": TINY, "root": str(tmp_path / "root"), **kw}


def test_grid_and_zip_expand_in_order_with_safe_names(tmp_path):
  path = _write(tmp_path, _spec(
      tmp_path, overrides=["train.steps=3"],
      zip={"data.task_options.hops": [1, 4], "train.lr": [0.003, 0.001]},
      grid={"sleep.passes": [1, 2], "model.layer_pattern": [["attn", "gdn"], ["gdn"]]},
      points=[{"label": "hard eviction", "model.eviction": "hard"}, {"sleep.passes": 8}],
      eval={"overrides": ["data.eval_examples=32"], "grid": {"data.eval_task_options.hops": [1, 4]}}))
  sweep = load_sweep(path)
  names = [p.name for p in sweep.points]
  # zip is the outer axis, then the grid keys in file order, the last varying fastest.
  assert names[:4] == [f"hops=1,lr=0.003,passes={n},layer_pattern={lp}" for n in (1, 2) for lp in ("attn+gdn", "gdn")]
  assert names[4] == "hops=4,lr=0.001,passes=1,layer_pattern=attn+gdn"
  assert names[8:] == ["hard_eviction", "passes=8"]
  assert [p.index for p in sweep.points] == list(range(10))
  assert [p.label for p in sweep.points][8:] == ["hard eviction", None]
  p = sweep.points[3]
  assert p.overrides == ["train.steps=3", "data.task_options.hops=1", "train.lr=0.003", "sleep.passes=2",
                         'model.layer_pattern=["gdn"]']
  assert p.run_dir == os.path.join(str(tmp_path / "root"), p.name)
  cfg = sweep.configs[3]
  assert (cfg.train.steps, cfg.data.task_options["hops"], cfg.train.lr, cfg.sleep.passes, cfg.model.layer_pattern,
          cfg.run_dir) == (3, 1, 0.003, 2, ["gdn"], p.run_dir)
  assert sweep.configs[8].model.eviction == "hard" and sweep.configs[9].sleep.passes == 8
  assert all(re.fullmatch(r"[A-Za-z0-9._=,+-]+", n) for n in names)
  assert [p.name for p in load_sweep(path).points] == names  # deterministic
  # One trained point, several evaluations: each entry's config on top of the point's.
  assert [e.name for e in sweep.evals] == ["hops=1", "hops=4"]
  ecfg = sweep.eval_configs[3][1]
  assert (ecfg.data.eval_task_options, ecfg.data.eval_examples, ecfg.sleep.passes) == ({"hops": 4}, 32, 2)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "experiments", "sweeps", "*.yaml"))))
def test_example_sweeps_load(path, monkeypatch):
  monkeypatch.chdir(REPO)  # their paths are relative to the repository root
  sweep = load_sweep(path)
  assert sweep.points and len({p.run_dir for p in sweep.points}) == len(sweep.points)


def test_names_disambiguate_keys_with_the_same_last_part(tmp_path):
  sweep = load_sweep(_write(tmp_path, _spec(tmp_path, grid={"data.task_options.chunk_len": [12], "sleep.chunk_len": [12]})))
  assert [p.name for p in sweep.points] == ["task_options.chunk_len=12,sleep.chunk_len=12"]
  sweep = load_sweep(_write(tmp_path, _spec(tmp_path)))  # no grid: one point, the base config
  assert [(p.name, p.overrides) for p in sweep.points] == [("base", [])]


@pytest.mark.parametrize("change, expected", [
    ({"bogus": 1}, "unknown sweep key 'bogus'"),
    ({"grid": {"sleep.pases": [1, 2]}}, "unknown config key 'sleep.pases'"),
    ({"overrides": ["trian.steps=3"]}, "unknown config key 'trian'"),
    ({"overrides": ["run_dir=x"]}, "run_dir is set by the sweep"),
    ({"grid": {"sleep.passes": 2}}, "grid.sleep.passes must be a non-empty list"),
    ({"grid": {"sleep.passes": [0]}}, "'sleep.passes'"),
    ({"zip": {"train.lr": [0.1, 0.2], "train.steps": [3]}}, "zip lists differ in length"),
    ({"zip": {"sleep.passes": [1, 2]}}, "grid and zip both vary 'sleep.passes'"),
    ({"points": [{"label": "a", "sleep.passes": 1}, {"label": "a", "sleep.passes": 2}]}, "both named 'a'"),
    ({"eval": {"grid": {"data.eval_task_optons.steps": [1]}}}, "unknown config key 'data.eval_task_optons'"),
    ({"eval": {"every": 3}}, "unknown eval key 'every'"),
    ({"base": "no/such.yaml"}, "config file not found"),
])
def test_bad_sweeps_fail_with_one_line(tmp_path, change, expected):
  path = _write(tmp_path, {**_spec(tmp_path, grid={"sleep.passes": [1]}), **change})
  with pytest.raises(SweepError) as e:
    load_sweep(path)
  assert expected in str(e.value) and "\n" not in str(e.value)


def test_cli_errors_are_one_line_and_run_nothing(tmp_path, capsys):
  path = _write(tmp_path, _spec(tmp_path, grid={"sleep.passes": [1]}, overrides=["data.task_options.stepz=3"]))
  assert cli.main(["sweep", path, "--point", "0"]) == 2  # task options are checked before training
  err = capsys.readouterr().err.strip()
  assert "stepz" in err and len(err.splitlines()) == 1
  assert cli.main(["sweep", path, "--point", "5"]) == 2
  assert "no point 5" in capsys.readouterr().err
  assert not (tmp_path / "root").exists()


def _fake_done(sweep, i, rows):
  os.makedirs(sweep.points[i].run_dir, exist_ok=True)
  with open(os.path.join(sweep.points[i].run_dir, "point.json"), "w") as f:
    json.dump({"done": True, "fingerprint": sweep_lib.fingerprint(sweep, i), "rows": rows}, f)


def test_status_list_and_aggregation_with_baselines(tmp_path, capsys):
  path = _write(tmp_path, _spec(
      tmp_path, grid={"sleep.passes": [1, 2, 3]},
      points=[{"label": "full-attention", "model.kind": "transformer"},
              {"label": "hard-eviction", "model.eviction": "hard"}],
      eval={"grid": {"data.eval_task_options.hops": [1, 4]}}))
  sweep = load_sweep(path)
  acc = {1: 0.9, 2: 0.95, 3: 1.0, None: 0.99}
  for i, p in enumerate(sweep.points):
    if i == 2:  # N=3 not finished: a run dir with only its config
      os.makedirs(p.run_dir)
      open(os.path.join(p.run_dir, "config.yaml"), "w").close()
      continue
    passes = sweep.configs[i].sleep.passes
    # Depth 4 is 50 points harder for everything but full attention.
    score = lambda d: acc[passes if p.label is None else None] - 0.5 * (d == 4) * (p.label != "full-attention")
    _fake_done(sweep, i, [{"point": p.name, "label": p.label, "task": "rule110", "difficulty": d, "passes": passes,
                           "accuracy": score(d), "eval_examples": 512, "train_tokens": 100, "wall_s": 1.0,
                           "sleep.passes": passes, "data.eval_task_options.hops": d} for d in (1, 4)])
  assert cli.main(["sweep", path, "--list"]) == 0
  listed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
  assert [(l[0], l[1], l[3]) for l in listed] == [("0", "passes=1", "done"), ("1", "passes=2", "done"),
                                                  ("2", "passes=3", "partial"), ("3", "full-attention", "done"),
                                                  ("4", "hard-eviction", "done")]
  rows = sweep_lib.collect(sweep)
  assert len(rows) == 8 and json.load(open(tmp_path / "root" / "results.json")) == rows
  md = (tmp_path / "root" / "results.md").read_text().splitlines()
  assert "| task | difficulty | N=1 | N=2 | full-attention | hard-eviction | eval examples |" in md
  assert "| rule110 | 4 | 40.0 | 45.0 | 99.0 | 49.0 | 512 |" in md
  assert (tmp_path / "root" / "accuracy_vs_passes.png").stat().st_size > 1000
  # A changed sweep (here: another eval entry) makes a recorded point stale, not done.
  spec = yaml.safe_load(open(path))
  spec["eval"]["grid"]["data.eval_task_options.hops"].append(8)
  assert sweep_lib.point_status(load_sweep(_write(tmp_path, spec, "changed.yaml")), 0) == "partial"
  # ... while how it runs (data_dir, checkpoint cadence, mesh) does not.
  assert sweep_lib.point_status(load_sweep(path, ["checkpoint.every=7", "data.data_dir=elsewhere"]), 0) == "done"


def test_dry_run_prints_train_commands(tmp_path, capsys):
  path = _write(tmp_path, _spec(tmp_path, grid={"sleep.passes": [1, 2]}, overrides=["train.steps=6"]))
  assert cli.main(["sweep", path, "seed=3", "--dry-run"]) == 0
  cmds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  root = str(tmp_path / "root")
  assert cmds == [["sleep-jax", "train", TINY, "train.steps=6", "seed=3", f"sleep.passes={n}",
                   f"run_dir={root}/passes={n}"] for n in (1, 2)]


def _finished_steps(ckpt_dir):
  # orbax writes into a temporary directory and renames it to the bare step when complete.
  return [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()] if os.path.isdir(ckpt_dir) else []


@pytest.mark.slow
def test_sweep_is_killed_resumed_and_aggregated(tmp_path, caplog):
  steps = 8
  path = _write(tmp_path, _spec(
      tmp_path, name="tiny2", grid={"sleep.passes": [1, 2]},
      overrides=[f"train.steps={steps}", "checkpoint.every=2", "data.train_examples=256", "data.eval_examples=64",
                 f"data.data_dir={tmp_path / 'data'}"],
      eval={"grid": {"data.eval_task_options.hops": [1, 3]}}))
  sweep = load_sweep(path)
  p0, p1 = sweep.points
  sweep_lib.run_point(sweep, 0)
  assert sweep_lib.point_status(sweep, 0) == "done"
  stamps = {f: os.stat(os.path.join(p0.run_dir, f)).st_mtime_ns
            for f in ("point.json", "metrics.jsonl", "config.yaml", "eval.json")}

  # Point 1 as a cluster job would run it, SIGKILLed (no chance to clean up) once its
  # first checkpoint is complete.
  ckpts = os.path.join(p1.run_dir, "checkpoints")
  with open(tmp_path / "point1.log", "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "sleep_jax.cli", "sweep", path, "--point", "1"], cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not _finished_steps(ckpts):
      assert proc.poll() is None, (tmp_path / "point1.log").read_text()[-3000:]
      assert time.monotonic() < deadline, "no checkpoint from point 1"
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert sweep_lib.point_status(sweep, 1) == "partial"

  caplog.set_level(logging.INFO)
  rows = sweep_lib.run_all(load_sweep(path))
  assert "point 0 (passes=1): done, skipped" in caplog.text
  assert {f: os.stat(os.path.join(p0.run_dir, f)).st_mtime_ns for f in stamps} == stamps
  resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", caplog.text)]
  assert len(resumed) == 1 and 2 <= resumed[0] < steps, caplog.text[-3000:]
  assert [r["step"] for r in read_metrics(p1.run_dir) if "loss" in r] == list(range(1, steps + 1))
  record = sweep_lib.read_record(p1.run_dir)
  assert record["done"] and record["resumed"] and record["step"] == steps

  # Two points x two eval depths, with the columns results.json promises.
  assert sorted((r["passes"], r["difficulty"]) for r in rows) == [(1, 1), (1, 3), (2, 1), (2, 3)]
  for r in rows:
    assert r["task"] == "khop" and r["eval_examples"] == 64 and 0 <= r["accuracy"] <= 1 and r["wall_s"] > 0
    assert r["train_tokens"] == steps * 32 * (28 - 1) and r["sleep.passes"] == r["passes"]
  assert json.load(open(tmp_path / "root" / "results.json")) == rows
  md = (tmp_path / "root" / "results.md").read_text()
  assert "| task | difficulty | N=1 | N=2 | eval examples |" in md and "| khop | 3 |" in md
  assert (tmp_path / "root" / "accuracy_vs_passes.png").stat().st_size > 1000
