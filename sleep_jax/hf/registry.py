"""Architecture registry: a Hugging Face `config.json` <-> our ModelConfig, and the map from
every checkpoint tensor to the decoder parameters it holds.

One `Rule` per checkpoint tensor of a layer: its name, the parameter paths it fills (inside
one layer of `groups[p]`, or at the top of the tree), and two pure functions, `split` (the
checkpoint array -> our arrays, as numpy VIEWS where the layout allows, so an importer reads
only the slices a device needs) and `merge` (the inverse, for export). Layer i of the stack is
repeat i // P of pattern position i % P (models/decoder.py).

Families: llama (Llama 3.x, incl. "llama3" RoPE scaling), qwen2 (qkv bias), qwen3 (QK-norm),
qwen3_5 (Qwen3.5 text: gated attention, partial RoPE, zero-centred norms, Gated DeltaNet with
its own head counts; also the released vision-language wrapper's text part) and qwen3_next
(the same layers with fused GDN projections; dense-MLP layers only). Anything else is a
one-line HFError.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from sleep_jax.hf.safetensors_io import HFError

Path = tuple[str, ...]


@dataclass(frozen=True)
class Rule:
  name: str  # checkpoint tensor name ("{i}" = layer index), relative to the family's prefix
  params: tuple[Path, ...]  # parameter paths it fills, inside one layer (or from the tree's root)
  split: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  merge: Callable[..., np.ndarray]


# -- layouts ---------------------------------------------------------------------------------
def in_proj(path: Path, name: str, heads: int, dim: int) -> Rule:
  """nn.Linear [heads * dim, D] <-> ours [D, heads, dim]."""
  return Rule(name, (path,), lambda w: (w.T.reshape(w.shape[1], heads, dim),),
              lambda a: a.reshape(a.shape[0], heads * dim).T)


def out_proj(path: Path, name: str, heads: int, dim: int) -> Rule:
  """nn.Linear [D, heads * dim] <-> ours [heads, dim, D]."""
  return Rule(name, (path,), lambda w: (w.T.reshape(heads, dim, w.shape[0]),),
              lambda a: a.reshape(heads * dim, a.shape[-1]).T)


def linear(path: Path, name: str) -> Rule:
  """nn.Linear [out, in] <-> ours [in, out]."""
  return Rule(name, (path,), lambda w: (w.T,), lambda a: a.T)


def same(path: Path, name: str) -> Rule:
  return Rule(name, (path,), lambda w: (w,), lambda a: a)


def bias(path: Path, name: str, heads: int, dim: int) -> Rule:
  return Rule(name, (path,), lambda w: (w.reshape(heads, dim),), lambda a: a.reshape(heads * dim))


def gated_q(name: str, heads: int, dim: int) -> Rule:
  """Gated attention's q_proj [heads * 2 * dim, D], per head [query | gate] <-> wq, w_gate."""
  def split(w):
    v = w.reshape(heads, 2, dim, w.shape[1])
    return v[:, 0].transpose(2, 0, 1), v[:, 1].transpose(2, 0, 1)

  def merge(q, g):
    return np.stack([q.transpose(1, 2, 0), g.transpose(1, 2, 0)], axis=1).reshape(heads * 2 * dim, q.shape[0])

  return Rule(name, (("attn", "wq"), ("attn", "w_gate")), split, merge)


def row_split(paths: tuple[Path, ...], name: str, shapes: tuple[tuple[int, int], ...]) -> Rule:
  """nn.Linear whose output rows are several projections back to back, each (heads, dim)."""
  sizes = np.cumsum([0] + [h * d for h, d in shapes])

  def split(w):
    return tuple(w[a:b].T.reshape(w.shape[1], h, d) for (a, b), (h, d) in zip(zip(sizes, sizes[1:]), shapes))

  def merge(*parts):
    return np.concatenate([p.reshape(p.shape[0], -1).T for p in parts], axis=0)

  return Rule(name, paths, split, merge)


def conv_split(name: str, shapes: tuple[tuple[int, int], ...]) -> Rule:
  """Depthwise nn.Conv1d [C, 1, W] over q|k|v channels <-> conv_q, conv_k, conv_v [W, heads, dim]."""
  sizes = np.cumsum([0] + [h * d for h, d in shapes])
  paths = (("gdn", "conv_q"), ("gdn", "conv_k"), ("gdn", "conv_v"))

  def split(w):
    c = w[:, 0, :]
    return tuple(c[a:b].T.reshape(w.shape[2], h, d) for (a, b), (h, d) in zip(zip(sizes, sizes[1:]), shapes))

  def merge(*parts):
    return np.concatenate([p.reshape(p.shape[0], -1).T for p in parts], axis=0)[:, None, :]

  return Rule(name, paths, split, merge)


def fused_qkvz(name: str, nk: int, nv: int, dk: int, dv: int) -> Rule:
  """Qwen3-Next in_proj_qkvz [nk * (2 dk + 2 r dv), D], grouped per key head as
  [q | k | v (r heads) | z (r heads)] <-> wq, wk, wv, wg."""
  r = nv // nk
  cut = np.cumsum([0, dk, dk, r * dv, r * dv])
  paths = (("gdn", "wq"), ("gdn", "wk"), ("gdn", "wv"), ("gdn", "wg"))
  heads = ((nk, dk), (nk, dk), (nv, dv), (nv, dv))

  def split(w):
    g = w.reshape(nk, int(cut[-1]), w.shape[1])
    return tuple(g[:, a:b].reshape(h * d, w.shape[1]).T.reshape(w.shape[1], h, d)
                 for (a, b), (h, d) in zip(zip(cut, cut[1:]), heads))

  def merge(*parts):
    D = parts[0].shape[0]
    per_group = [p.reshape(D, nk, -1).transpose(1, 2, 0) for p in parts]  # [nk, width, D]
    return np.concatenate(per_group, axis=1).reshape(-1, D)

  return Rule(name, paths, split, merge)


def fused_ba(name: str, nk: int, nv: int) -> Rule:
  """Qwen3-Next in_proj_ba [nk * 2r, D], grouped per key head as [b (r) | a (r)] <-> wb, wa."""
  r = nv // nk

  def split(w):
    g = w.reshape(nk, 2 * r, w.shape[1])
    return g[:, :r].reshape(nv, w.shape[1]).T, g[:, r:].reshape(nv, w.shape[1]).T

  def merge(b, a):
    D = b.shape[0]
    return np.concatenate([b.T.reshape(nk, r, D), a.T.reshape(nk, r, D)], axis=1).reshape(2 * nv, D)

  return Rule(name, (("gdn", "wb"), ("gdn", "wa")), split, merge)


# -- config.json <-> ModelConfig ----------------------------------------------------------------
def read_hf_config(path: str) -> dict:
  """A checkpoint directory's config.json; HFError (one line) if absent or malformed."""
  f = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise HFError(f"not a Hugging Face checkpoint directory: {path}")
  if not os.path.exists(f):
    raise HFError(f"{path} has no config.json")
  try:
    with open(f) as fh:
      hf = json.load(fh)
  except (OSError, ValueError) as e:
    raise HFError(f"malformed {f}: {' '.join(str(e).split())}") from None
  if not isinstance(hf, dict):
    raise HFError(f"malformed {f}: top level must be an object")
  return hf


def resolve_init_from(mc):
  """ModelConfig with model.init_from's architecture (ARCH_FIELDS) in place of its own."""
  if not mc.init_from:
    return mc
  path = os.path.abspath(os.path.expanduser(mc.init_from))
  fields = {k: v for k, v in model_fields(read_hf_config(path)).items() if k in ARCH_FIELDS}
  # The families' MLPs are dense SwiGLU: model.mlp is architecture too, by kind ("").
  return dataclasses.replace(mc, **fields, mlp="", init_from=path)


def _rope(hf: dict) -> tuple[float, dict, float]:
  """(theta, scaling, partial rotary factor) from transformers 5's rope_parameters or the older
  top-level rope_theta / rope_scaling / partial_rotary_factor."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  fraction = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
  source = params if params.get("rope_type", "default") != "default" else scaling
  kind = source.get("rope_type", source.get("type", "default"))
  keep = {k: v for k, v in source.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
  if kind in ("default", None):
    keep = {}
  elif kind not in ("linear", "llama3"):
    raise HFError(f"unsupported RoPE scaling {kind!r} in config.json (supported: default, linear, llama3)")
  else:
    keep["rope_type"] = kind
  return theta, keep, fraction


def _period(kinds: list[str]) -> tuple[list[str], int]:
  """The shortest pattern whose repeats make up the layer list (pattern, repeats)."""
  n = len(kinds)
  for P in range(1, n + 1):
    if n % P == 0 and all(kinds[i] == kinds[i % P] for i in range(n)):
      return kinds[:P], n // P
  return kinds, 1


def _need(hf: dict, key: str):
  if key not in hf:
    raise HFError(f"config.json has no {key!r}")
  return hf[key]


def _unsupported(hf: dict, family: str) -> None:
  if hf.get("hidden_act", "silu") != "silu":
    raise HFError(f"unsupported {family} option in config.json: hidden_act={hf['hidden_act']!r} (only silu)")
  if hf.get("mlp_bias"):
    raise HFError(f"unsupported {family} option in config.json: mlp_bias=true")
  if hf.get("use_sliding_window"):
    raise HFError(f"unsupported {family} option in config.json: use_sliding_window=true")
  if hf.get("attention_bias") and family != "qwen2":
    raise HFError(f"unsupported {family} option in config.json: attention_bias=true (an o_proj bias)")


def _dense_fields(hf: dict, family: str) -> dict:
  _unsupported(hf, family)
  heads = int(_need(hf, "num_attention_heads"))
  d_model = int(_need(hf, "hidden_size"))
  theta, scaling, fraction = _rope(hf)
  return dict(vocab_size=int(_need(hf, "vocab_size")), d_model=d_model, n_heads=heads,
              n_kv_heads=int(hf.get("num_key_value_heads") or heads),
              head_dim=int(hf.get("head_dim") or d_model // heads), d_ff=int(_need(hf, "intermediate_size")),
              norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_base=theta, rope_scaling=scaling,
              rope_fraction=fraction, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
              max_len=int(hf.get("max_position_embeddings", 2048)), init_std=float(hf.get("initializer_range", 0.02)),
              eviction="none", hf_arch=family)


@dataclass(frozen=True)
class Family:
  name: str
  model_types: tuple[str, ...]
  architecture: str  # transformers class written into an exported config.json
  model_type: str  # model_type written on export
  to_fields: Callable[[dict], dict]
  layer_rules: Callable[[Any, str], list[Rule]]  # (ModelConfig, layer kind) -> rules ("{i}" in names)

  def top_rules(self, mc) -> list[Rule]:
    rules = [same(("embed",), "model.embed_tokens.weight"), same(("final_norm", "scale"), "model.norm.weight")]
    if not mc.tie_embeddings:
      rules.append(linear(("unembed",), "lm_head.weight"))
    return rules


def _llama_fields(hf: dict, family: str = "llama", **extra) -> dict:
  f = _dense_fields(hf, family)
  if family in ("llama", "qwen2", "qwen3"):
    f["rope_fraction"] = 1.0  # their default RoPE rotates every channel (partial_rotary_factor ignored)
  f.update(kind="transformer", n_layers=int(_need(hf, "num_hidden_layers")), **extra)
  return f


def _attn_rules(mc, *, gated: bool) -> list[Rule]:
  H, G, K, pre = mc.n_heads, mc.n_kv_heads or mc.n_heads, mc.head_dim, "model.layers.{i}.self_attn."
  rules = [gated_q(pre + "q_proj.weight", H, K) if gated else in_proj(("attn", "wq"), pre + "q_proj.weight", H, K),
           in_proj(("attn", "wk"), pre + "k_proj.weight", G, K), in_proj(("attn", "wv"), pre + "v_proj.weight", G, K),
           out_proj(("attn", "wo"), pre + "o_proj.weight", H, K)]
  if mc.qkv_bias:
    rules += [bias(("attn", "bq"), pre + "q_proj.bias", H, K), bias(("attn", "bk"), pre + "k_proj.bias", G, K),
              bias(("attn", "bv"), pre + "v_proj.bias", G, K)]
  if mc.qk_norm:
    rules += [same(("attn", "q_norm", "scale"), pre + "q_norm.weight"),
              same(("attn", "k_norm", "scale"), pre + "k_norm.weight")]
  return rules


def _common_rules(mc) -> list[Rule]:
  pre = "model.layers.{i}."
  return [same(("mixer_norm", "scale"), pre + "input_layernorm.weight"),
          same(("mlp_norm", "scale"), pre + "post_attention_layernorm.weight"),
          linear(("mlp", "w_gate"), pre + "mlp.gate_proj.weight"), linear(("mlp", "w_up"), pre + "mlp.up_proj.weight"),
          linear(("mlp", "w_down"), pre + "mlp.down_proj.weight")]


def _dense_layer(mc, kind: str) -> list[Rule]:
  return _common_rules(mc) + _attn_rules(mc, gated=False)


def _gdn_dims(mc):
  from sleep_jax.models.gdn import gdn_dims

  return gdn_dims(mc)


def _qwen35_fields(hf: dict, family: str) -> dict:
  f = _dense_fields(hf, family)
  types = list(_need(hf, "layer_types"))
  mixers = {"linear_attention": "gdn", "full_attention": "attn"}
  for t in types:
    if t not in mixers:
      raise HFError(f"unsupported layer type {t!r} in config.json layer_types")
  pattern, repeats = _period([mixers[t] for t in types])
  if len(types) != int(hf.get("num_hidden_layers", len(types))):
    raise HFError("config.json: layer_types does not list num_hidden_layers entries")
  f.update(kind="hybrid", layer_pattern=pattern, pattern_repeats=repeats, n_layers=len(types), qk_norm=True,
           attn_out_gate=True, norm_offset=1.0, gdn_k_heads=int(_need(hf, "linear_num_key_heads")),
           gdn_v_heads=int(_need(hf, "linear_num_value_heads")), gdn_k_dim=int(_need(hf, "linear_key_head_dim")),
           gdn_v_dim=int(_need(hf, "linear_value_head_dim")), gdn_conv=int(hf.get("linear_conv_kernel_dim", 4)),
           gdn_q_scale=True)
  return f


def _qwen3_next_fields(hf: dict) -> dict:
  n = int(_need(hf, "num_hidden_layers"))
  dense = set(hf.get("mlp_only_layers") or [])
  step = int(hf.get("decoder_sparse_step", 1) or 1)
  moe = [i for i in range(n) if i not in dense and int(hf.get("num_experts", 0) or 0) > 0 and (i + 1) % step == 0]
  if moe:
    raise HFError(f"unsupported qwen3_next option in config.json: mixture-of-experts MLP in layers {moe} "
                  "(only dense layers, mlp_only_layers = every layer, are supported)")
  return _qwen35_fields(hf, "qwen3_next")


def _qwen35_layer(mc, kind: str, *, fused: bool) -> list[Rule]:
  rules = _common_rules(mc)
  if kind != "gdn":
    return rules + _attn_rules(mc, gated=True)
  Hk, Hv, dk, dv = _gdn_dims(mc)
  pre = "model.layers.{i}.linear_attn."
  qkv = ((Hk, dk), (Hk, dk), (Hv, dv))
  if fused:
    rules += [fused_qkvz(pre + "in_proj_qkvz.weight", Hk, Hv, dk, dv), fused_ba(pre + "in_proj_ba.weight", Hk, Hv)]
  else:
    rules += [row_split((("gdn", "wq"), ("gdn", "wk"), ("gdn", "wv")), pre + "in_proj_qkv.weight", qkv),
              in_proj(("gdn", "wg"), pre + "in_proj_z.weight", Hv, dv),
              linear(("gdn", "wb"), pre + "in_proj_b.weight"), linear(("gdn", "wa"), pre + "in_proj_a.weight")]
  return rules + [conv_split(pre + "conv1d.weight", qkv), same(("gdn", "a_log"), pre + "A_log"),
                  same(("gdn", "dt_bias"), pre + "dt_bias"), same(("gdn", "o_norm", "scale"), pre + "norm.weight"),
                  out_proj(("gdn", "wo"), pre + "out_proj.weight", Hv, dv)]


FAMILIES = {
    "llama": Family("llama", ("llama",), "LlamaForCausalLM", "llama", _llama_fields, _dense_layer),
    "qwen2": Family("qwen2", ("qwen2",), "Qwen2ForCausalLM", "qwen2",
                    lambda hf: _llama_fields(hf, "qwen2", qkv_bias=True), _dense_layer),
    "qwen3": Family("qwen3", ("qwen3",), "Qwen3ForCausalLM", "qwen3",
                    lambda hf: _llama_fields(hf, "qwen3", qk_norm=True), _dense_layer),
    "qwen3_5": Family("qwen3_5", ("qwen3_5_text", "qwen3_5"), "Qwen3_5ForCausalLM", "qwen3_5_text",
                      lambda hf: _qwen35_fields(hf, "qwen3_5"), lambda mc, k: _qwen35_layer(mc, k, fused=False)),
    "qwen3_next": Family("qwen3_next", ("qwen3_next",), "Qwen3NextForCausalLM", "qwen3_next", _qwen3_next_fields,
                         lambda mc, k: _qwen35_layer(mc, k, fused=True)),
}


def text_config(hf: dict) -> tuple[dict, str]:
  """(the text model's config, checkpoint name prefix to strip): the released Qwen3.5
  checkpoints wrap the text model in a vision-language one (text_config, model.language_model.*)."""
  if hf.get("model_type") == "qwen3_5" and isinstance(hf.get("text_config"), dict):
    return {**hf["text_config"], "tie_word_embeddings": hf.get("tie_word_embeddings",
                                                              hf["text_config"].get("tie_word_embeddings", False))}, \
        "model.language_model."
  return hf, "model."


def family_of(hf: dict) -> Family:
  mt = hf.get("model_type")
  for fam in FAMILIES.values():
    if mt in fam.model_types:
      return fam
  supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
  raise HFError(f"unsupported model_type {mt!r} in config.json (supported: {', '.join(supported)})")


def model_fields(hf: dict) -> dict:
  """ModelConfig fields of a checkpoint's config.json (architecture only)."""
  text, _ = text_config(hf)
  return family_of(hf).to_fields(text)


# Which ModelConfig fields an imported checkpoint decides (everything else stays the run's).
ARCH_FIELDS = ("kind", "vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "n_layers",
               "layer_pattern", "pattern_repeats", "max_len", "rope_base", "rope_scaling", "rope_fraction",
               "tie_embeddings", "norm_eps", "norm_offset", "qk_norm", "qkv_bias", "attn_out_gate",
               "gdn_k_heads", "gdn_v_heads", "gdn_k_dim", "gdn_v_dim", "gdn_conv", "gdn_q_scale", "hf_arch",
               "init_std")


def export_family(mc) -> Family:
  """The family a ModelConfig can be written as; HFError naming what has no equivalent."""
  blockers = [f"model.{k}={getattr(mc, k)!r}" for k, bad in (("kind", mc.kind == "cms"), ("mlp", mc.mlp == "cms"),
                                                             ("attn_conv", mc.attn_conv)) if bad]
  if any(k.startswith("attn:") for k in mc.layer_pattern if mc.kind == "hybrid"):
    blockers.append("per-layer attention eviction in model.layer_pattern")
  if blockers:
    raise HFError(f"cannot export to Hugging Face: {', '.join(blockers)} has no transformers equivalent")
  name = mc.hf_arch
  has_gdn = mc.kind == "hybrid" and "gdn" in mc.layer_pattern
  if not name:
    name = "qwen3_5" if has_gdn else "qwen3" if mc.qk_norm else "qwen2" if mc.qkv_bias else "llama"
  if name not in FAMILIES:
    raise HFError(f"cannot export to Hugging Face: unknown model.hf_arch {name!r} (known: {', '.join(FAMILIES)})")
  fam = FAMILIES[name]
  want = fam.to_fields(hf_config(mc, fam))  # what the family's own config.json would decode to
  diffs = [k for k in ("qk_norm", "qkv_bias", "attn_out_gate", "norm_offset", "gdn_q_scale")
           if k in want and getattr(mc, k) != want[k]]
  if diffs:
    raise HFError(f"cannot export to Hugging Face as {name}: model options {', '.join(f'model.{d}' for d in diffs)} "
                  f"differ from what {fam.architecture} computes")
  return fam


def hf_config(mc, fam: Family, base: dict | None = None) -> dict:
  """config.json for an exported model (base: the imported checkpoint's, kept where it applies)."""
  pattern_full = [mc.layer_pattern[i % len(mc.layer_pattern)] for i in range(len(mc.layer_pattern) * mc.pattern_repeats)] \
      if mc.kind == "hybrid" else ["attn"] * mc.n_layers
  out = dict(base or {})
  out.pop("text_config", None)
  rope = {"rope_type": (mc.rope_scaling or {}).get("rope_type", "default"), "rope_theta": mc.rope_base,
          **{k: v for k, v in (mc.rope_scaling or {}).items() if k != "rope_type"}}
  if mc.rope_fraction != 1.0:
    rope["partial_rotary_factor"] = mc.rope_fraction
  for k in ("rope_theta", "rope_scaling", "partial_rotary_factor", "torch_dtype"):
    out.pop(k, None)
  out.update(architectures=[fam.architecture], model_type=fam.model_type, vocab_size=mc.vocab_size,
             hidden_size=mc.d_model, num_attention_heads=mc.n_heads, num_key_value_heads=mc.n_kv_heads or mc.n_heads,
             head_dim=mc.head_dim, intermediate_size=mc.d_ff, num_hidden_layers=len(pattern_full),
             rms_norm_eps=mc.norm_eps, rope_parameters=rope, tie_word_embeddings=mc.tie_embeddings,
             max_position_embeddings=mc.max_len, hidden_act="silu", initializer_range=mc.init_std)
  if fam.name in ("llama", "qwen3"):
    out["attention_bias"] = False
  if fam.name == "llama":
    out["mlp_bias"] = False
  if fam.name in ("qwen3_5", "qwen3_next"):
    Hk, Hv, dk, dv = _gdn_dims(mc)
    out.update(layer_types=["linear_attention" if k == "gdn" else "full_attention" for k in pattern_full],
               linear_num_key_heads=Hk, linear_num_value_heads=Hv, linear_key_head_dim=dk,
               linear_value_head_dim=dv, linear_conv_kernel_dim=mc.gdn_conv, attention_bias=False)
    if fam.name == "qwen3_next":
      out.update(mlp_only_layers=list(range(len(pattern_full))), num_experts=out.get("num_experts", 0) or 0)
  return out


def layer_rules(fam: Family, mc, kind: str) -> list[Rule]:
  return fam.layer_rules(mc, kind)
