"""Unmerged low-rank adapters (models/adapters.py, dreaming/lora.py) and their PEFT export
(hf/peft.py). The oracle is always the merged weight W + (alpha / r) A B run through the
plain model (or written by the full-model exporter), never the unmerged code itself. (The
batched isolated copies against each copy alone and the merged oracle: test_dreaming.py.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from sleep_jax import hf
from sleep_jax.config import load_config
from sleep_jax.dreaming import lora as lora_lib
from sleep_jax.generate import sample_tokens
from sleep_jax.hf import peft
from sleep_jax.models import forward, model_factory, roles
from sleep_jax.models.adapters import ADAPTABLE
from sleep_jax.seeding import expand

ALPHA = 8.0
HYBRID = ["model.pattern_repeats=2", "model.attn_out_gate=true", "model.qk_norm=true", "model.norm_offset=1.0",
          "model.gdn_q_scale=true", "model.gdn_v_heads=8"]  # Qwen3.5's options; GDN v heads != k heads


def _model(path, overrides=()):
  cfg = load_config(path, list(overrides))
  model = model_factory(cfg)(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  return cfg, graphdef, nnx.to_pure_dict(state)


def _adapter(params, cfg, rank=4, targets=ADAPTABLE, seed=1):
  """An adapter with B != 0 (a fresh one is the identity), over `targets`."""
  ad = lora_lib.init(params, roles.roles_for(cfg), jax.random.key(seed), rank, targets=targets)
  leaves, treedef = jax.tree.flatten(ad)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("path,overrides", [("experiments/dream_tiny.yaml", []), ("experiments/tiny.yaml", HYBRID)],
                         ids=["cms", "hybrid"])
def test_unmerged_adapters_equal_merged_weights(path, overrides):
  """Every adaptable projection, unmerged in the decoder, computes what the merged weight
  computes: the CMS model (an active expert, its factors adapted too) through its plain
  forward, the GDN + attention hybrid through the sleep forward (chunks, 2 passes, scanned
  repeats) and through token-by-token decoding (which sleeps at each chunk's end)."""
  cfg, graphdef, params = _model(path, overrides)
  R = roles.roles_for(cfg)
  if roles.cms_levels(R):
    params = expand.set_expert(params, R, 1, 2, active=True)
    params["groups"][0]["levels"][1]["experts"][2]["b"] = 0.1 * jnp.ones_like(
        params["groups"][0]["levels"][1]["experts"][2]["b"])
  ad = _adapter(params, cfg)
  adapted = {jax.tree_util.keystr(p[:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(ad)[0]}
  assert len(adapted) >= (20 if roles.cms_levels(R) else 15)
  tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, cfg.model.vocab_size)
  mask = jnp.ones_like(tokens)

  @jax.jit
  def fwd(p, a):
    return forward(nnx.merge(graphdef, p), tokens, mask, cfg, adapters=a)[0]

  unmerged = fwd(params, lora_lib.for_model(ad, alpha=ALPHA))
  merged = fwd(lora_lib.apply(params, ad, alpha=ALPHA), None)
  assert float(jnp.abs(merged - fwd(params, None)).max()) > 1e-2  # the adapter does something
  np.testing.assert_allclose(np.asarray(unmerged), np.asarray(merged), atol=1e-5)
  if not roles.cms_levels(R):
    sample = jax.jit(functools.partial(sample_tokens, graphdef, cfg=cfg, steps=14, return_logits=True))
    _, lu = sample(params, tokens[:, :12], jax.random.key(0), adapters=lora_lib.for_model(ad, alpha=ALPHA))
    _, lm = sample(lora_lib.apply(params, ad, alpha=ALPHA), tokens[:, :12], jax.random.key(0))
    np.testing.assert_allclose(np.asarray(lu), np.asarray(lm), atol=1e-5)


@pytest.mark.parametrize("overrides,targets,family", [
    (["model.kind=transformer", "model.n_kv_heads=2", "model.eviction=none"],
     ("q", "k", "v", "o", "gate", "up", "down"), "llama"),
    (HYBRID, ADAPTABLE, "qwen3_5")], ids=["llama", "qwen3_5"])
def test_peft_export_is_the_merged_weights_difference(tmp_path, overrides, targets, family):
  """Read back, lora_B @ lora_A * alpha / r of every module is exactly what merging the
  adapter changes in the full-model export (sleep_jax.hf.save), and nothing else changes:
  names, transposes and fused tensors (Qwen3.5's query | gate q_proj, its GDN in_proj_qkv)
  all follow from the export of the weights themselves."""
  cfg, _, params = _model("experiments/tiny.yaml", overrides)
  ad = _adapter(params, cfg, rank=4, targets=targets)
  config = peft.save_adapter(ad, cfg, str(tmp_path / "adapter"), alpha=ALPHA, base_model_name_or_path="base/")
  hf.save(params, cfg, str(tmp_path / "base"))
  hf.save(lora_lib.apply(params, ad, alpha=ALPHA), cfg, str(tmp_path / "merged"))
  base, merged = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("base", "merged"))
  lora = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
  assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
  assert config["lora_alpha"] == ALPHA and config["base_model_name_or_path"] == "base/"
  modules = {k[len("base_model.model."):-len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")}
  assert {k for k in lora if k.endswith(".lora_B.weight")} == {f"base_model.model.{m}.lora_B.weight" for m in modules}
  changed = {n[:-len(".weight")] for n in base if not np.array_equal(base[n], merged[n])}
  assert modules == changed
  assert "model.layers.0.self_attn.q_proj" in modules and "model.layers.1.mlp.down_proj" in modules
  assert set(config["target_modules"]) == {m.rsplit(".", 1)[-1] for m in modules}
  for m in modules:
    A, B = lora[f"base_model.model.{m}.lora_A.weight"], lora[f"base_model.model.{m}.lora_B.weight"]
    W = base[m + ".weight"]
    r = config["rank_pattern"].get(m.rsplit(".", 1)[-1], config["r"])
    a = config["alpha_pattern"].get(m.rsplit(".", 1)[-1], config["lora_alpha"])
    assert A.shape == (r, W.shape[1]) and B.shape == (W.shape[0], r), m
    np.testing.assert_allclose(merged[m + ".weight"] - W, (a / r) * B @ A, atol=1e-6, err_msg=m)
  if family == "qwen3_5":  # query | gate in one tensor: their two adapters stack to rank 2r
    assert config["rank_pattern"]["q_proj"] == 8 and config["rank_pattern"]["in_proj_qkv"] == 12
    assert any(".linear_attn.in_proj_qkv" in m for m in modules)
