"""Exact resume after SIGKILL, corrupt-checkpoint fallback, SIGTERM preemption, NaN stop,
restore onto a different mesh. Each run is a real `sleep-jax train` process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, subprocess_env
from sleep_jax.checkpoint import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE

# One worker: the module-scoped reference run is then trained once, not once per xdist worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("resume")]


def cmd(overrides):
  return [sys.executable, "-m", "sleep_jax.cli", "train", TINY, *overrides]


def run(overrides, check=True):
  p = subprocess.run(cmd(overrides), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
  if check and p.returncode != 0:
    raise AssertionError(f"exit {p.returncode}\n{p.stderr[-3000:]}")
  return p


def train_losses(run_dir):
  rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def saved_steps(run_dir):
  d = os.path.join(run_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def wait_for(predicate, proc, timeout=300):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"process exited early with {proc.returncode}: {proc.stderr.read()[-2000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """An uninterrupted 24-step run; the others must log exactly its losses."""
  run_dir = str(tmp_path_factory.mktemp("ref") / "run")
  base = [f"data.data_dir={data_dir}", "data.train_examples=512", "data.eval_examples=64",
          "train.eval_batches=2", "train.steps=24", "checkpoint.every=6"]
  run(base + [f"run_dir={run_dir}"])
  return base, train_losses(run_dir)


def test_sigkill_then_resume_logs_identical_losses(reference, tmp_path):
  base, ref = reference
  run_dir = str(tmp_path / "run")
  proc = subprocess.Popen(cmd(base + [f"run_dir={run_dir}"]), cwd=REPO, env=subprocess_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: 12 in saved_steps(run_dir), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert max(saved_steps(run_dir)) < 24
  p = run(base + [f"run_dir={run_dir}"])
  assert "resumed from step" in p.stderr
  assert train_losses(run_dir) == ref  # bit-identical, every step exactly once


def test_corrupt_latest_checkpoint_falls_back(reference, tmp_path):
  base, ref = reference
  run_dir = str(tmp_path / "run")
  run(base + [f"run_dir={run_dir}", "train.steps=12"])
  assert saved_steps(run_dir) == [6, 12]
  # Corrupt every data file of step 12's train state.
  for root, _, files in os.walk(os.path.join(run_dir, "checkpoints", "12", "state")):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "r+b") as fh:
        fh.truncate(max(os.path.getsize(path) // 3, 1))
  p = run(base + [f"run_dir={run_dir}"])
  assert "checkpoint at step 12 is unreadable" in p.stderr
  assert "resumed from step 6" in p.stderr
  assert train_losses(run_dir) == ref
  assert os.path.isdir(os.path.join(run_dir, "corrupt_checkpoint_12"))  # kept aside, not deleted


def test_sigterm_saves_and_exits_with_preemption_code(reference, tmp_path):
  base, ref = reference
  run_dir = str(tmp_path / "run")
  proc = subprocess.Popen(cmd(base + [f"run_dir={run_dir}", "checkpoint.every=1000"]), cwd=REPO,
                          env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(run_dir, "metrics.jsonl")
  wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE
  steps = saved_steps(run_dir)
  assert len(steps) == 1 and 3 <= steps[0] < 24
  run(base + [f"run_dir={run_dir}", "checkpoint.every=1000"])
  assert train_losses(run_dir) == ref


def test_restore_onto_a_different_mesh(reference, tmp_path):
  base, ref = reference
  run_dir = str(tmp_path / "run")
  proc = subprocess.Popen(cmd(base + [f"run_dir={run_dir}", "mesh.data=8"]), cwd=REPO, env=subprocess_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: 12 in saved_steps(run_dir), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed_from = max(saved_steps(run_dir))
  p = run(base + [f"run_dir={run_dir}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
  assert f"resumed from step {resumed_from}" in p.stderr
  got = train_losses(run_dir)
  assert sorted(got) == sorted(ref)
  # Restored exactly; the next steps agree up to the reduction order of the new layout (later
  # steps drift further apart as training amplifies 1e-7 differences).
  for s in range(resumed_from + 1, min(resumed_from + 4, 25)):
    assert abs(got[s] - ref[s]) < 1e-4, (s, got[s], ref[s])


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
  run_dir = str(tmp_path / "run")
  p = run([f"run_dir={run_dir}", f"data.data_dir={data_dir}", "data.train_examples=512",
           "data.eval_examples=64", "train.steps=50", "checkpoint.every=1", "train.lr=1e30",
           "train.warmup_steps=0", "train.clip_norm=1e30"], check=False)
  assert p.returncode == NONFINITE_EXIT_CODE, p.stderr[-2000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("error: non-finite loss") and "last good checkpoint" in last
  bad_step = int(last.split(" at step ")[1].split(";")[0])
  steps = saved_steps(run_dir)
  assert steps and max(steps) == bad_step - 1


def test_resume_with_a_different_config_is_refused(reference, tmp_path):
  base, _ = reference
  run_dir = str(tmp_path / "run")
  run(base + [f"run_dir={run_dir}", "train.steps=2"])
  p = run(base + [f"run_dir={run_dir}", "train.lr=0.5"], check=False)
  assert p.returncode == 2
  assert "train.lr" in p.stderr.strip().splitlines()[-1]
