"""experiments/benchmarks/loss_memory.py at a tiny size: a table, then one JSON line whose
chunked loss needs less compiled memory than the plain one and equals it when executed."""

import json
import os
import subprocess
import sys

from conftest import REPO, subprocess_env

BENCH = os.path.join(REPO, "experiments", "benchmarks", "loss_memory.py")


def test_loss_memory_benchmark_runs_small():
  r = subprocess.run([sys.executable, BENCH, "--vocab", "8192", "--seq", "512", "--d-model", "32", "--chunk", "32",
                      "--check-vocab", "300", "--untied"],
                     capture_output=True, text=True, timeout=300, env=subprocess_env(devices=1))
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.strip().splitlines()
  assert lines[1].split()[:2] == ["loss", "temp"] and len(lines) >= 5
  out = json.loads(lines[-1])
  # plain holds [512, 8192] float32 logits (16 MiB) and their gradient; chunked [32, 8192] ones
  assert out["plain_temp_bytes"] > 2 * 512 * 8192 * 4
  assert out["memory_ratio_chunked_over_plain"] < 0.5 and out["temp_ratio_chunked_over_plain"] < 0.25
  assert out["check_max_rel_diff"] < 1e-5
