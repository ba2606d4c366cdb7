"""The launcher without training: COMMAND checks, sweep fan-out, the local backend's process
supervision (on a stand-in program), and the sbatch script run by bash against stub srun and
scontrol. The real runs are in test_launch_local.py and test_launch_slurm.py."""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from conftest import TINY
from sleep_jax import cli
from sleep_jax import sweep as sweep_lib
from sleep_jax.config import ConfigError, load_config, to_yaml
from sleep_jax.launch import common

# Stands in for `sleep-jax` in the supervision tests: behaves as FAKE_MODE says, per process
# (SLEEP_JAX_PROCESS_ID) and per attempt (counted in files under its last argument).
FAKE = textwrap.dedent("""
  import os, signal, sys, time
  pid, state = int(os.environ.get("SLEEP_JAX_PROCESS_ID", "0")), sys.argv[-1]
  path = os.path.join(state, f"attempts_{pid}")
  n = int(open(path).read()) + 1 if os.path.exists(path) else 1
  open(path, "w").write(str(n))
  print("devices flag:", os.environ["XLA_FLAGS"], "coordinator:", os.environ.get("SLEEP_JAX_COORDINATOR"), flush=True)
  mode = os.environ["FAKE_MODE"]
  if mode == "ok":
    sys.exit(0)
  if mode == "preempt_once":
    sys.exit(75 if pid == 1 and n == 1 else 0)
  if mode == "killed_once" and pid == 1 and n == 1:
    os.kill(os.getpid(), signal.SIGKILL)
  if mode == "crash":
    if pid == 1:
      time.sleep(0.5)
      print("boom: the loss went sideways", flush=True)
      sys.exit(3)
    time.sleep(120)
  if mode == "always_preempt":
    sys.exit(75)
""")


def launch(args, **kw):
  return subprocess.run([sys.executable, "-m", "sleep_jax.cli", "launch", *args], capture_output=True, text=True,
                        timeout=kw.pop("timeout", 120), **kw)


@pytest.fixture
def fake(tmp_path):
  path = tmp_path / "fake.py"
  path.write_text(FAKE)
  state = tmp_path / "state"
  state.mkdir()

  def run(mode, *opts, processes=2):
    t0 = time.monotonic()
    res = launch(["local", "-n", str(processes), "-d", "3", "--log-dir", str(tmp_path / "logs"), "--env",
                  f"FAKE_MODE={mode}", "--entrypoint", shlex.join([sys.executable, str(path)]), *opts,
                  "--", "eval", str(state)])
    attempts = [int((state / f"attempts_{i}").read_text()) for i in range(processes)]
    return res, attempts, time.monotonic() - t0

  return run


def test_local_processes_get_devices_coordinator_and_logs(fake, tmp_path):
  res, attempts, _ = fake("ok")
  assert res.returncode == 0, res.stderr
  assert attempts == [1, 1]
  logs = [(tmp_path / "logs" / f"process_{i}.log").read_text(errors="replace") for i in range(2)]
  for log in logs:
    assert "--xla_force_host_platform_device_count=3" in log
  coords = {log.split("coordinator: ")[1].split()[0] for log in logs}
  assert len(coords) == 1 and coords.pop().startswith("127.0.0.1:")


def test_local_one_process_dies_stops_all_with_clear_error(fake):
  res, attempts, took = fake("crash")
  assert res.returncode == 3
  assert took < 60, "the surviving process was not stopped"
  assert "process 1 of 2" in res.stderr and "exited with code 3" in res.stderr
  assert "stopped the other 1" in res.stderr and "boom: the loss went sideways" in res.stderr
  assert attempts == [1, 1]


@pytest.mark.parametrize("mode,why", [("preempt_once", "preempted (exit 75"), ("killed_once", "killed by SIGKILL")])
def test_local_retries_preempted_or_killed(fake, mode, why):
  res, attempts, _ = fake(mode, "--retries", "2")
  assert res.returncode == 0, res.stderr
  assert why in res.stderr and "relaunching eval (retry 1 of 2)" in res.stderr
  assert attempts == [2, 2]


def test_local_retries_run_out(fake):
  res, attempts, _ = fake("always_preempt", "--retries", "1")
  assert res.returncode == 75
  assert attempts == [2, 2] and "run the same launch again" in res.stderr


def test_local_dry_run_prints_each_process(tmp_path, data_dir):
  run_dir = tmp_path / "run"
  res = launch(["local", "-n", "2", "-d", "4", "--dry-run", "--", "train", TINY, f"run_dir={run_dir}",
                f"data.data_dir={data_dir}"])
  assert res.returncode == 0, res.stderr
  lines = [shlex.split(l, comments=True) for l in res.stdout.splitlines() if not l.startswith("#")]
  assert len(lines) == 2 and not run_dir.exists()
  for i, argv in enumerate(lines):
    env = dict(a.split("=", 1) for a in argv[1:7])
    assert argv[0] == "env" and env["SLEEP_JAX_PROCESS_ID"] == str(i) and env["SLEEP_JAX_NUM_PROCESSES"] == "2"
    assert env["XLA_FLAGS"].split()[-1] == "--xla_force_host_platform_device_count=4"
    assert argv[7:] == [sys.executable, "-m", "sleep_jax.cli", "train", TINY, f"run_dir={run_dir}",
                        f"data.data_dir={data_dir}"]


def test_launch_refuses_a_run_dir_with_another_config(tmp_path, capsys):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "config.yaml").write_text(to_yaml(load_config(TINY, [f"run_dir={run_dir}"])))
  for backend in (["local"], ["slurm"], ["tpu-vm", "--name=t", "--zone=z", "--reuse"], ["xpk", "--cluster=c", "--tpu-type=v4-8"]):
    rc = cli.main(["launch", *backend, "--dry-run", "--", "train", TINY, f"run_dir={run_dir}", "model.d_model=32"])
    out = capsys.readouterr()
    assert rc == 2 and "model.d_model: 64 -> 32" in out.err and out.out == "", backend
  # What only changes how it runs (steps, mesh) is a resume, not a different run.
  job = common.parse_command(["--", "train", TINY, f"run_dir={run_dir}", "train.steps=99", "mesh.data=4"])
  assert job.units[0].run_dir == str(run_dir)


def test_command_errors_are_one_line():
  with pytest.raises(ConfigError, match="no COMMAND"):
    common.parse_command(["--"])
  with pytest.raises(ConfigError, match="unknown config key 'nope'"):
    common.parse_command(["--", "train", TINY, "nope=1"])
  with pytest.raises(ConfigError, match="newline"):
    common.parse_command(["--", "train", TINY, "run_dir=a\nb"])


def write_sweep(tmp_path, data_dir, root=None, steps=3):
  from test_launch_local import overrides

  path = tmp_path / "sweep.yaml"
  path.write_text(yaml.safe_dump({"name": "two", "base": TINY, "root": str(root or tmp_path / "sweep"),
                                  "overrides": overrides(data_dir, steps), "grid": {"seed": [0, 1]},
                                  "eval": {"batches": 1}}))
  return str(path)


def test_sweep_fans_out_unfinished_points(tmp_path, data_dir):
  path = write_sweep(tmp_path, data_dir)
  sweep = sweep_lib.load_sweep(path)
  done = sweep.points[0]
  os.makedirs(done.run_dir)
  with open(os.path.join(done.run_dir, "point.json"), "w") as f:
    json.dump({"done": True, "fingerprint": sweep_lib.fingerprint(sweep, 0)}, f)
  job = common.parse_command(["--", "sweep", path])
  assert job.points == [1] and job.done_points == [0]
  assert [u.argv for u in job.units] == [["sweep", path, "--point", "1"]]
  assert job.collect.argv == ["sweep", path, "--collect"]
  res = launch(["slurm", "--dry-run", "--script-dir", str(tmp_path / "s"), "--", "sweep", path])
  assert res.returncode == 0, res.stderr
  assert "#SBATCH --array=1\n" in res.stdout and "--dependency=afterok:JOBID" in res.stdout
  assert f"sleep_jax.cli sweep {path} --point \"$SLURM_ARRAY_TASK_ID\" &" in res.stdout
  res = launch(["local", "-n", "2", "--dry-run", "--", "sweep", path])
  runs = [shlex.split(l, comments=True) for l in res.stdout.splitlines() if l.startswith("env ")]
  runs = [argv[argv.index(sys.executable):] for argv in runs]
  tail = [sys.executable, "-m", "sleep_jax.cli", "sweep", path]
  assert runs == [tail + ["--point", "1"]] * 2 + [tail + ["--collect"]]  # the collect: one process


# ---------------------------------------------------------------------------------------
# The sbatch script, run by bash with stub srun and scontrol that record their arguments


def sbatch_script(capsys, args, tmp_path):
  assert cli.main(["launch", "slurm", "--dry-run", "--script-dir", str(tmp_path / "scripts"), *args]) == 0
  printed = capsys.readouterr().out
  path = tmp_path / "job.sbatch"
  path.write_text(printed.split(":\n", 1)[1].split("\n# end of ", 1)[0] + "\n")
  return path, printed


def run_script(path, tmp_path, *, step_rc, env, term_after=0.0):
  stubs = tmp_path / "bin"
  stubs.mkdir(exist_ok=True)
  rec = tmp_path / "calls.jsonl"
  for name in ("srun", "scontrol"):
    (stubs / name).write_text(f"#!{sys.executable}\nimport json, os, sys, time\n"
                              f"open({str(rec)!r}, 'a').write(json.dumps([{name!r}] + sys.argv[1:] + "
                              f"[os.environ.get('NOTE')]) + '\\n')\n"
                              + (f"time.sleep({term_after * 3})\nsys.exit({step_rc})\n" if name == "srun" else ""))
    (stubs / name).chmod(0o755)
  env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", **env}
  p = subprocess.Popen(["bash", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if term_after:
    time.sleep(term_after)
    p.send_signal(signal.SIGTERM)  # preemption signals the batch shell too
  out = p.communicate(timeout=30)[0]
  # Each call: the command, its arguments, then the NOTE variable it saw.
  calls = [json.loads(l)[:-1] for l in rec.read_text().splitlines()] if rec.exists() else []
  notes = [json.loads(l)[-1] for l in rec.read_text().splitlines()] if rec.exists() else []
  rec.unlink(missing_ok=True)
  return p.returncode, out, calls, notes


def test_sbatch_script_requeues_its_own_array_element_on_preemption(capsys, tmp_path, data_dir):
  sweep = write_sweep(tmp_path, data_dir)
  path, printed = sbatch_script(capsys, ["--retries", "2", "--time", "00:30:00", "--partition", "debug", "--nodes", "2",
                                 "--ntasks-per-node", "4", "--", "sweep", sweep], tmp_path)
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --time=00:30:00", "#SBATCH --partition=debug",
               "#SBATCH --requeue", "#SBATCH --signal=TERM@120", "#SBATCH --array=0,1", "#SBATCH --open-mode=append"):
    assert line + "\n" in printed
  array = {"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1"}
  rc, out, calls, _ = run_script(path, tmp_path, step_rc=75, env=array, term_after=0.5)
  assert rc == 75, out
  assert calls[0] == ["srun", "--kill-on-bad-exit=1", sys.executable, "-m", "sleep_jax.cli", "sweep", sweep, "--point", "1"]
  # The element (7_1), not SLURM_JOB_ID (7): that one may be the whole array's id.
  assert calls[1] == ["scontrol", "requeue", "7_1"]
  rc, out, calls, _ = run_script(path, tmp_path, step_rc=75, env={**array, "SLURM_RESTART_COUNT": "2"})
  assert rc == 75 and [c[0] for c in calls] == ["srun"] and "giving up" in out
  rc, out, calls, _ = run_script(path, tmp_path, step_rc=3, env=array)
  assert rc == 3 and [c[0] for c in calls] == ["srun"]
