"""PEFT-format export of a LoRA adapter (dreaming/lora.py) for the architectures of
`registry`: `adapter_model.safetensors` + `adapter_config.json`, as `peft`'s
`PeftModel.save_pretrained` writes them and `PeftModel.from_pretrained` reads them.

    sleep_jax.hf.peft.save_adapter(adapter, cfg, "out/", alpha=16.0)

Tensor names: `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight`
[out, r], <module> the checkpoint tensor's name without `.weight` (e.g.
model.layers.3.self_attn.q_proj); PEFT computes W + (lora_alpha / r) lora_B @ lora_A on
transformers' [out, in] weight, exactly our W + (alpha / r) A B in our layout.

Each checkpoint tensor's `Rule.merge` (the export map of the full weights, registry.py) also
places the factors, so fused checkpoint tensors come out right: where one HF tensor holds
several of our projections (Qwen3.5's q_proj = query | gate, its GDN in_proj_qkv), their
adapters stack into one of rank k r (lora_A stacked, lora_B block-placed by merge), written
with `rank_pattern` / `alpha_pattern` so the scale stays alpha / r.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from flax import nnx

from sleep_jax.hf import registry
from sleep_jax.hf.safetensors_io import HFError

ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"


def _get(tree, path):
  for k in path:
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree


def _module_factors(rule, parts: list, shapes: list, n_ins: list) -> tuple[np.ndarray, np.ndarray]:
  """(lora_A [k r, in], lora_B [out, k r]) of one checkpoint tensor from the adapters of the
  parameters it holds (parts: (A [in, r], B [r, out]) or None per parameter)."""
  used = [i for i, ab in enumerate(parts) if ab is not None]
  if any(n_ins[i] > 1 for i in used):  # input over several axes (an output projection)
    if len(rule.params) != 1:
      raise HFError(f"cannot export an adapter of {rule.name}: a fused tensor with multi-axis inputs")
    a, b = parts[0]
    in_shape = shapes[0][:n_ins[0]]
    return rule.merge(a.reshape(*in_shape, a.shape[-1])), b.T  # merge maps our [in..., out] to [out, in]
  ranks = [parts[i][0].shape[-1] for i in used]
  total, offset = sum(ranks), dict(zip(used, np.cumsum([0] + ranks[:-1])))
  lora_A = np.concatenate([parts[i][0].T for i in used], axis=0)  # every part reads the same input
  blocks = []
  for i, shape in enumerate(shapes):
    full = np.zeros((total, math.prod(shape[1:])), np.float32)
    if parts[i] is not None:
      full[offset[i]:offset[i] + parts[i][1].shape[0]] = parts[i][1]
    blocks.append(full.reshape((total,) + tuple(shape[1:])))  # B viewed as a weight whose input is the rank
  return lora_A, rule.merge(*blocks)


def adapter_tensors(adapter: dict, cfg) -> tuple[dict, dict]:
  """({name: array}, {module name: rank}) in PEFT's layout for the model of cfg."""
  from sleep_jax.dreaming.lora import n_in
  from sleep_jax.models import model_factory, roles
  from sleep_jax.models.decoder import layer_plan

  mc = cfg.model
  fam = registry.export_family(mc)
  if set(adapter) - {"groups"}:
    raise HFError(f"cannot export adapters outside the stacked layers: {sorted(set(adapter) - {'groups'})}")
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: model_factory(cfg)(nnx.Rngs(0)))))
  param_roles = roles.roles_for(cfg)
  pattern, repeats = layer_plan(mc)
  P = len(pattern)
  host = lambda a: np.asarray(jax.device_get(a), np.float32)  # noqa: E731
  tensors, ranks, covered = {}, {}, set()
  for i in range(P * repeats):
    p, r = i % P, i // P
    for rule in registry.layer_rules(fam, mc, pattern[p]):
      paths = [("groups", p) + q for q in rule.params]
      ads = [_get(adapter, path) for path in paths]
      if all(ab is None for ab in ads):
        continue
      covered.update(tuple(path) for path, ab in zip(paths, ads) if ab is not None)
      parts = [None if ab is None else (host(ab["a"][r]), host(ab["b"][r])) for ab in ads]
      lora_A, lora_B = _module_factors(rule, parts, [_get(shapes, q).shape[1:] for q in paths],
                                       [n_in(_get(param_roles, q)) for q in paths])
      module = rule.name.format(i=i)[:-len(".weight")]
      tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(lora_A)
      tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(lora_B)
      ranks[module] = lora_A.shape[0]
  flat = {tuple(getattr(k, "key", k) for k in path[:-1])
          for path, _ in jax.tree_util.tree_flatten_with_path(adapter)[0]}
  missing = sorted(flat - covered)
  if missing:
    raise HFError(f"cannot export to {fam.name}: no checkpoint tensor holds the adapted {missing[0]}")
  return tensors, ranks


def save_adapter(adapter: dict, cfg, path: str, *, alpha: float, base_model_name_or_path: str | None = None) -> dict:
  """Write adapter (lora.init's tree, unscaled) for cfg's model in PEFT's format; returns
  the adapter_config.json written."""
  from safetensors.numpy import save_file

  tensors, ranks = adapter_tensors(adapter, cfg)
  if not tensors:
    raise HFError("the adapter adapts nothing")
  r = int(jax.tree.leaves(adapter)[0].shape[-1])
  short = {m.rsplit(".", 1)[-1] for m in ranks}
  pattern = {s: k for s in sorted(short) for m, k in ranks.items() if m.endswith("." + s) and k != r}
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": float(alpha),
            "target_modules": sorted(short), "rank_pattern": pattern,
            "alpha_pattern": {s: float(alpha) * k / r for s, k in pattern.items()},
            "base_model_name_or_path": base_model_name_or_path or cfg.model.init_from or None,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None, "use_rslora": False, "use_dora": False}
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, ADAPTER_FILE), metadata={"format": "pt"})
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return config
