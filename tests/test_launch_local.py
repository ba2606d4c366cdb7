"""The local backend on the real tiny run: 2 processes x 4 devices log the losses of 1 x 8, and a
killed process stops the job with a clear error; launching again resumes and ends on the same
losses."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY

STEPS = 24  # the Slurm test trains the same config: its compiled programs come from the cache


def compile_cache(tmp_path_factory) -> str:
  # Shared by every launch of the session (and the Slurm test): relaunches skip compiling.
  return str(tmp_path_factory.getbasetemp() / "launch_jax_cache")


def cache_env(cache) -> list[str]:
  return ["--env", f"JAX_COMPILATION_CACHE_DIR={cache}", "--env", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0"]


def overrides(data_dir, steps=STEPS) -> list[str]:
  return [f"data.data_dir={data_dir}", f"train.steps={steps}", "checkpoint.every=2", "data.train_examples=256",
          "data.eval_examples=64", "train.eval_batches=1"]


def launch_argv(cache, processes, devices, run_dir, data_dir, *opts):
  return [sys.executable, "-m", "sleep_jax.cli", "launch", "local", "-n", str(processes), "-d", str(devices),
          *cache_env(cache), *opts, "--", "train", TINY, f"run_dir={run_dir}", *overrides(data_dir)]


def losses(run_dir) -> dict[int, float]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  out = {r["step"]: r["loss"] for r in rows if "loss" in r}
  assert len(out) == len([r for r in rows if "loss" in r]), "a step was logged twice"
  return out


# One worker runs this file: its tests share the 1 x 8 reference run (module fixture).
pytestmark = pytest.mark.xdist_group("launch_local")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  run_dir = tmp_path_factory.mktemp("one_by_eight") / "run"
  res = subprocess.run(launch_argv(compile_cache(tmp_path_factory), 1, 8, run_dir, data_dir), capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  got = losses(run_dir)
  assert sorted(got) == list(range(1, STEPS + 1))
  return got


def checkpoint_steps(run_dir) -> list[int]:
  d = os.path.join(run_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.mark.slow
def test_two_processes_log_the_losses_of_one_by_eight_and_a_killed_one_stops_the_job(reference, tmp_path,
                                                                                   tmp_path_factory, data_dir):
  """2 processes x 4 devices, one killed with SIGKILL once a checkpoint exists: the launcher
  stops the other with a clear error; launching again resumes, and the steps from before the
  kill and after the relaunch are together the 1 x 8 reference's losses. (One test, not a
  clean 2 x 4 run beside it: the relaunch is that run's second half.)"""
  run_dir, err = tmp_path / "run", tmp_path / "launch.err"
  argv = launch_argv(compile_cache(tmp_path_factory), 2, 4, run_dir, data_dir)
  with open(err, "w") as f:
    launcher = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=f)
  try:
    deadline = time.monotonic() + 400
    while not checkpoint_steps(run_dir):
      assert launcher.poll() is None, err.read_text(errors="replace")[-3000:]
      assert time.monotonic() < deadline, "no checkpoint appeared"
      time.sleep(0.1)
    pid = int(re.search(r"process 1 of 2 pid (\d+)", err.read_text(errors="replace")).group(1))
    os.kill(pid, signal.SIGKILL)
    rc = launcher.wait(timeout=120)
  finally:
    if launcher.poll() is None:
      launcher.kill()
  text = err.read_text(errors="replace")
  assert rc == 128 + signal.SIGKILL, text[-3000:]
  assert f"process 1 of 2 (pid {pid}) was killed by SIGKILL; stopped the other 1" in text
  assert "run the same launch again" in text
  saved = checkpoint_steps(run_dir)
  assert saved and saved[-1] < STEPS, f"the run ended before the kill ({saved})"

  res = subprocess.run(argv, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  for i in range(2):
    assert f"jax.distributed: process {i} of 2" in (run_dir / "logs" / f"process_{i}.log").read_text(errors="replace")
  log = (run_dir / "logs" / "process_0.log").read_text(errors="replace")
  assert "attempt 1" in log and re.search(r"resumed from step (\d+)", log), log[-3000:]
  assert int(re.search(r"resumed from step (\d+)", log).group(1)) >= saved[0]
  got = losses(run_dir)
  assert sorted(got) == sorted(reference)
  for step, loss in reference.items():
    assert abs(got[step] - loss) < 1e-5, (step, got[step], loss)
