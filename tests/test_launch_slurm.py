"""A real one-node Slurm cluster (.ci/slurm_up.sh; Debian slurm-wlm + munge on loopback): a
sweep of two points launched as a job array completes and is collected, and the point that
Slurm signals mid-run (SIGTERM, as on preemption) checkpoints, requeues itself and resumes.

Without a cluster these tests skip, except in CI (CI=true), where they fail."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import TINY
from test_launch import write_sweep
from test_launch_local import STEPS, cache_env, checkpoint_steps, compile_cache, losses, overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_UP = os.path.join(REPO, ".ci", "slurm_up.sh")


def _not_ready() -> str | None:
  if shutil.which("sbatch") is None:
    return "sbatch not installed"
  ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
  if "is UP" not in ping.stdout:
    return f"slurmctld not answering ({(ping.stdout + ping.stderr).strip()[:200]})"
  state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
  if not set(state) & {"idle", "mixed", "allocated", "completing"}:
    return f"no usable node (sinfo: {state})"
  return None


@pytest.fixture(scope="session")
def slurm():
  why = _not_ready()
  if why and os.geteuid() == 0 and shutil.which("slurmctld") and shutil.which("munged"):
    subprocess.run(["bash", SLURM_UP], env={**os.environ, "SLEEP_JAX_SLURM_NO_INSTALL": "1"}, timeout=180)
    why = _not_ready()
  if why:
    msg = f"no Slurm cluster: {why}; start one with `bash .ci/slurm_up.sh` (as root)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
      pytest.fail(msg)
    pytest.skip(msg)


def wait_gone(ids, timeout):
  deadline = time.monotonic() + timeout
  while subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True,
                       text=True).stdout.strip():
    assert time.monotonic() < deadline, subprocess.run(["squeue"], capture_output=True, text=True).stdout
    time.sleep(1)


def launch_slurm(tmp_path, cache, devices, *args, **kw):
  argv = [sys.executable, "-m", "sleep_jax.cli", "launch", "slurm", "--time", "00:20:00", "--env", "JAX_PLATFORMS=cpu",
          "--env", f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}", *cache_env(cache), *args]
  return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, **kw)


@pytest.mark.slow
def test_sweep_array_requeues_a_preempted_point_and_a_two_task_job_matches(slurm, tmp_path, tmp_path_factory, data_dir):
  """Side by side: (1) a 2-point sweep as a job array (one task x 8 devices per point); point 1
  gets SIGTERM mid-run, checkpoints, requeues itself and resumes; a collect job follows.
  (2) `train` as one job of 2 tasks x 4 devices (jax.distributed from Slurm's environment,
  `--wait`): it logs the losses of sweep point 0, which trains the same config."""
  from sleep_jax.launch.slurm import job_states

  # A root with a space and a quote: the paths travel through #SBATCH lines and the script.
  root, cache = tmp_path / "sweep root's", compile_cache(tmp_path_factory)
  sweep = write_sweep(tmp_path, data_dir, root=root, steps=STEPS)
  two = launch_slurm(tmp_path, cache, 4, "--ntasks-per-node", "2", "--wait", "--job-name", "two-tasks", "--",
                     "train", TINY, f"run_dir={tmp_path / 'two'}", *overrides(data_dir, STEPS))
  res = launch_slurm(tmp_path, cache, 8, "--retries", "2", "--", "sweep", sweep)
  out, err = res.communicate(timeout=120)
  assert res.returncode == 0, err
  array, collect = out.split()
  try:
    # Preempt point 1 once it has a checkpoint (its SIGTERM handler is in place by then).
    deadline = time.monotonic() + 300
    while not checkpoint_steps(root / "seed=1"):
      assert time.monotonic() < deadline, "point 1 wrote no checkpoint"
      time.sleep(0.1)
    subprocess.run(["scancel", "--signal=TERM", f"{array}_1"], check=True)
    wait_gone([array, collect], timeout=400)
    two_out, two_err = two.communicate(timeout=400)
  finally:
    subprocess.run(["scancel", array, collect], capture_output=True)
    if two.poll() is None:
      two.kill()
  states = {**job_states(array), **job_states(collect)}
  logs = {i: (root / "slurm" / f"sleep-jax-{array}_{i}.out").read_text(errors="replace") for i in (0, 1)}
  assert states[f"{array}_0"]["JobState"] == "COMPLETED" and states[f"{array}_0"]["Restarts"] == "0", logs[0][-3000:]
  assert states[f"{array}_1"]["JobState"] == "COMPLETED" and states[f"{array}_1"]["Restarts"] == "1", logs[1][-3000:]
  assert states[collect]["JobState"] == "COMPLETED"
  assert f"requeueing {array}_1 (1 of 2)" in logs[1] and "start 2," in logs[1]
  resumed = re.search(r"resumed from step (\d+)", logs[1])
  assert resumed and 0 < int(resumed.group(1)) < STEPS, logs[1][-3000:]
  for i in (0, 1):
    point = json.loads((root / f"seed={i}" / "point.json").read_text())
    assert point["done"] and point["step"] == STEPS
    assert sorted(losses(root / f"seed={i}")) == list(range(1, STEPS + 1))  # nothing re-logged twice
  assert (root / "results.md").exists()  # the collect job ran after the array

  two_log = (tmp_path / "two" / "slurm" / f"two-tasks-{two_out.split()[0]}.out").read_text(errors="replace")
  assert two.returncode == 0, two_err + two_log[-3000:]
  assert "jax.distributed: process 0 of 2" in two_log and "jax.distributed: process 1 of 2" in two_log
  want, got = losses(root / "seed=0"), losses(tmp_path / "two")
  assert sorted(got) == sorted(want)
  for step, loss in want.items():
    assert abs(got[step] - loss) < 1e-5, (step, got[step], loss)
