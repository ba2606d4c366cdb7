"""experiments/benchmarks/hf_import.py's generator: a small Qwen3.5-shaped checkpoint that
transformers loads with no missing or unexpected keys (checked where SLEEP_JAX_HF_PYTHON names
an interpreter with transformers and torch)."""

import json
import os
import subprocess
import sys

import pytest

from sleep_jax.hf.safetensors_io import CheckpointReader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "experiments", "benchmarks", "hf_import.py")

_HF_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM
m, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True, dtype=torch.bfloat16)
print(json.dumps({"class": type(m).__name__, "params": sum(p.numel() for p in m.parameters()),
                  **{k: sorted(map(str, v)) for k, v in info.items()}}))
"""


def test_generator_writes_a_checkpoint_transformers_loads(tmp_path):
  out = tmp_path / "ckpt"
  r = subprocess.run([sys.executable, BENCH, "--params-scale", "0.01", "--generate-only", "--dir", str(out),
                      "--shard-mb", "4"], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  params = int(r.stdout.split(" params")[0].split()[-1].replace(",", ""))
  config = json.loads((out / "config.json").read_text())
  assert config["model_type"] == "qwen3_5_text" and config["architectures"] == ["Qwen3_5ForCausalLM"]
  assert config["layer_types"][:4] == ["linear_attention"] * 3 + ["full_attention"]
  with CheckpointReader(out) as ckpt:
    assert len(os.listdir(out)) > 5 and (out / "model.safetensors.index.json").exists()  # sharded
    assert sum(ckpt.array(n).size for n in ckpt.names()) == params
    assert {ckpt.dtype(n) for n in ckpt.names()} == {"BF16"}
    assert "lm_head.weight" not in ckpt  # tied, as save_pretrained leaves it
    assert ckpt.shape("model.layers.3.self_attn.q_proj.weight")[0] == 2 * config["num_attention_heads"] * 256
  again = subprocess.run([sys.executable, BENCH, "--params-scale", "0.01", "--generate-only", "--dir", str(out)],
                         capture_output=True, text=True, timeout=600)
  assert "cached" in again.stdout
  hf_python = os.environ.get("SLEEP_JAX_HF_PYTHON")
  if not hf_python:
    pytest.skip("set SLEEP_JAX_HF_PYTHON to an interpreter with transformers + torch to check the load")
  r = subprocess.run([hf_python, "-c", _HF_SCRIPT, str(out)], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got["class"] == "Qwen3_5ForCausalLM" and got["params"] == params
  assert got["missing_keys"] == got["unexpected_keys"] == got["mismatched_keys"] == []
