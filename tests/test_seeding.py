"""Knowledge seeding (paper B): CMS experts, expansion, divergences, imitation rewards, GRPO."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, subprocess_env
from sleep_jax import rng_streams
from sleep_jax import sharding as shd
from sleep_jax.config import ConfigError, load_config
from sleep_jax.models import model_factory, roles
from sleep_jax.seeding import distill, expand, imitate, steps
from sleep_jax.seeding import report
from sleep_jax.seeding.methods import check_methods
from sleep_jax.seeding import run as seed_run
from sleep_jax.seeding.pipeline import ModelOnMesh
from sleep_jax.train import Trainer

SEED_TINY = os.path.join(REPO, "experiments", "seed_tiny.yaml")


def _cfg(*extra):
  return load_config(SEED_TINY, list(extra))


def _params_with_trained_fast_expert(cfg, seed=0):
  """A CMS model whose fast expert is active with non-zero weights (as after the fast stage)."""
  make = model_factory(cfg)
  params = nnx.to_pure_dict(nnx.split(make(nnx.Rngs(seed)))[1])
  params = expand.set_expert(params, roles.roles_for(cfg), 0, 0, active=True)
  e = params["groups"][0]["levels"][0]["experts"][0]
  k1, k2 = jax.random.split(jax.random.key(seed + 1))
  e["b"] = 0.2 * jax.random.normal(k1, e["b"].shape)
  e["gate"] = 0.5 * jax.random.normal(k2, e["gate"].shape)
  return make, params


def _logits(cfg, params, tokens):
  graphdef = shd.abstract_model(model_factory(cfg))[0]
  return nnx.merge(graphdef, params)(tokens)[0]


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 40, (4, 6)))


@pytest.mark.parametrize("top_k", [0, 2])
def test_expert_activation_preserves_logits(top_k):
  cfg = _cfg(f"model.cms.top_k={top_k}")
  _, params = _params_with_trained_fast_expert(cfg)
  before = _logits(cfg, params, TOKENS)
  for level in (0, 1):
    slot = expand.next_free_slot(params, roles.roles_for(cfg), level)
    after = _logits(cfg, expand.set_expert(params, roles.roles_for(cfg), level, slot, active=True), TOKENS)
    assert float(jnp.max(jnp.abs(after - before))) <= 1e-5
  # ... and the activated expert does change the function once B moves away from 0.
  p2 = expand.set_expert(params, roles.roles_for(cfg), 1, 0, active=True)
  p2["groups"][0]["levels"][1]["experts"][0]["b"] = jnp.ones_like(p2["groups"][0]["levels"][1]["experts"][0]["b"])
  assert float(jnp.max(jnp.abs(_logits(cfg, p2, TOKENS) - before))) > 1e-3


@pytest.mark.parametrize("attn_conv", [0, 3])
def test_model_growth_preserves_logits(attn_conv):
  cfg = _cfg(f"model.attn_conv={attn_conv}")  # the short conv is depthwise: tiled, never divided
  _, params = _params_with_trained_fast_expert(cfg)
  params = expand.set_expert(params, roles.roles_for(cfg), 1, 0, active=True)
  scfg = expand.student_config(cfg)
  assert scfg.model.d_model == 2 * cfg.model.d_model and scfg.model.n_layers == cfg.model.n_layers + 1
  big = nnx.to_pure_dict(nnx.split(model_factory(scfg)(nnx.Rngs(5)))[1])
  grown = expand.grow_params(params, roles.roles_for(cfg), big, width=2)
  diff = jnp.abs(_logits(scfg, grown, TOKENS) - _logits(cfg, params, TOKENS))
  assert float(jnp.max(diff)) <= 1e-5
  # The appended layer is an identity: zero output projections, no active expert.
  last = jax.tree.map(lambda a: a[-1], grown["groups"][0])
  assert not np.any(np.asarray(last["attn"]["wo"])) and not np.any(np.asarray(last["levels"][0]["mlp"]["w_down"]))


def test_experts_warm_started_from_the_mlp_preserve_logits_and_copy_its_gate_columns():
  cfg = _cfg()
  R = roles.roles_for(cfg)
  _, params = _params_with_trained_fast_expert(cfg)
  for slot in (0, 1):
    params = expand.set_expert(params, R, 1, slot, active=True)
  before = _logits(cfg, params, TOKENS)
  warm = expand.init_experts_from_mlp(params, R, 1, [0, 1])
  chex.assert_trees_all_close(_logits(cfg, warm, TOKENS), before, atol=1e-6)  # B = 0: same function
  level = warm["groups"][0]["levels"][1]
  gate, r = np.asarray(level["mlp"]["w_gate"]), cfg.model.cms.rank
  for j in (0, 1):  # [layers, d, r]: slot j holds neurons j*r .. (j+1)*r - 1 of every layer
    np.testing.assert_array_equal(np.asarray(level["experts"][j]["a"]), gate[..., j * r:(j + 1) * r])
  # The fast level and the untouched parts are the same arrays as before.
  chex.assert_trees_all_equal(warm["groups"][0]["levels"][0], params["groups"][0]["levels"][0])
  chex.assert_trees_all_equal(level["mlp"], params["groups"][0]["levels"][1]["mlp"])


def test_a_closed_router_start_preserves_logits_and_closes_only_those_gates():
  cfg = _cfg()
  R = roles.roles_for(cfg)
  _, params = _params_with_trained_fast_expert(cfg)
  for slot in (0, 1):
    params = expand.set_expert(params, R, 1, slot, active=True)
  closed = expand.set_router_bias(params, R, 1, [1], -4.0)
  chex.assert_trees_all_close(_logits(cfg, closed, TOKENS), _logits(cfg, params, TOKENS), atol=0)  # B = 0
  experts = closed["groups"][0]["levels"][1]["experts"]
  np.testing.assert_array_equal(np.asarray(experts[1]["bias"]), -4.0)
  np.testing.assert_array_equal(np.asarray(experts[0]["bias"]), np.asarray(params["groups"][0]["levels"][1]["experts"][0]["bias"]))
  chex.assert_trees_all_equal(closed["groups"][0]["levels"][0], params["groups"][0]["levels"][0])


def test_reset_level_removes_the_fast_expert():
  cfg = _cfg()
  _, params = _params_with_trained_fast_expert(cfg)
  plain = expand.set_expert(params, roles.roles_for(cfg), 0, 0, active=False)
  reset = expand.reset_level(params, roles.roles_for(cfg), 0)
  chex.assert_trees_all_close(_logits(cfg, reset, TOKENS), _logits(cfg, plain, TOKENS), atol=0)
  assert expand.active_slots(reset, roles.roles_for(cfg), 0) == []


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_divergences_match_numpy(kind):
  rng = np.random.default_rng(1)
  t, s = rng.normal(size=(2, 3, 7)) * 2, rng.normal(size=(2, 3, 7)) * 2
  tau, beta = 1.5, 0.3
  p, q = np.exp(_np_log_softmax(t / tau)), np.exp(_np_log_softmax(s / tau))
  kl = lambda a, b: np.sum(a * (np.log(a) - np.log(b)), -1)
  m = beta * p + (1 - beta) * q
  expected = {"fkl": kl(p, q), "rkl": kl(q, p), "jsd": beta * kl(p, m) + (1 - beta) * kl(q, m)}[kind]
  got = distill.token_divergence(jnp.asarray(t), jnp.asarray(s), kind, beta=beta, temperature=tau)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
  same = distill.token_divergence(jnp.asarray(t), jnp.asarray(t), kind, beta=beta, temperature=tau)
  np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)


def test_levenshtein_and_reward_on_known_strings():
  enc = lambda s, n: jnp.asarray([ord(c) for c in s] + [0] * (n - len(s)))
  lev = lambda a, b: int(imitate.levenshtein(enc(a, 8), enc(b, 8), len(a), len(b)))
  assert lev("kitten", "sitting") == 3 and lev("flaw", "lawn") == 2 and lev("", "abc") == 3 and lev("same", "same") == 0
  comp = jnp.stack([enc("abcd", 4), enc("abxd", 4), enc("dcba", 4)])
  dream = jnp.stack([enc("abcd", 4)] * 3)
  r, r_abs = imitate.imitation_reward(comp, dream, jnp.array([4, 4, 4]), z0=2, r_sem_B=jnp.array([1.0, 0.0, 0.0]),
                                      gamma=0.5)
  # lev = 0, 1, 4: r_abs = 1, 0.75, 0 (4 > z0); r = 0.5 r_sem + 0.5 r_abs
  np.testing.assert_allclose(np.asarray(r_abs), [1.0, 0.75, 0.0])
  np.testing.assert_allclose(np.asarray(r), [1.0, 0.375, 0.0])


def test_grpo_advantages_and_clipping_by_hand():
  adv = imitate.group_advantages(jnp.array([[1.0, 0.0, 0.0, 1.0]]), eps=0.0)
  np.testing.assert_allclose(np.asarray(adv), [[1.0, -1.0, -1.0, 1.0]])
  # Two one-token sequences: ratio 1.5 with A=+1 is clipped to 1.2; ratio 0.5 with A=-1 to 0.8,
  # and min(0.5 * -1, 0.8 * -1) = -0.8. KL term off.
  logp = jnp.log(jnp.array([[1.5], [0.5]]))
  loss, stats = imitate.grpo_loss(logp, jnp.zeros((2, 1)), logp, jnp.array([1.0, -1.0]), jnp.ones((2, 1)),
                                  clip_eps=0.2, kl_coef=0.0)
  np.testing.assert_allclose(float(loss), -(1.2 + -0.8) / 2, rtol=1e-6)
  assert float(stats["clip_frac"]) == 1.0 and float(stats["kl"]) == 0.0


def test_ks_step_trains_only_the_new_expert():
  cfg = _cfg("seeding.batch_size=8", "seeding.group_size=4")
  scfg = expand.student_config(cfg)
  t = ModelOnMesh(cfg, shd.make_mesh(cfg.mesh))
  s = ModelOnMesh(scfg, shd.make_mesh(load_config(None, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]).mesh))
  _, tp = _params_with_trained_fast_expert(cfg)
  sp = expand.set_expert(s.init(3), s.roles, 1, 0, active=True)
  # Two slow experts trained together (seeding.experts = 2): the new one and the next free slot.
  slots = seed_run.expansion_slots(sp, s.roles, 1, 2)
  assert slots == [0, 1]
  sp = expand.set_expert(sp, s.roles, 1, 1, active=True)
  train = steps.trainable(s.roles, level=1, slot=slots)
  tx = steps.masked_optimizer(train, 1e-2, 10)
  _, _, make = s.train_state(tx, rng_streams.raw_key(0, "test"))
  state = make(sp)
  before = jax.device_get(state["params"])
  fn = jax.jit(lambda st, tp, rp, b: steps.ks_step(s.graphdef, t.graphdef, tx, cfg, scfg, {"lam": 0.5, "alpha": 0.5, "lam_warmup": 4},
                                                   st, tp, rp, b, gather=s.rep))
  toks = np.random.default_rng(0).integers(4, 40, (8, 6)).astype(np.int32)
  batch = {"tokens": jnp.asarray(toks), "loss_mask": jnp.asarray(np.tile([0, 0, 0, 1, 1, 1], (8, 1)))}
  lams = []
  for _ in range(2):  # step 0 has lr 0 (warm-up)
    state, metrics = fn(state, tp, sp, batch)
    lams.append(float(metrics["lambda"]))
  assert lams == [0.5 * 1 / 4, 0.5 * 2 / 4]  # lambda ramps over lam_warmup steps
  assert np.isfinite(float(metrics["loss"])) and "reward" in metrics
  after = jax.device_get(state["params"])
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
  assert any(jax.tree.leaves(train)) and not all(jax.tree.leaves(train))
  for path, on in jax.tree_util.tree_flatten_with_path(train)[0]:
    m = dict(jax.tree_util.tree_flatten_with_path(moved)[0])[path]
    if not on:
      assert not m, f"frozen {jax.tree_util.keystr(path)} changed"
  assert moved["groups"][0]["levels"][1]["experts"][0]["b"] and moved["groups"][0]["levels"][1]["experts"][1]["b"]
  with pytest.raises(ConfigError, match="seeding.experts"):
    seed_run.expansion_slots(sp, s.roles, 1, 2)  # 2 slots, both active: only the last can train


def test_cms_levels_update_at_their_frequencies():
  cfg = load_config(SEED_TINY, ["model.cms.update_every=[1,3]", "train.warmup_steps=0", "train.steps=10"])
  tr = Trainer(cfg)
  state = tr.init_state()
  toks = np.random.default_rng(0).integers(4, 40, (32, 6)).astype(np.int32)
  batch = {"tokens": jnp.asarray(toks), "loss_mask": jnp.ones((32, 6), jnp.int32)}
  w = lambda st, lvl: np.asarray(st["params"]["groups"][0]["levels"][lvl]["mlp"]["w_up"])
  history = [jax.device_get(state)]
  for _ in range(3):
    state, _ = tr.train_step(state, batch)
    history.append(jax.device_get(state))
  fast = [not np.array_equal(w(a, 0), w(b, 0)) for a, b in zip(history, history[1:])]
  slow = [not np.array_equal(w(a, 1), w(b, 1)) for a, b in zip(history, history[1:])]
  assert fast == [True, True, True] and slow == [False, False, True]


@pytest.mark.slow
def test_seed_cli_student_on_another_mesh_runs_and_resumes(tmp_path):
  run = tmp_path / "seed"
  cmd = [sys.executable, "-m", "sleep_jax.cli", "seed", SEED_TINY, f"run_dir={run}", "train.steps=20",
         "seeding.fast_steps=10", "seeding.steps=4", "checkpoint.every=10", "mesh.data=8",
         "seeding.student_mesh.data=1", "seeding.student_mesh.fsdp=4", "seeding.student_mesh.tensor=2",
         "seeding.methods=[teacher,expanded,ks,no_expansion]"]
  out = subprocess.run(cmd, env=subprocess_env(8), cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads((run / "results.json").read_text())
  assert [r["method"] for r in rows] == ["teacher", "expanded", "ks", "no_expansion"]
  assert all(r["expansion_max_abs_diff"] <= 1e-5 for r in rows)
  for name in ("results.md", "results.png", "teacher/pretrain/metrics.jsonl", "methods/ks/metrics.jsonl"):
    assert (run / name).exists(), name
  ks_metrics = [json.loads(l) for l in (run / "methods/ks/metrics.jsonl").read_text().splitlines()]
  assert {"distill_off", "distill_on", "reward", "grpo_loss"} <= set(ks_metrics[-1])
  # Re-running resumes: every stage is found finished and the same rows come back.
  again = subprocess.run(cmd, env=subprocess_env(8), cwd=REPO, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads((run / "results.json").read_text()) == rows
  bad = subprocess.run(cmd[:-1] + ["seeding.methods=[ks,dream]"], env=subprocess_env(8), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "unknown method 'dream'" in bad.stderr and "Traceback" not in bad.stderr


def test_over_seeds_reports_mean_and_spread_per_method():
  per_seed = [[{"method": "ks", "accuracy": a, "new_accuracy": n, "old_accuracy": 1.0, "divergence_to_teacher": 0.1,
                "wall_s": 2.0}] for a, n in ((0.5, 0.25), (0.7, 0.75))]
  (row,) = seed_run.over_seeds(per_seed)
  assert row["method"] == "ks" and row["seeds"] == 2 and row["wall_s"] == 4.0
  assert row["accuracy"] == 0.6 and row["accuracy_std"] == 0.1
  assert row["new_accuracy"] == 0.5 and row["new_accuracy_std"] == 0.25 and row["old_accuracy_std"] == 0.0
  assert [r["new_accuracy"] for r in row["per_seed"]] == [0.25, 0.75]
  assert "0.500 ± 0.250" in report.markdown([row])


@pytest.mark.parametrize("which", ["all", "new"])
def test_teacher_samples_prompt_the_chosen_facts(tmp_path, which):
  from sleep_jax.data.facts import FactWorld
  from sleep_jax.seeding.pipeline import teacher_samples
  cfg = _cfg(f"run_dir={tmp_path}", "seeding.samples=64", f"seeding.sample_facts={which}")
  world = FactWorld(**cfg.seeding.facts)
  t = ModelOnMesh(cfg, shd.make_mesh(cfg.mesh))
  d = teacher_samples(cfg, world, t, t.init(0))
  assert d["tokens"].shape[0] == 64 and (tmp_path / "teacher_samples.npz").exists()
  entities = set((d["tokens"][:, 1] - world.ent(0)).tolist())
  assert entities <= set(world.entities(which).tolist())
  old = set(world.entities("old").tolist())
  assert (entities & old) if which == "all" else not (entities & old)
  with pytest.raises(ConfigError, match="seeding.sample_facts"):
    check_methods(_cfg("seeding.sample_facts=old").seeding)
