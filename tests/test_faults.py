"""Faults that must lose nothing: damaged and mismatched restores, failed saves, two processes
on one run dir, failed starts, signals at any moment, bad inputs. Runs that train are real
`sleep-jax train` processes on 1 device sharing one compilation cache (a few seconds each
once the first has compiled)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, subprocess_env
from sleep_jax import cli, exit_codes, integrity, run_lock
from sleep_jax.checkpoint import CheckpointError, Checkpointer

pytestmark = pytest.mark.xdist_group("faults")  # the tests share one trained run dir


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  e = subprocess_env(devices=1)
  e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "faults_jax_cache")
  e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return e


def base(data_dir, run_dir, *extra):
  return [f"run_dir={run_dir}", f"data.data_dir={data_dir}", "data.train_examples=256", "data.eval_examples=64",
          "train.eval_batches=1", *extra]


def argv(data_dir, run_dir, *extra):
  return [sys.executable, "-m", "sleep_jax.cli", "train", TINY, *base(data_dir, run_dir, *extra)]


def run(env, args, timeout=300):
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def popen(env, args, err_path):
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(err_path, "w"), text=True)


def steps_of(run_dir):
  d = os.path.join(run_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def logged_steps(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if "loss" in r]


def wait_until(predicate, proc, timeout=240):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert proc.poll() is None, f"exited early with {proc.returncode}"
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.02)


def last_line(text):
  return [l for l in text.strip().splitlines() if l.strip()][-1]


def error_line(text):
  lines = [l for l in text.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, text[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, env):
  """A finished 4-step run with checkpoints at steps 2 and 4 (tests copy it)."""
  run_dir = str(tmp_path_factory.mktemp("faults") / "run")
  p = run(env, argv(data_dir, run_dir, "train.steps=4", "checkpoint.every=2"))
  assert p.returncode == 0, p.stderr[-3000:]
  assert steps_of(run_dir) == [2, 4]
  return run_dir


@pytest.fixture
def copy(trained, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(trained, dst)
  return dst


def flip_a_byte(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  path = max(files, key=os.path.getsize)  # the largest: array data
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 0x10]))


# -- restores ------------------------------------------------------------------------------


def test_restore_with_a_mismatched_override_moves_nothing(copy, capsys):
  code = cli.main(["eval", copy, "model.d_ff=64"])
  err = capsys.readouterr().err.strip()
  assert code == exit_codes.USAGE
  assert err.startswith("error: cannot restore the checkpoint at step 4") and "nothing was moved" in err
  assert "\n" not in err
  assert steps_of(copy) == [2, 4]
  assert not [n for n in os.listdir(copy) if n.startswith("corrupt_checkpoint")]


def test_every_saved_file_is_checksummed_and_a_flipped_byte_is_caught(copy, caplog):
  step4 = os.path.join(copy, "checkpoints", "4")
  listed = json.load(open(os.path.join(step4, integrity.MANIFEST)))["files"]
  on_disk = {os.path.relpath(os.path.join(r, f), step4) for r, _, fs in os.walk(step4) for f in fs}
  assert set(listed) == on_disk - {integrity.MANIFEST}
  assert integrity.verify(step4) is None
  flip_a_byte(step4)
  assert "fails its checksum" in integrity.verify(step4)
  # eval reads: it skips the damaged step and leaves it in place.
  from sleep_jax.config import load_config
  from sleep_jax.evaluate import evaluate_run_dir

  cfg = load_config(os.path.join(copy, "config.yaml"), [f"run_dir={copy}"])
  assert evaluate_run_dir(cfg, num_batches=1)["step"] == 2
  assert steps_of(copy) == [2, 4]
  # A training process sets it aside (twice for the same step: the second gets its own name).
  os.makedirs(os.path.join(copy, "corrupt_checkpoint_4"))
  from sleep_jax.train import Trainer

  ck = Checkpointer(copy, keep=3, async_save=False)
  step, _, data_state = ck.restore_latest(Trainer(cfg).abstract_state)
  ck.close()
  assert step == 2 and data_state["step"] == 2
  assert steps_of(copy) == [2]
  assert os.path.isdir(os.path.join(copy, "corrupt_checkpoint_4.1"))
  assert "checkpoint at step 4 is unreadable (damaged" in caplog.text


def test_a_restore_that_fails_for_another_reason_raises_and_keeps_every_step(copy):
  import jax

  ck = Checkpointer(copy, keep=3, async_save=False)
  wrong = {"step": jax.ShapeDtypeStruct((3,), "int32")}
  with pytest.raises(CheckpointError, match="nothing was moved"):
    ck.restore_latest(wrong)
  ck.close()
  assert steps_of(copy) == [2, 4]


# -- saves ---------------------------------------------------------------------------------


def _make_read_only(path):
  if os.geteuid() == 0:  # root writes through permission bits: use the immutable attribute
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", path]).returncode:
      pytest.skip("cannot make a directory read-only for root here (no chattr +i)")
    return lambda: subprocess.run(["chattr", "-i", path], check=True)
  os.chmod(path, 0o555)
  return lambda: os.chmod(path, 0o755)


def test_failed_save_stops_at_once_with_its_code_and_the_last_checkpoint_restores(copy, data_dir, env):
  undo = _make_read_only(os.path.join(copy, "checkpoints"))
  try:
    t0 = time.monotonic()
    p = run(env, argv(data_dir, copy, "train.steps=8", "checkpoint.every=2"), timeout=120)
    wall = time.monotonic() - t0
  finally:
    undo()
  assert p.returncode == exit_codes.SAVE_FAILED, p.stderr[-3000:]
  # "At once": no step after the failed save ran, and leaving orbax's threads did not hang
  # (start-up is ~5 s on an idle machine; the bound is loose for a loaded one).
  assert max(logged_steps(copy)) <= 6, logged_steps(copy)
  assert wall < 90, wall
  line = error_line(p.stderr)
  assert line.startswith("error: checkpoint save at step 6 failed") and "last good checkpoint (step 4)" in line
  assert steps_of(copy) == [2, 4]
  assert "Traceback" not in p.stderr
  p = run(env, argv(data_dir, copy, "train.steps=8", "checkpoint.every=2"))
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resumed from step 4" in p.stderr


def test_the_process_exits_even_when_a_thread_would_keep_it_alive(tmp_path):
  code = ("import sys, threading, time\n"
          "from sleep_jax import cli\n"
          "threading.Thread(target=time.sleep, args=(600,)).start()\n"  # a non-daemon thread that never ends
          "cli.EXIT_TIMEOUT_S = 1\n"
          f"sys.argv = ['sleep-jax', 'train', {str(tmp_path / 'nope.yaml')!r}]\n"
          "sys.exit(cli.main())\n")
  t0 = time.monotonic()
  p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert p.returncode == exit_codes.USAGE, p.stderr
  assert time.monotonic() - t0 < 30
  assert "background threads still running" in p.stderr


# -- one run per run dir -------------------------------------------------------------------


def test_a_second_train_on_a_busy_run_dir_is_refused_and_the_first_is_intact(copy, data_dir, env, tmp_path):
  args = argv(data_dir, copy, "train.steps=12", "checkpoint.every=4")
  first = popen(env, args, tmp_path / "first.err")
  try:
    wait_until(lambda: os.path.exists(run_lock.lock_path(copy)) and os.path.getsize(run_lock.lock_path(copy)), first)
    first.send_signal(signal.SIGSTOP)  # frozen while holding the lock: the overlap is certain
    try:
      second = run(env, args, timeout=120)
    finally:
      first.send_signal(signal.SIGCONT)
    assert second.returncode == exit_codes.USAGE, second.stderr[-3000:]
    line = last_line(second.stderr)
    assert line.startswith(f"error: run dir {copy} is in use by pid {first.pid} on "), line
    assert first.wait(timeout=300) == 0, (tmp_path / "first.err").read_text()[-3000:]
  finally:
    if first.poll() is None:
      first.kill()
  assert logged_steps(copy) == list(range(1, 13))  # every step once: nothing lost, nothing twice
  assert steps_of(copy)[-2:] == [8, 12] and json.load(open(os.path.join(copy, "eval.json")))["step"] == 12
  assert not os.path.exists(run_lock.lock_path(copy))  # released


def test_lock_is_reentrant_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path, caplog):
  rd = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom sleep_jax import run_lock\n"
                             f"with run_lock.hold({rd!r}):\n  print('held', flush=True)\n  time.sleep(60)\n"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(run_lock.RunDirBusy, match=f"in use by pid {holder.pid} "):
      with run_lock.hold(rd):
        pass
  finally:
    holder.kill()
    holder.wait()
  # SIGKILL left its lock file behind: the kernel dropped the lock, the file names a dead pid.
  assert json.load(open(run_lock.lock_path(rd)))["pid"] == holder.pid
  with run_lock.hold(rd):
    with run_lock.hold(rd):  # the same process again (sweep point -> train)
      assert json.load(open(run_lock.lock_path(rd)))["pid"] == os.getpid()
  assert f"taking over the stale lock of pid {holder.pid}" in caplog.text


# -- failed starts -------------------------------------------------------------------------


def test_a_failed_start_writes_nothing_and_the_corrected_command_runs(tmp_path, data_dir, env, capsys):
  rd = str(tmp_path / "run")
  assert cli.main(["train", TINY, *base(data_dir, rd, "train.steps=2", "train.batch_size=3")]) == exit_codes.USAGE
  assert "'train.batch_size'" in capsys.readouterr().err
  assert not os.path.exists(rd)  # nothing written: no config.yaml to refuse the corrected command
  # ... and a start killed outright (SIGKILL, a lost machine) leaves only a dead lock.
  os.makedirs(rd)
  with open(run_lock.lock_path(rd), "w") as f:
    json.dump({"pid": 2 ** 22 + 12345, "host": "gone", "since": 0, "command": "sleep-jax train"}, f)
  p = run(env, argv(data_dir, rd, "train.steps=2"))
  assert p.returncode == 0, p.stderr[-3000:]
  assert "taking over the stale lock" in p.stderr
  assert steps_of(rd) == [2]


# -- signals -------------------------------------------------------------------------------


def test_sigterm_during_start_up_exits_75(tmp_path, env):
  fresh = str(tmp_path / "datasets")  # empty: the dataset is being built when SIGTERM comes
  proc = popen(env, argv(fresh, str(tmp_path / "run"), "data.train_examples=20000"), tmp_path / "err")
  try:
    wait_until(lambda: os.path.isdir(fresh), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == exit_codes.PREEMPTED, (tmp_path / "err").read_text()[-3000:]
  finally:
    if proc.poll() is None:
      proc.kill()
  assert "Traceback" not in (tmp_path / "err").read_text()


def test_ctrl_c_saves_at_the_next_step_boundary_and_exits_cleanly(copy, data_dir, env, tmp_path):
  args = argv(data_dir, copy, "train.steps=100000", "checkpoint.every=100000")
  proc = popen(env, args, tmp_path / "one.err")
  try:
    wait_until(lambda: len(logged_steps(copy)) >= 8, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == exit_codes.INTERRUPTED
  finally:
    if proc.poll() is None:
      proc.kill()
  err = (tmp_path / "one.err").read_text()
  assert "Traceback" not in err, err[-3000:]
  saved = steps_of(copy)[-1]
  assert saved > 4 and f"saved step {saved}" in err
  assert logged_steps(copy)[-1] == saved  # the steps since the last save were kept


def test_a_second_ctrl_c_exits_at_once_while_a_loop_would_save(tmp_path):
  # Two signals sent back to back can merge into one, and a tiny step reaches its boundary
  # in milliseconds: the second Ctrl-C is shown on a loop that never reaches one.
  code = ("import os, signal, sys, time\n"
          "from sleep_jax import signals\n"
          "signals.install()\n"
          "signals.enter_saving()\n"  # a loop that saves at its next step boundary
          "os.kill(os.getpid(), signal.SIGINT)\n"
          "time.sleep(0.5)\n"
          "assert signals.pending() == (False, True)\n"
          "print('recorded', flush=True)\n"
          "os.kill(os.getpid(), signal.SIGINT)\n"
          "time.sleep(30)\n"
          "print('not reached', flush=True)\n")
  t0 = time.monotonic()
  p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert p.returncode == exit_codes.INTERRUPTED, p.stderr
  assert p.stdout.split() == ["recorded"] and time.monotonic() - t0 < 20
  assert "saving at the next step boundary" in p.stderr and "second interrupt: exiting at once" in p.stderr


# -- bad inputs: one line, exit 2, nothing written -----------------------------------------


@pytest.mark.parametrize("overrides, expected", [
    (["model.vocab_size=10"], "'model.vocab_size': 10 < the khop data's vocabulary"),
    (["train.batch_size=3"], "'train.batch_size': 3 is not divisible by the mesh's batch axes"),
    (["model.n_heads=0"], "'model.n_heads': 0 must be >= 1"),
    (["data.task_options.n_nodes=abc"], "data.task_options.n_nodes: 'abc' is not an integer"),
    (["data.task_options.n_nodes=2.5"], "data.task_options.n_nodes: 2.5 is not an integer"),
    (["data.task_options.n_nodes=1"], "data.task_options: khop needs 2 <= n_nodes"),
    (["train.lr=-1"], "'train.lr': -1.0 must be >= 0"),
    (["train.b2=1.5"], "'train.b2': 1.5 must be < 1"),
    (["data.train_examples=0"], "'data.train_examples': 0 must be >= 1"),
])
def test_bad_values_get_one_line_and_write_nothing(overrides, expected, tmp_path, data_dir, capsys):
  rd = tmp_path / "run"
  assert cli.main(["train", TINY, *base(data_dir, rd, *overrides)]) == exit_codes.USAGE
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and expected in err and "\n" not in err, err
  assert not rd.exists()


def test_bad_files_and_options_get_one_line(tmp_path, capsys):
  binary = tmp_path / "binary.yaml"
  binary.write_bytes(bytes(range(256)) * 4)
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "config.yaml").write_text(open(TINY).read())
  cases = [(["train", str(tmp_path)], "is a directory, not a YAML file"),
           (["train", str(binary)], "is not UTF-8 text"),
           (["eval", str(run_dir), "--batches", "0"], "bad value for --batches: 0")]
  for args, expected in cases:
    assert cli.main(args) == exit_codes.USAGE, args
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err, err


@pytest.mark.parametrize("args", [
    ["launch", "slurm", "--nodes", "1.5", "--dry-run", "--", "train", TINY],
    ["eval", "run", "--batches", "two"],
    ["train"],
])
def test_bad_options_get_one_line(args, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(args)
  assert e.value.code == exit_codes.USAGE
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: sleep-jax ") and "\n" not in err, err


# -- multi-process start-up ----------------------------------------------------------------


def test_distributed_start_up_has_time_outs_that_hold_under_load(monkeypatch):
  import jax

  from sleep_jax import distributed
  from sleep_jax.config import DistributedConfig

  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)
  monkeypatch.setattr(distributed, "_initialized", False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  monkeypatch.setenv("SLEEP_JAX_DISTRIBUTED_TIMEOUT", "900")
  distributed.maybe_initialize(DistributedConfig(coordinator="127.0.0.1:1", num_processes=2, process_id=0))
  assert calls and calls[0]["initialization_timeout"] == 900
  assert "--xla_cpu_collective_call_terminate_timeout_seconds=900" in os.environ["XLA_FLAGS"]
