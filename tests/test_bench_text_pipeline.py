"""experiments/benchmarks/text_pipeline.py at tiny size: it runs offline, prints a table and
one JSON object last, and its packing efficiency is the cache's (checked independently)."""

import json
import os
import subprocess
import sys

from conftest import REPO, subprocess_env

BENCH = os.path.join(REPO, "experiments", "benchmarks", "text_pipeline.py")


def test_text_pipeline_benchmark_runs_tiny(tmp_path):
  r = subprocess.run([sys.executable, BENCH, "--subdir", "json", "--seq-len", "128", "--vocab", "300", "--steps", "3",
                      "--work", str(tmp_path)], capture_output=True, text=True, timeout=300,
                     env=subprocess_env(devices=1))
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.strip().splitlines()
  out = json.loads(lines[-1])
  assert any(l.startswith("packing efficiency") for l in lines[:-1])
  assert out["tokens_per_s"] > 0 and out["data_wait_ms"] >= 0 and out["vocab_size"] == 300
  # Concat-then-split pads only the last window: efficiency = tokens / (windows * seq_len).
  assert out["packing_efficiency"] == round(out["tokens"] / (out["windows"] * 128), 5)
  assert out["windows"] == -(-out["tokens"] // 128)
