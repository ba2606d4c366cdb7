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


# The end-to-end tests start many `sleep-jax` processes that compile the same programs (a run
# and its resume, a reference and a killed copy): one persistent compilation cache per test
# worker lets the later ones load them instead of compiling again (an executable loaded from
# the cache is the one compiled, so bit-identical resumes stay bit-identical).
JAX_CACHE = tempfile.mkdtemp(prefix=f"sleep_jax_tests_jax_cache_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_")
atexit.register(shutil.rmtree, JAX_CACHE, ignore_errors=True)


def subprocess_env(devices: int = 8) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {SLOW_COLLECTIVES}"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  return env
