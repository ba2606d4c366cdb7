"""Tests run on the CPU with 8 fake devices; the flag must be set before JAX is imported."""

import atexit
import os
import shutil
import tempfile

# Fake devices are threads of one process: on a loaded 2-core machine one of them can reach a
# collective long after the others, past XLA's default 40 s "stuck" limit (which aborts).
SLOW_COLLECTIVES = "--xla_cpu_collective_call_terminate_timeout_seconds=900"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
                           + SLOW_COLLECTIVES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set too late?)"

# Tests compile the same programs again and again: in-process (every Trainer, every test of a
# model builds its own jitted closures, and jit's own cache is per function object) and in the
# `sleep-jax` processes the end-to-end tests start (a run and its resume, a reference and a
# killed copy). One persistent compilation cache per test worker, shared by both, lets the
# later ones load the executable instead of compiling it again (an executable loaded from the
# cache is the one compiled, so results stay bit-identical).
JAX_CACHE = tempfile.mkdtemp(prefix=f"sleep_jax_tests_jax_cache_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_")
atexit.register(shutil.rmtree, JAX_CACHE, ignore_errors=True)
CACHE_MIN_COMPILE_S = 0.5
jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)


import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "tiny.yaml")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One dataset cache for the whole session (TFDS builds are shared by the tests)."""
  return str(tmp_path_factory.mktemp("datasets"))


@pytest.fixture
def tiny_overrides(data_dir, tmp_path):
  """Overrides that make experiments/tiny.yaml fast and self-contained for a test."""
  return [f"run_dir={tmp_path / 'run'}", f"data.data_dir={data_dir}", "data.train_examples=512",
          "data.eval_examples=64", "train.eval_batches=2"]


def subprocess_env(devices: int = 8) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {SLOW_COLLECTIVES}"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(CACHE_MIN_COMPILE_S)
  return env
