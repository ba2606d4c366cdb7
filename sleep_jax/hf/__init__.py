"""Hugging Face interop: `load` a transformers checkpoint directory into the decoder (placed
tensor by tensor onto the mesh's shardings), `save` a decoder as one transformers loads.

  cfg, model = sleep_jax.hf.load("path/to/Qwen3.5-0.8B", mesh=mesh, dtype="bfloat16")
  sleep_jax.hf.save(model, cfg, "out/")

Every checkpoint tensor is read through a memory-mapped view (`safetensors_io`), reshaped as
a view (`registry.Rule.split`), and each device's shard is converted and copied from just
the bytes it needs (`jax.make_array_from_callback`): no host holds a second full copy, and a
tensor's pages are dropped once it is placed. Bad checkpoints (unsupported model_type, a
missing, extra or misshapen tensor) raise `HFError` with one line naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from sleep_jax.hf import registry
from sleep_jax.hf.registry import read_hf_config
from sleep_jax.hf.safetensors_io import CheckpointReader, HFError, write_checkpoint

__all__ = ["HFError", "load", "load_params", "save", "read_hf_config", "config_from_hf"]

_IGNORED = ("mtp.", "model.visual.")  # Qwen3.5 wrapper: multi-token prediction and vision towers


def config_from_hf(path: str, cfg=None, *, dtype: str = "float32"):
  """A Config whose model section is the checkpoint's architecture (other sections: cfg's,
  or the defaults), with model.init_from = path."""
  from sleep_jax.config import Config

  cfg = cfg if cfg is not None else Config()
  fields = registry.model_fields(read_hf_config(path))
  model = dataclasses.replace(cfg.model, **fields, init_from=os.path.abspath(path))
  if dtype != "float32":
    model = dataclasses.replace(model, compute_dtype=dtype)
  return dataclasses.replace(cfg, model=model)


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


def _plan(fam, mc, prefix: str, pattern, repeats: int):
  """[(param path from the root, [(checkpoint name, rule, part index)] per stacked row or one)]."""
  rename = lambda n: prefix + n[len("model."):] if n.startswith("model.") else n  # noqa: E731
  plan: dict[tuple, list] = {}
  for rule in fam.top_rules(mc):
    for k, path in enumerate(rule.params):
      plan[path] = [(rename(rule.name), rule, k)]
  P = len(pattern)
  for p, kind in enumerate(pattern):
    for r in range(repeats):
      for rule in registry.layer_rules(fam, mc, kind):
        name = rename(rule.name.format(i=r * P + p))
        for k, sub in enumerate(rule.params):
          plan.setdefault(("groups", p) + sub, [None] * repeats)[r] = (name, rule, k)
  return plan


def _views(reader: CheckpointReader, plan: dict, abstract: dict) -> dict:
  """Each parameter's per-row views into the checkpoint, shapes checked; one-line errors."""
  flat = {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  missing_params = sorted(set(flat) - set(plan))
  if missing_params:
    raise HFError(f"no checkpoint tensor maps to parameter {'/'.join(map(str, missing_params[0]))} "
                  "(a model option transformers does not have)")
  used = set()
  splits: dict[str, tuple] = {}
  views = {}
  for path, leaf in flat.items():
    rows = []
    for name, rule, k in plan[path]:
      if name not in reader:
        raise HFError(f"the checkpoint is missing tensor {name}")
      used.add(name)
      if name not in splits:
        try:
          splits[name] = rule.split(reader.array(name))
        except ValueError:
          raise HFError(f"tensor {name} has shape {list(reader.shape(name))}, which does not fit the model "
                        "config.json describes") from None
      rows.append((name, splits[name][k]))
    want = leaf.shape[1:] if path[0] == "groups" else leaf.shape
    for name, v in rows:
      if tuple(v.shape) != tuple(want):
        raise HFError(f"tensor {name} has shape {list(reader.shape(name))}: the model config.json describes "
                      f"needs {list(want)} for {'/'.join(map(str, path))}")
    views[path] = rows
  extra = sorted(n for n in reader.names() if n not in used and not n.startswith(_IGNORED)
                 and not n.endswith("rotary_emb.inv_freq"))
  if extra:
    raise HFError(f"unexpected tensor {extra[0]} in the checkpoint ({len(extra)} not used by the model config.json "
                  "describes)")
  return views


def load_params(path: str, cfg, shardings, *, dtype: str = "float32") -> dict:
  """The checkpoint's tensors as the decoder's pure parameter dict, each created directly in
  its NamedSharding from the bytes its devices need."""
  from sleep_jax import sharding as shd
  from sleep_jax.models import model_factory
  from sleep_jax.models.decoder import layer_plan

  hf = read_hf_config(path)
  fam = registry.family_of(hf)
  _, prefix = registry.text_config(hf)
  pattern, repeats = layer_plan(cfg.model)
  abstract = shd.abstract_model(model_factory(cfg))[1]
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  out = jax.tree.map(lambda _: None, abstract)
  with CheckpointReader(path) as reader:
    views = _views(reader, _plan(fam, cfg.model, prefix, pattern, repeats), abstract)
    # Largest first: while a tensor is placed its file pages (and any dtype-converted copy)
    # are resident beside it, so the peak is set by the first, when little else is placed.
    size = lambda p: int(np.prod(_get(abstract, p).shape))  # noqa: E731
    for p, rows in sorted(views.items(), key=lambda kv: -size(kv[0])):
      leaf, sharding = _get(abstract, p), _get(shardings, p)
      stacked = p[0] == "groups"

      def fetch(index, rows=rows, stacked=stacked):
        if not stacked:
          return np.asarray(rows[0][1][index], np_dtype)
        return np.stack([np.asarray(rows[r][1][index[1:]], np_dtype) for r in range(len(rows))[index[0]]])

      # Ready before its pages are dropped: the host-to-device copy is asynchronous, and pages
      # it faults in after a release would stay resident.
      _set(out, p, jax.make_array_from_callback(leaf.shape, sharding, fetch).block_until_ready())
      for name in dict.fromkeys(n for n, _ in rows):
        reader.release(name)  # its pages leave host memory (a shared tensor is re-read: still exact)
  return out


def load(path: str, *, mesh=None, dtype: str = "float32"):
  """(Config, model) from a Hugging Face directory (config.json + safetensors). mesh: where to
  place the parameters (default: one device); dtype: float32 or bfloat16 parameters."""
  from sleep_jax import sharding as shd
  from sleep_jax.config import MeshConfig
  from sleep_jax.models import model_factory

  if dtype not in ("float32", "bfloat16"):
    raise HFError(f"dtype must be float32 or bfloat16, got {dtype!r}")
  cfg = config_from_hf(path, dtype=dtype)
  if mesh is None:
    mesh = shd.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  graphdef, abstract, logical = shd.abstract_model(model_factory(cfg))
  shardings = shd.param_shardings(abstract, logical, mesh, cfg.logical_axis_rules)
  params = load_params(path, cfg, shardings, dtype=dtype)
  state = nnx.split(nnx.eval_shape(lambda: model_factory(cfg)(nnx.Rngs(0))))[1]
  nnx.replace_by_pure_dict(state, params)
  return cfg, nnx.merge(graphdef, state)


def save(model, cfg, path: str, *, dtype: str | None = None, max_shard_bytes: int = 2**31) -> list[str]:
  """Write `model` as a Hugging Face directory: safetensors (sharded past max_shard_bytes) +
  index + config.json + the tokenizer and generation config of the checkpoint it came from."""
  from sleep_jax.models.decoder import layer_plan

  mc = cfg.model
  fam = registry.export_family(mc)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param)) if isinstance(model, nnx.Module) else model
  pattern, repeats = layer_plan(mc)
  P = len(pattern)
  host = lambda a: np.asarray(jax.device_get(a))  # noqa: E731

  def tensors():
    for rule in fam.top_rules(mc):
      yield rule.name, np.ascontiguousarray(rule.merge(*(host(_get(params, q)) for q in rule.params)))
    for i in range(P * repeats):
      p, r = i % P, i // P
      for rule in registry.layer_rules(fam, mc, pattern[p]):
        parts = [host(_get(params, ("groups", p) + q)[r]) for q in rule.params]
        yield rule.name.format(i=i), np.ascontiguousarray(rule.merge(*parts))

  source = mc.init_from if mc.init_from and os.path.isdir(mc.init_from) else None
  base = registry.text_config(read_hf_config(source))[0] if source and os.path.exists(
      os.path.join(source, "config.json")) else None
  names = write_checkpoint(path, tensors(), max_shard_bytes=max_shard_bytes, dtype=dtype)
  config = registry.hf_config(mc, fam, base)
  config["dtype"] = dtype or "float32"
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  if source:
    for extra in ("generation_config.json",):
      if os.path.exists(os.path.join(source, extra)):
        shutil.copy(os.path.join(source, extra), os.path.join(path, extra))
    from sleep_jax.tokenizer import TokenizerError, load_tokenizer

    try:
      load_tokenizer(source).save(path)
    except TokenizerError:
      pass  # a checkpoint without a tokenizer exports without one
  return names
