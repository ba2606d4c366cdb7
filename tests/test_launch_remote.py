"""tpu-vm and xpk: dry-run argument lists, xpk's own parser and --dry-run, gcloud's own parser,
and hostile values that must stay single inert words in every shell string we build."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import TINY
from sleep_jax import cli

HOSTILE = ["x; rm -rf /", "$(touch PWNED)", "`touch PWNED`", "a'b\"c", "--help", "*", "~", "a && touch PWNED", "$HOME", "a\tb"]


def dry_run(capsys, backend, command):
  assert cli.main(["launch", *backend, "--dry-run", "--", *command]) == 0
  return [shlex.split(l, comments=True) for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]


def train(tmp_path, *extra):
  return ["train", TINY, f"run_dir={tmp_path / 'run'}", *extra]


def test_tpu_vm_spot_dry_run(capsys, tmp_path):
  cmd = train(tmp_path, "train.steps=10")
  got = dry_run(capsys, ["tpu-vm", "--name=pod1", "--zone=us-central2-b", "--project=proj", "--tpu-type=v4-32", "--spot",
                         "--delete", "--workdir=sleep_jax", "--env=LIBTPU_INIT_ARGS=--xla_tpu_x=1"], cmd)
  where = ["--zone=us-central2-b", "--project=proj"]
  run = shlex.join(["cd", "sleep_jax"]) + " && " + shlex.join(["env", "LIBTPU_INIT_ARGS=--xla_tpu_x=1", "sleep-jax", *cmd])
  assert got == [
      ["gcloud", "compute", "tpus", "queued-resources", "create", "pod1", "--node-id=pod1", *where,
       "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"],
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "pod1", *where, "--format=value(state.state)"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", *where, "--worker=all", f"--command={run}"],
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod1", *where, "--force", "--quiet"]]


def test_tpu_vm_on_demand_sweep_dry_run(capsys, tmp_path):
  from test_launch import write_sweep

  sweep = write_sweep(tmp_path, str(tmp_path / "data"))
  got = dry_run(capsys, ["tpu-vm", "--name=v5", "--zone=us-west4-a", "--tpu-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"],
                ["sweep", sweep])
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v5", "--zone=us-west4-a"]
  assert got == [
      ["gcloud", "compute", "tpus", "tpu-vm", "create", "v5", "--zone=us-west4-a", "--accelerator-type=v5litepod-16",
       "--version=v2-alpha-tpuv5-lite"],
      [*ssh, "--worker=all", f"--command=sleep-jax sweep {sweep} --point 0"],
      [*ssh, "--worker=all", f"--command=sleep-jax sweep {sweep} --point 1"],
      [*ssh, "--worker=0", f"--command=sleep-jax sweep {sweep} --collect"]]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_xpk():
  """xpk lives in its own venv (its google-api-core pins protobuf < 6, which breaks
  tensorflow-datasets): $SLEEP_JAX_XPK, REPO/.venv-xpk, beside this python, or on PATH."""
  for cand in (os.environ.get("SLEEP_JAX_XPK"), os.path.join(REPO, ".venv-xpk", "bin", "xpk"),
               os.path.join(os.path.dirname(sys.executable), "xpk"), shutil.which("xpk")):
    if cand and os.path.exists(cand):
      return cand
  return None


XPK = find_xpk()
# In CI (.ci/run installs .venv-xpk) a missing xpk fails the tests instead of skipping them.
needs_xpk = pytest.mark.skipif(XPK is None and not os.environ.get("CI"), reason="xpk not installed; in its own venv: "
                               "`python3 -m venv .venv-xpk && .venv-xpk/bin/pip install xpk` (or set SLEEP_JAX_XPK)")
# Runs in xpk's own interpreter: its parser, given our arguments, as JSON.
PARSE = """import argparse, json, sys
from xpk.parser.core import set_parser
p = argparse.ArgumentParser(prog="xpk")
set_parser(parser=p)
ns = p.parse_args(sys.argv[1:])
print(json.dumps({k: v for k, v in vars(ns).items() if isinstance(v, (str, int, float, bool, list, type(None)))}))
"""


def xpk_args(tmp_path, *extra):
  return ["xpk", f"--xpk={XPK or 'xpk'}", "--cluster=c1", "--workload=sj-1", "--tpu-type=v5litepod-256", "--num-slices=4",
          "--project=proj", "--zone=us-west4-a", "--docker-image=gcr.io/proj/sleep-jax:1", "--retries=5", *extra]


def test_xpk_dry_run_matches_the_expected_arguments(capsys, tmp_path):
  cmd = train(tmp_path, "sleep.passes=4")
  (got,) = dry_run(capsys, xpk_args(tmp_path, "--priority=high"), cmd)
  assert got == [XPK or "xpk", "workload", "create", "--cluster=c1", "--workload=sj-1", "--tpu-type=v5litepod-256",
                 "--num-slices=4", "--docker-image=gcr.io/proj/sleep-jax:1", "--project=proj", "--zone=us-west4-a",
                 "--priority=high", "--max-restarts=5", "--restart-on-exit-codes=75",
                 f"--command={shlex.join(['sleep-jax', *cmd])}"]


@needs_xpk
def test_xpk_own_parser_reads_our_arguments_as_meant(capsys, tmp_path):
  cmd = train(tmp_path, "sleep.passes=4")
  (got,) = dry_run(capsys, xpk_args(tmp_path, "--priority=high"), cmd)
  python = open(XPK).readline()[2:].strip()  # the interpreter of xpk's venv, from its script
  res = subprocess.run([python, "-c", PARSE, *got[1:]], capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  ns = json.loads(res.stdout)
  assert (ns["cluster"], ns["workload"], ns["tpu_type"], ns["num_slices"], int(ns["max_restarts"])) == \
      ("c1", "sj-1", "v5litepod-256", 4, 5)
  assert ns["restart_on_exit_codes"] == "75" and ns["priority"] == "high" and ns["docker_image"] == "gcr.io/proj/sleep-jax:1"
  assert shlex.split(ns["command"]) == ["sleep-jax", *cmd]


@needs_xpk
def test_xpk_own_dry_run_builds_the_jobset(capsys, tmp_path):
  (got,) = dry_run(capsys, xpk_args(tmp_path), train(tmp_path))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "CLOUDSDK_"))}
  res = subprocess.run([*got, "--dry-run", "--skip-validation"], capture_output=True, text=True, timeout=120,
                       env={**env, "HOME": str(tmp_path)}, cwd=tmp_path)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
  out = res.stdout + res.stderr
  assert "kind: JobSet" in out and "name: sj-1" in out and "replicas: 4" in out and "maxRestarts: 5" in out
  assert shlex.join(["sleep-jax", *train(tmp_path)]) in out
  assert "75," in out.split("onExitCodes:")[1].split("]")[0]  # a preempted run restarts


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud not installed (its parser checks our arguments)")
def test_gcloud_accepts_the_tpu_vm_arguments(capsys, tmp_path):
  """gcloud parses every argument before it asks for credentials: with an empty config (no
  account, so nothing can be created) an argument error shows up as such."""
  cmds = dry_run(capsys, ["tpu-vm", "--name=pod1", "--zone=us-central2-b", "--project=proj", "--tpu-type=v4-32",
                          "--spot", "--delete"], train(tmp_path))
  cmds += dry_run(capsys, ["tpu-vm", "--name=pod1", "--zone=us-central2-b", "--tpu-type=v4-32", "--delete"], train(tmp_path))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "CLOUDSDK_"))}
  # The second set names no --project: it comes from gcloud's configuration, as usual.
  env.update(CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), CLOUDSDK_CORE_DISABLE_PROMPTS="1", CLOUDSDK_CORE_PROJECT="proj")
  for argv in cmds:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode != 0 and "active account" in res.stderr, (argv, res.stderr[-1500:])
    assert "unrecognized arguments" not in res.stderr and "argument --" not in res.stderr, (argv, res.stderr[-1500:])


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_stay_inert(capsys, tmp_path, monkeypatch, value):
  """Every shell string we build (ssh --command, xpk --command, the sbatch script) gives back
  exactly the argv and environment we meant when a shell runs it, and nothing else runs."""
  from test_launch import run_script, sbatch_script

  monkeypatch.chdir(tmp_path)
  recorder = tmp_path / "argv.py"
  recorder.write_text("import json, os, sys\nprint(json.dumps([os.environ['NOTE'], *sys.argv[1:]]))\n")
  entry, env = f"--entrypoint={shlex.join([sys.executable, str(recorder)])}", f"--env=NOTE={value}"
  cmd = ["eval", f"./{value}", f"data.text_path={value}"]  # eval: its values are checked where it runs
  lines = dry_run(capsys, ["tpu-vm", "--name=t", "--zone=z", "--reuse", entry, env], cmd)
  lines += dry_run(capsys, ["xpk", "--cluster=c", "--tpu-type=v4-8", "--workload=w", entry, env], cmd)
  shells = [a.split("=", 1)[1] for argv in lines for a in argv if a.startswith("--command=")]
  assert len(shells) == 2
  for text in shells:
    assert shlex.split(text) == ["env", f"NOTE={value}", sys.executable, str(recorder), *cmd]
    res = subprocess.run(["bash", "-c", text], capture_output=True, text=True)
    assert json.loads(res.stdout) == [value, *cmd], text
  path, _ = sbatch_script(capsys, [entry, env, "--", *cmd], tmp_path)
  rc, out, calls, notes = run_script(path, tmp_path, step_rc=0, env={})
  assert rc == 0, out
  assert calls == [["srun", "--kill-on-bad-exit=1", sys.executable, str(recorder), *cmd]] and notes == [value]
  assert not (tmp_path / "PWNED").exists()


def test_hostile_run_dir_in_a_train_command(capsys, tmp_path, monkeypatch):
  """The issue's example, through the config check and every backend's printed commands."""
  monkeypatch.chdir(tmp_path)
  cmd = ["train", TINY, "run_dir=x; rm -rf /"]
  for backend in (["local"], ["slurm"], ["tpu-vm", "--name=t", "--zone=z", "--reuse"],
                  ["xpk", "--cluster=c", "--tpu-type=v4-8", "--workload=w"]):
    argvs = dry_run(capsys, backend, cmd)
    words = [w for argv in argvs for w in argv]
    shells = [w.split("=", 1)[1] for w in words if w.startswith("--command=")]
    assert "run_dir=x; rm -rf /" in words + [w for s in shells for w in shlex.split(s)], backend
  assert os.listdir(tmp_path) == []  # a dry run writes nothing


def test_tpu_vm_runs_in_order_reruns_a_preempted_command_and_deletes(tmp_path):
  """Not a dry run: a stand-in gcloud records its calls; the first ssh exits 75 (preempted)."""
  calls, gcloud = tmp_path / "calls.jsonl", tmp_path / "gcloud"
  gcloud.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                    "if 'describe' in sys.argv: print('ACTIVE')\n"
                    f"if 'ssh' in sys.argv and not os.path.exists({str(tmp_path / 'once')!r}):\n"
                    f"  open({str(tmp_path / 'once')!r}, 'w').close(); sys.exit(75)\n")
  gcloud.chmod(0o755)
  res = subprocess.run([sys.executable, "-m", "sleep_jax.cli", "launch", "tpu-vm", "--name=p", "--zone=z", "--tpu-type=v4-8",
                        "--spot", "--delete", "--retries=1", f"--gcloud={gcloud}", "--", *train(tmp_path)],
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  verbs = [(c[2], c[3]) for c in map(json.loads, calls.read_text().splitlines())]
  assert verbs == [("queued-resources", "create"), ("queued-resources", "describe"), ("tpu-vm", "ssh"),
                   ("tpu-vm", "ssh"), ("queued-resources", "delete")]
  assert "preempted (exit 75); rerunning (1 of 1)" in res.stderr


def test_shell_entry_points_dry_run(tmp_path):
  env = {**os.environ, "DRY_RUN": "1", "SPOT": "1", "PROJECT": "proj", "PARTITION": "gpu", "GPUS_PER_NODE": "8",
         "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}  # this venv's sleep-jax
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = train(tmp_path)
  tpu = subprocess.run([os.path.join(repo, "launch", "tpu_pod.sh"), "pod1", "us-central2-b", "v4-32", *cmd], env=env,
                       capture_output=True, text=True, timeout=120)
  assert tpu.returncode == 0, tpu.stderr
  lines = [shlex.split(l, comments=True) for l in tpu.stdout.splitlines()]
  assert lines[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod1"] and "--spot" in lines[0]
  assert lines[2][-1] == f"--command={shlex.join(['sleep-jax', *cmd])}" and lines[-1][4] == "delete"
  slurm = subprocess.run([os.path.join(repo, "launch", "slurm.sh"), "2", "4", "04:00:00", *cmd], env=env,
                         capture_output=True, text=True, timeout=120)
  assert slurm.returncode == 0, slurm.stderr
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --time=04:00:00", "#SBATCH --partition=gpu",
               "#SBATCH --gpus-per-node=8"):
    assert line + "\n" in slurm.stdout
  assert shlex.split(slurm.stdout.splitlines()[-1])[:2] == ["sbatch", "--parsable"]
