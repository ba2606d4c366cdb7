"""Structural parameter addressing (models/roles.py): roles come from variable types and the
owner modules' tags, so every consumer works on any layer layout the decoder builds."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sleep_jax.config import load_config
from sleep_jax.dreaming import lora as lora_lib
from sleep_jax.models import model_factory, roles
from sleep_jax.sleep import gdn_only_mask
from sleep_jax.train import make_optimizer

TINY = "experiments/tiny.yaml"


def _keys(tree, pred):
  return {jax.tree_util.keystr(p) for p, r in jax.tree_util.tree_flatten_with_path(tree, is_leaf=roles.is_role)[0]
          if pred(r)}


def _irregular(*extra):
  """Irregular layers (no repeating pattern), real-model options on: what an import builds."""
  return load_config(TINY, ["model.kind=hybrid", "model.layer_pattern=[gdn,attn:none,gdn,gdn,attn:sliding]",
                            "model.pattern_repeats=1", "model.qkv_bias=true", "model.attn_out_gate=true",
                            "model.qk_norm=true", *extra])


def test_roles_follow_types_and_owners_not_names():
  cfg = _irregular()
  R = roles.roles_for(cfg)
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: model_factory(cfg)(nnx.Rngs(0)))))
  assert jax.tree.structure(roles.labels(R, lambda r: 0)) == jax.tree.structure(params)
  no_decay = _keys(R, lambda r: not r.decay)
  # biases (whatever they are called), norm scales and GDN gates; never a projection
  assert "['groups'][1]['attn']['bq']" in no_decay and "['groups'][0]['gdn']['a_log']" in no_decay
  assert "['groups'][4]['attn']['q_norm']['scale']" in no_decay and "['final_norm']['scale']" in no_decay
  assert not any(k.endswith(("['wq']", "['wo']", "['w_up']")) for k in no_decay)
  gdn = _keys(gdn_only_mask(R), lambda m: m)
  assert gdn == {k for k in _keys(R, lambda r: True) if k.startswith(("['groups'][0]", "['groups'][2]", "['groups'][3]"))}
  out = _keys(R, lambda r: r.out_proj)
  assert out == {f"['groups'][{i}][{m!r}]['wo']" for i, m in enumerate(["gdn", "attn", "gdn", "gdn", "attn"])} | {
      f"['groups'][{i}]['mlp']['w_down']" for i in range(5)}


def test_optimizer_decay_follows_roles():
  cfg = _irregular("train.weight_decay=0.5", "train.lr=0.1", "train.warmup_steps=0")
  params = nnx.to_pure_dict(nnx.split(model_factory(cfg)(nnx.Rngs(1)))[1])
  tx, _ = make_optimizer(cfg)
  upd, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)  # only decay moves
  R = roles.roles_for(cfg)
  checked = 0
  for r, p, u in zip(jax.tree.leaves(R, is_leaf=roles.is_role), jax.tree.leaves(params), jax.tree.leaves(upd)):
    moved = bool(np.any(np.asarray(u) != 0))
    if not r.decay:
      assert not moved, r
    elif np.any(np.asarray(p) != 0):
      assert moved, r
      checked += 1
  assert checked > 10


def test_lora_targets_every_query_value_and_mlp_on_any_layout():
  cfg = _irregular()
  params = nnx.to_pure_dict(nnx.split(model_factory(cfg)(nnx.Rngs(2)))[1])
  ad = lora_lib.init(params, roles.roles_for(cfg), jax.random.key(0), 2)
  adapted = {jax.tree_util.keystr(p[:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(ad)[0]}
  mixers = ["gdn", "attn", "gdn", "gdn", "attn"]
  want = {f"['groups'][{i}][{m!r}][{w!r}]" for i, m in enumerate(mixers) for w in ("wq", "wv")}
  want |= {f"['groups'][{i}]['mlp'][{w!r}]" for i in range(5) for w in ("w_up", "w_down")}
  assert adapted == want
  # A fresh adapter changes nothing; a trained one changes exactly its targets.
  same = lora_lib.apply(params, ad, alpha=4.0)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same)))
  moved = lora_lib.apply(params, jax.tree.map(lambda x: x + 0.1, ad), alpha=4.0)
  changed = {jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                                           jax.tree.leaves(moved)) if not np.array_equal(a, b)}
  assert changed == want


def test_cms_roles_tag_levels_parts_and_slots():
  cfg = load_config("experiments/continual.yaml", [])
  R = roles.roles_for(cfg)
  n_levels, n_slots = len(cfg.model.cms.d_ff), cfg.model.cms.experts
  assert roles.cms_levels(R) == n_levels and roles.expert_slots(R) == n_slots
  flags = [r for r in jax.tree.leaves(R, is_leaf=roles.is_role) if r.is_flag]
  assert len(flags) == n_levels * n_slots and not any(r.trainable or r.decay for r in flags)
  assert {(r.cms_level, r.expert_slot) for r in flags} == {(lv, e) for lv in range(n_levels) for e in range(n_slots)}
  assert all(r.cms_part == "mlp" for r in jax.tree.leaves(R, is_leaf=roles.is_role) if r.proj in ("up", "down"))
