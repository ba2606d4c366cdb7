"""model.mlp = cms on a GDN/attention hybrid (paper A's model with paper B's CMS levels):
parameter roles and every consumer of them, the config and export refusals, and dreaming's
log-probs through the model's own sleeping forward. (The float64 reference of its forward
with sleep passes: test_hybrid.py::test_cms_mlp_hybrid_with_sleep_passes_matches_reference.)"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sleep_jax import losses
from sleep_jax.config import Config, ConfigError, ModelConfig, SleepConfig, DreamingConfig, load_config
from sleep_jax.data.days import DayWorld
from sleep_jax.dreaming import dreams as D
from sleep_jax.dreaming import lora as lora_lib
from sleep_jax.models import forward, model_factory, roles, sleeps
from sleep_jax.seeding import expand, steps as seed_steps
from sleep_jax.sleep import gdn_only_mask
from sleep_jax.train import make_optimizer

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
WORLD = dict(n_old=8, n_pool=16, n_relations=2, attr_len=2, n_symbols=6, days=2, per_day=4, qa_per_example=3)


def hybrid_cms(passes=2, chunk_len=20, **model):
  """A tiny cms-MLP hybrid on dream_tiny's world: its 41-token passage is 2 chunks of 20."""
  world = DayWorld(**WORLD)
  mc = ModelConfig(kind="hybrid", mlp="cms", layer_pattern=["gdn", "attn"], vocab_size=world.vocab_size, d_model=32,
                   n_heads=2, head_dim=16, eviction="hard", attn_conv=4, gdn_chunk=8, init_std=0.2, **model)
  mc.cms.d_ff, mc.cms.update_every, mc.cms.experts, mc.cms.rank = [32, 32], [1, 2], 3, 4
  return Config(model=mc, sleep=SleepConfig(passes=passes, chunk_len=chunk_len),
                dreaming=DreamingConfig(world=WORLD)), world


def params_of(cfg, seed=0):
  return nnx.to_pure_dict(nnx.state(model_factory(cfg)(nnx.Rngs(seed)), nnx.Param))


def test_roles_and_their_consumers_on_a_cms_hybrid():
  cfg, _ = hybrid_cms()
  r = roles.roles_for(cfg)
  params = params_of(cfg)
  assert roles.cms_levels(r) == 2 and roles.expert_slots(r) == 3
  for g, kind in enumerate(("gdn", "attn")):  # every layer's MLP is the level chain, tagged in both groups
    lv = r["groups"][g]["levels"]
    assert {lv[l]["mlp"]["w_up"].cms_level for l in (0, 1)} == {0, 1}
    assert lv[1]["experts"][2]["b"].expert_slot == 2 and lv[1]["experts"][2]["b"].cms_part == "expert"
    assert lv[1]["experts"][2]["active"].is_flag and lv[0]["norm"]["scale"].cms_part == "norm"
    assert lv[0]["mlp"]["w_down"].layer_kind == kind and lv[0]["mlp"]["w_down"].stacked
  # Optimizer: one label per CMS level (update_every), the rest elsewhere.
  tx, _ = make_optimizer(cfg)
  lab = roles.labels(r, lambda x: "rest" if x.cms_level is None else f"level{x.cms_level}")
  assert lab["groups"][0]["levels"][1]["experts"][0]["a"] == "level1"
  assert lab["groups"][1]["levels"][0]["mlp"]["w_up"] == "level0" and lab["groups"][0]["gdn"]["wq"] == "rest"
  jax.eval_shape(tx.init, params)
  # Expansion: a slot of the slow level, in every layer of both groups, with B = 0.
  p1 = expand.set_expert(params, r, 1, 1, active=True)
  for g in (0, 1):
    assert float(p1["groups"][g]["levels"][1]["experts"][1]["active"][0]) == 1.0
    assert float(p1["groups"][g]["levels"][0]["experts"][1]["active"][0]) == 0.0
    assert not np.asarray(p1["groups"][g]["levels"][1]["experts"][1]["b"]).any()
  assert expand.next_free_slot(p1, r, 1) == 0 and expand.next_free_slot(p1, r, 0) == 0
  assert expand.active_slots(p1, r, 1) == [1]
  assert expand.active_slots(expand.reset_level(p1, r, 1), r, 1) == []
  # Seeding's training labels: exactly that slot's trainable leaves, in both groups.
  tr = seed_steps.trainable(r, level=1, slot=1)
  picked = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_flatten_with_path(tr)[0] if v]
  assert len(picked) == 2 * 4 and all("['levels'][1]['experts'][1]" in k and "active" not in k for k in picked)
  assert {k.split("]")[1] for k in picked} == {"[0", "[1"}
  # Dreaming's forced experts set a slot's flag at every layer of each level.
  forced = D.force_experts(params, r, jnp.array([2, 0]))
  for g in (0, 1):
    assert float(forced["groups"][g]["levels"][0]["experts"][2]["active"][0]) == 1.0
    assert float(forced["groups"][g]["levels"][1]["experts"][0]["active"][0]) == 1.0
    assert float(forced["groups"][g]["levels"][1]["experts"][2]["active"][0]) == 0.0
  # LoRA targets: attention and GDN q / v, every level's up / down, no expert factors.
  ad = lora_lib.init(params, r, jax.random.key(0), 2)
  keys = {jax.tree_util.keystr(k[:-1]) for k, _ in jax.tree_util.tree_flatten_with_path(ad)[0]}
  assert "['groups'][0]['gdn']['wq']" in keys and "['groups'][1]['attn']['wv']" in keys
  assert {f"['groups'][{g}]['levels'][{l}]['mlp']['w_{p}']" for g in (0, 1) for l in (0, 1) for p in ("up", "down")} <= keys
  assert not any("experts" in k for k in keys)
  # The GDN warm-up mask covers the GDN layer's levels too (a whole decoder layer).
  mask = gdn_only_mask(r)
  assert all(jax.tree.leaves(mask["groups"][0]["levels"])) and not any(jax.tree.leaves(mask["groups"][1]["levels"]))


def test_mlp_key_is_checked_and_a_cms_hybrid_does_not_export(tmp_path):
  from sleep_jax.hf import HFError, registry

  with pytest.raises(ConfigError, match="'model.mlp'"):
    load_config(None, ["model.kind=hybrid", "model.mlp=moe"])
  with pytest.raises(ConfigError, match="'model.mlp'"):
    load_config(None, ["model.kind=cms", "model.mlp=swiglu"])
  for kind in ("hybrid", "transformer"):
    with pytest.raises(HFError, match=r"model.mlp='cms'") as err:
      registry.export_family(load_config(None, [f"model.kind={kind}", "model.mlp=cms"]).model)
    assert "\n" not in str(err.value)
  registry.export_family(load_config(None, ["model.kind=transformer"]).model)  # the same with SwiGLU exports


def test_dreaming_reads_through_the_sleeping_forward():
  """Every log-prob dreaming computes over a row that spans chunks (a passage, then QA) is
  models.forward's: sleep passes on the passage's chunks, their KV caches evicted; not one
  plain pass. Closed-book rows, within one chunk, are unaffected by it."""
  cfg, world = hybrid_cms(passes=3)
  assert sleeps(cfg) and world.passage_len - 1 == 2 * cfg.sleep.chunk_len
  graphdef, state = nnx.split(model_factory(cfg)(nnx.Rngs(1)))
  params = nnx.to_pure_dict(state)
  model = nnx.merge(graphdef, params)
  pairs = world.day_pairs(0)
  rows, rmask = (jnp.asarray(a) for a in world.reading_probes(pairs, world.facts.table[pairs[:, 0], pairs[:, 1]]))
  inputs, targets, tmask = losses.next_token(rows, rmask)
  want = jit(lambda t, m: forward(model, t, m, cfg)[0])(inputs, tmask)
  plain = jit(lambda t: model(t)[0])(inputs)  # the N = 1 function: no sleep passes
  assert np.abs(np.asarray(want - plain))[:, 40:].max() > 1e-3  # the sleep passes matter here
  loss = jit(lambda t, m: D.sft_loss(graphdef, params, t, m, cfg=cfg))(rows, rmask)
  np.testing.assert_allclose(float(loss), float(losses.masked_ce(want, targets, tmask)), rtol=1e-5)
  assert abs(float(loss) - float(losses.masked_ce(plain, targets, tmask))) > 1e-4
  # In-context accuracy and replay targets through the same forward.
  ok = (np.argmax(np.asarray(want), -1) == np.asarray(targets)) | (np.asarray(tmask) == 0)
  stmt = np.concatenate([np.ones_like(ok[:, :1]), ok], 1)[:, world.passage_len:]
  acc = jit(functools.partial(D.statement_accuracy, graphdef, start=world.passage_len, stmt_len=world.stmt_len,
                              cfg=cfg))(params, rows, rmask)
  assert float(acc) == pytest.approx(stmt.reshape(len(stmt), -1, world.stmt_len).all(-1).mean())
  span = world.qa_per_example * world.attr_len
  relabelled = jit(lambda t, m: D.greedy_targets(graphdef, params, t, m, span=span, cfg=cfg))(rows, rmask)
  i, _, m2 = losses.next_token(relabelled, rmask)
  infer = jit(lambda t, m: forward(model, t, m, cfg, training=False)[0])
  pred = np.argmax(np.asarray(infer(i, m2)), -1)
  np.testing.assert_array_equal(pred[np.asarray(m2) > 0], np.asarray(relabelled)[:, 1:][np.asarray(m2) > 0])
  # Dreams: greedy samples after `passage QUERY` (the sampler sleeps on each chunk as it
  # reads) are the forward's argmax over `passage QUERY dream`, and ReST-EM's loss is its CE.
  prompt = jnp.asarray(world.dream_prompt(0))
  dreams = jit(lambda p, k: D.sample_dreams(graphdef, p, prompt, k, cfg=cfg, m=2, length=world.dream_len,
                                            temperature=0.0, novelty=False))(params, jax.random.key(0))
  seq = jnp.concatenate([jnp.broadcast_to(prompt[:-1], (2, prompt.shape[0] - 1)), dreams], 1)
  P = prompt.shape[0]
  dm = jnp.broadcast_to((jnp.arange(seq.shape[1]) >= P).astype(jnp.int32), seq.shape)
  lg = infer(seq[:, :-1], dm[:, 1:])
  np.testing.assert_array_equal(np.argmax(np.asarray(lg), -1)[:, P - 1:], np.asarray(seq)[:, P:])
  gen = lora_lib.init(params, roles.roles_for(cfg), jax.random.key(3), 2)
  rest = jit(lambda g, d: D.rest_em_loss(graphdef, params, g, prompt, d, jnp.ones(2), alpha=4.0, cfg=cfg))(gen, dreams)
  np.testing.assert_allclose(float(rest), float(losses.masked_ce(lg, seq[:, 1:], dm[:, 1:])), rtol=1e-5)
  # A closed-book probe (one chunk) reads the same through either path.
  probes, pmask = (jnp.asarray(a) for a in world.probes(pairs))
  one_pass = dataclasses.replace(cfg, sleep=dataclasses.replace(cfg.sleep, passes=1))
  acc_f, loss_f = jit(lambda t, m: D.probe_scores(graphdef, params, t, m, cfg=cfg))(probes, pmask)
  acc_1, loss_1 = jit(lambda t, m: D.probe_scores(graphdef, params, t, m, cfg=one_pass))(probes, pmask)
  assert float(acc_f) == float(acc_1) and float(loss_f) == pytest.approx(float(loss_1), rel=1e-6)
