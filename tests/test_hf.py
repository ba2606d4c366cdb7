"""Hugging Face interop against transformers itself: the committed fixtures
(tests/fixtures/hf, made by experiments/hf_fixtures/make_fixtures.py with transformers) hold
transformers' logits and greedy tokens; imports must reproduce them, exports must be the
checkpoint they came from, and bad checkpoints get one line.

The exported-files-load-in-transformers test runs where transformers is importable, or
where SLEEP_JAX_HF_PYTHON names an interpreter that has it (e.g. /work/venv-hf/bin/python).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sleep_jax import hf
from sleep_jax import sharding as shd
from sleep_jax.config import ConfigError, MeshConfig, load_config
from sleep_jax.generate import generate
from sleep_jax.hf.safetensors_io import CheckpointReader, write_checkpoint
from sleep_jax.models import logits

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ["llama3", "qwen2", "qwen3", "qwen3_5", "qwen3_next"]

pytestmark = pytest.mark.xdist_group("hf")  # one worker: the fixtures' compiles are shared in-process


def fixture(name):
  d = os.path.join(FIXTURES, name)
  return d, np.load(os.path.join(d, "reference.npz"))


@pytest.mark.parametrize("name", FAMILIES)
def test_import_reproduces_transformers(name):
  d, ref = fixture(name)
  cfg, model = hf.load(d)
  got = np.asarray(jax.jit(lambda t: logits(model, t, cfg))(jnp.asarray(ref["input_ids"])))
  np.testing.assert_allclose(got, ref["logits"], atol=1e-4, rtol=0)
  assert np.abs(ref["logits"]).max() > 0.5  # not vacuous
  prompt, want = ref["prompt_ids"], ref["greedy_ids"]
  out = np.asarray(generate(model, jnp.asarray(prompt), cfg, steps=want.shape[1] - prompt.shape[1]))
  np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("name", ["llama3", "qwen3", "qwen3_5", "qwen3_next"])
def test_export_is_the_checkpoint_it_came_from(name, tmp_path):
  """Export then re-import is exact, and every exported tensor is bit-identical to the
  original checkpoint's (so the files transformers reads are the ones it wrote)."""
  d, _ = fixture(name)
  cfg, model = hf.load(d)
  out = str(tmp_path / "out")
  hf.save(model, cfg, out, max_shard_bytes=200_000 if name == "qwen3" else 2**31)
  with CheckpointReader(d) as a, CheckpointReader(out) as b:
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
      np.testing.assert_array_equal(np.asarray(b.array(n)), np.asarray(a.array(n)), err_msg=n)
  if name == "qwen3":
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  _, again = hf.load(out)
  for x, y in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  exported = json.load(open(os.path.join(out, "config.json")))
  assert exported["architectures"] == json.load(open(os.path.join(d, "config.json")))["architectures"]


_HF_SCRIPT = r"""
import json, sys, numpy as np, torch, transformers
out, ref = sys.argv[1], np.load(sys.argv[2])
m = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
with torch.no_grad():
  lg = m(torch.tensor(ref["input_ids"], dtype=torch.long)).logits.float().numpy()
tok = transformers.AutoTokenizer.from_pretrained(out)
print(json.dumps({"max_diff": float(np.abs(lg - ref["logits"]).max()), "ids": tok(str(ref["prompt"]))["input_ids"]}))
"""


@pytest.mark.parametrize("name", ["llama3", "qwen3_5"])
def test_exported_files_load_in_transformers(name, tmp_path):
  """A model changed by us (one weight perturbed) exports to files transformers loads, and
  transformers' logits on them equal ours."""
  d, ref = fixture(name)
  hf_python = os.environ.get("SLEEP_JAX_HF_PYTHON")
  if not hf_python:
    pytest.importorskip("transformers")
    hf_python = sys.executable
  cfg, model = hf.load(d)
  st = nnx.state(model, nnx.Param)
  st["final_norm"]["scale"][...] = st["final_norm"]["scale"][...] * 1.5
  nnx.update(model, st)
  out = str(tmp_path / "out")
  hf.save(model, cfg, out)
  ours = np.asarray(logits(model, jnp.asarray(ref["input_ids"]), cfg))
  np.savez(tmp_path / "ours.npz", input_ids=ref["input_ids"], logits=ours, prompt=ref["prompt"])
  r = subprocess.run([hf_python, "-c", _HF_SCRIPT, out, str(tmp_path / "ours.npz")], capture_output=True, text=True,
                     timeout=600, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
  assert r.returncode == 0, r.stderr[-2000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got["max_diff"] < 1e-4
  assert got["ids"] == ref["prompt_ids"][0].tolist()
  assert np.abs(ours - ref["logits"]).max() > 1e-3  # the perturbation is really in the files


def test_import_onto_a_2x2x2_mesh_equals_one_device():
  d, ref = fixture("qwen3_5")
  mesh = shd.make_mesh(MeshConfig(2, 2, 2))
  cfg, model = hf.load(d, mesh=mesh)
  wq = nnx.state(model, nnx.Param)["groups"][0]["gdn"]["wv"][...]  # [R, D, Hv, dv]: fsdp x tensor
  assert wq.sharding.shard_shape(wq.shape) != wq.shape
  got = np.asarray(jax.jit(lambda t: logits(model, t, cfg))(jnp.asarray(ref["input_ids"])))
  _, single = hf.load(d)
  want = np.asarray(jax.jit(lambda t: logits(single, t, cfg))(jnp.asarray(ref["input_ids"])))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_bfloat16_import_is_close():
  d, ref = fixture("qwen3")
  cfg, model = hf.load(d, dtype="bfloat16")
  assert nnx.state(model, nnx.Param)["embed"][...].dtype == jnp.bfloat16
  got = np.asarray(logits(model, jnp.asarray(ref["input_ids"]), cfg))
  assert np.abs(got - ref["logits"]).max() < 0.1 * np.abs(ref["logits"]).max()


def _broken(tmp_path, name, edit):
  """A copy of fixture `name` with its tensors passed through edit(dict) -> dict."""
  d, _ = fixture(name)
  out = tmp_path / f"broken_{name}"
  shutil.copytree(d, out)
  for f in os.listdir(out):
    if f.endswith(".safetensors") or f.endswith(".index.json"):
      os.remove(out / f)
  with CheckpointReader(d) as r:
    tensors = edit({n: np.asarray(r.array(n)) for n in r.names()})
  write_checkpoint(out, tensors.items())
  return str(out)


def _cli_one_line(args, capsys):
  from sleep_jax.cli import main

  assert main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def test_bad_checkpoints_get_one_line(tmp_path, capsys):
  missing = _broken(tmp_path, "llama3", lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up_proj" not in k})
  assert "missing tensor model.layers.1.mlp.up_proj.weight" in _cli_one_line(["import-hf", missing, str(tmp_path / "a")],
                                                                             capsys)
  extra = _broken(tmp_path, "qwen2", lambda t: {**t, "model.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float32)})
  assert "unexpected tensor model.layers.0.mlp.extra.weight" in _cli_one_line(["import-hf", extra, str(tmp_path / "b")],
                                                                              capsys)
  shape = _broken(tmp_path, "qwen3", lambda t: {**t, "model.layers.0.self_attn.k_proj.weight":
                                                t["model.layers.0.self_attn.k_proj.weight"][:-1]})
  assert "model.layers.0.self_attn.k_proj.weight has shape" in _cli_one_line(["import-hf", shape, str(tmp_path / "c")],
                                                                            capsys)
  moe = fixture("qwen3_next_moe")[0]
  assert "mixture-of-experts" in _cli_one_line(["import-hf", moe, str(tmp_path / "d")], capsys)
  other = tmp_path / "gpt2"
  shutil.copytree(fixture("llama3")[0], other)
  cfg = json.load(open(other / "config.json"))
  json.dump({**cfg, "model_type": "gpt2"}, open(other / "config.json", "w"))
  assert "unsupported model_type 'gpt2'" in _cli_one_line(["import-hf", str(other), str(tmp_path / "e")], capsys)
  assert "neither a Hugging Face directory" in _cli_one_line(["generate", str(tmp_path / "a"), "--prompt", "x"],
                                                            capsys)
  with pytest.raises(ConfigError, match="model.init_from"):
    load_config("experiments/tiny.yaml", [f"model.init_from={tmp_path / 'nowhere'}"])


def test_init_from_takes_the_architecture_and_keeps_the_run_settings():
  d, _ = fixture("qwen3_5")
  cfg = load_config("experiments/tiny.yaml", [f"model.init_from={d}", "sleep.passes=2", "sleep.layers=[1,3]"])
  mc = cfg.model
  assert (mc.kind, mc.layer_pattern, mc.gdn_v_dim, mc.d_model, mc.hf_arch) == ("hybrid", ["gdn", "gdn", "gdn", "attn"],
                                                                                24, 64, "qwen3_5")
  assert mc.eviction == "hard" and cfg.sleep.layers == [1, 3]  # the run's own choices


def test_cli_import_generate_export(tmp_path, capsys):
  from sleep_jax.cli import main

  d, ref = fixture("qwen3")
  imported = str(tmp_path / "imported")
  assert main(["import-hf", d, imported]) == 0
  assert main(["generate", imported, "--prompt", str(ref["prompt"]), "--max-new-tokens", "6"]) == 0
  from_hf = capsys.readouterr().out.strip().splitlines()[-1]
  assert main(["generate", d, "--prompt", str(ref["prompt"]), "--max-new-tokens", "6"]) == 0
  assert capsys.readouterr().out.strip().splitlines()[-1] == from_hf
  out = str(tmp_path / "exported")
  assert main(["export-hf", imported, out]) == 0
  with CheckpointReader(d) as a, CheckpointReader(out) as b:
    for n in a.names():
      np.testing.assert_array_equal(np.asarray(b.array(n)), np.asarray(a.array(n)))
