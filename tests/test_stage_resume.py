"""A seeding stage killed with SIGKILL mid-stage resumes exactly through the shared engine.

The consolidation stage (`methods/sft`) of experiments/seed_tiny.yaml runs on engine.py, the
training loop's own engine: the rerun restores its newest checkpoint, re-logs the steps
after it, and its metrics equal an uninterrupted run's bit for bit."""

import json
import signal
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env
from test_resume import wait_for

pytestmark = pytest.mark.slow

SEED_TINY = f"{REPO}/experiments/seed_tiny.yaml"
STEPS, EVERY = 240, 20  # long enough that the kill lands mid-stage (several seconds of steps)


def cmd(run_dir):
  return [sys.executable, "-m", "sleep_jax.cli", "seed", SEED_TINY, f"run_dir={run_dir}", "train.steps=4",
          "seeding.fast_steps=4", f"seeding.steps={STEPS}", f"checkpoint.every={EVERY}", "seeding.samples=64",
          "seeding.methods=[sft]"]


def rows(run_dir):
  with open(run_dir / "methods" / "sft" / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def saved(run_dir):
  d = run_dir / "methods" / "sft" / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def result(run_dir):
  row = json.loads((run_dir / "methods" / "sft" / "eval.json").read_text())
  return {k: v for k, v in row.items() if k != "wall_s"}


def test_seeding_stage_killed_mid_stage_resumes_exactly(tmp_path):
  ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
  # The uninterrupted reference runs beside the run that gets killed (they share nothing).
  ref = subprocess.Popen(cmd(ref_dir), cwd=REPO, env=subprocess_env(2), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
  proc = subprocess.Popen(cmd(run_dir), cwd=REPO, env=subprocess_env(2), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  wait_for(lambda: EVERY in saved(run_dir), proc, timeout=600)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  _, err = ref.communicate(timeout=600)
  assert ref.returncode == 0, err[-3000:]
  expected = rows(ref_dir)
  assert [r["step"] for r in expected] == list(range(1, STEPS + 1))
  killed_at = max(saved(run_dir))
  assert killed_at < STEPS, "the stage finished before the kill: nothing was resumed"
  assert not (run_dir / "methods" / "sft" / "eval.json").exists()

  again = subprocess.run(cmd(run_dir), cwd=REPO, env=subprocess_env(2), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"consolidate: sft: resumed from step {killed_at}" in again.stderr
  assert rows(run_dir) == expected  # every step exactly once, every metric bit-identical
  assert result(run_dir) == result(ref_dir)
