"""Dreaming (paper B): isolated copies, selection, ReST-EM, LoRA, the continual-learning world."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import REPO, subprocess_env
from sleep_jax import sharding as shd
from sleep_jax.config import load_config
from sleep_jax.data.days import DayWorld
from sleep_jax.data.facts import QUERY, SEP
from sleep_jax.dreaming import dreams as D
from sleep_jax.dreaming import lora as lora_lib
from sleep_jax.dreaming.harness import run_day, sft_loop
from sleep_jax.models import model_factory, roles
from sleep_jax.seeding import expand

DREAM_TINY = os.path.join(REPO, "experiments", "dream_tiny.yaml")


@pytest.fixture(scope="module")
def model():
  cfg = load_config(DREAM_TINY)
  make = model_factory(cfg)
  graphdef = shd.abstract_model(make)[0]
  return cfg, graphdef, nnx.to_pure_dict(nnx.split(make(nnx.Rngs(0)))[1]), DayWorld(**cfg.dreaming.world)


def _dream_batch(world, n, seed=0):
  rng = np.random.default_rng(seed)
  pairs = np.stack([rng.integers(0, world.n_old + world.n_pool, (n, world.qa_per_example)),
                    rng.integers(0, world.n_relations, (n, world.qa_per_example))], -1)
  qa = np.stack([world.qa(p, world.facts.table[p[:, 0], p[:, 1]]).reshape(-1) for p in pairs])
  return D.closed_book(jnp.asarray(qa), jnp.asarray(world.attr_mask(world.qa_per_example)))


def _train_merged(graphdef, params, adapter, tokens_T, mask_T, *, steps, lr, alpha, cfg):
  """The oracle copy: LoRA SFT through the merged weight W + (alpha / r) A B."""
  tx = optax.adam(lr)
  loss = lambda ad: D.sft_loss(graphdef, lora_lib.apply(params, ad, alpha=alpha), tokens_T[None], mask_T[None], cfg=cfg)
  ad, opt = adapter, tx.init(adapter)
  for _ in range(steps):
    upd, opt = tx.update(jax.grad(loss)(ad), opt, ad)
    ad = optax.apply_updates(ad, upd)
  return ad


def test_vmapped_copies_equal_training_each_copy_alone(model):
  """The batched copies (unmerged adapters, base weights unbatched) equal each copy trained
  alone, and the oracle that trains through the merged weights."""
  cfg, graphdef, params, world = model
  tokens, mask = _dream_batch(world, 3)
  adapters = jax.vmap(lambda k: lora_lib.init(params, roles.roles_for(cfg), k, 4))(jax.random.split(jax.random.key(1), 3))
  kw = dict(steps=4, lr=1e-2, alpha=8.0, cfg=cfg)
  together = jax.jit(jax.vmap(lambda a, t, m: D.train_copy(graphdef, params, a, t, m, **kw)))(adapters, tokens, mask)
  alone = jax.jit(lambda a, t, m: D.train_copy(graphdef, params, a, t, m, **kw))
  merged = jax.jit(lambda a, t, m: _train_merged(graphdef, params, a, t, m, **kw))
  for i in range(3):
    one = jax.tree.map(lambda a: a[i], adapters)
    for ref in (alone(one, tokens[i], mask[i]), merged(one, tokens[i], mask[i])):
      for x, y in zip(jax.tree.leaves(jax.tree.map(lambda a: a[i], together)), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
  # The copies really trained (B left 0) and differ from each other.
  b = [np.asarray(x) for x in jax.tree.leaves(jax.tree.map(lambda ab: ab["b"], together, is_leaf=lambda t: "b" in t))]
  assert all(np.abs(x).max() > 0 for x in b) and not np.allclose(b[0][0], b[0][1])


def test_selection_is_top_k_plus_b_random_deterministic():
  scores = np.array([0.1, 5.0, 0.3, 4.0, 0.2, 3.0, 0.05, 0.4])
  a = D.select(scores, 3, 2, np.random.default_rng(7))
  assert a.tolist() == D.select(scores, 3, 2, np.random.default_rng(7)).tolist()
  assert {1, 3, 5} <= set(a.tolist()) and len(a) == 5 and len(set(a.tolist())) == 5
  others = [tuple(D.select(scores, 3, 2, np.random.default_rng(s)).tolist()) for s in range(20)]
  assert len(set(others)) > 1  # the b extras are random
  assert D.select(scores, 8, 3, np.random.default_rng(0)).tolist() == list(range(8))


def test_rest_em_update_uses_only_rewarded_dreams(model):
  cfg, graphdef, params, world = model
  prompt = jnp.asarray(world.dream_prompt(0))
  tokens, _ = _dream_batch(world, 4)
  dreams = tokens[:, 1:]  # QUERY ...
  gen = lora_lib.init(params, roles.roles_for(cfg), jax.random.key(2), 4)
  gen = jax.tree.map(lambda a: a + 0.01, gen)  # B != 0 so both factors get gradients
  weights = jnp.array([1.0, 0.0, 1.0, 0.0])
  grad = lambda d: jax.grad(lambda a: D.rest_em_loss(graphdef, params, a, prompt, d, weights, alpha=8.0, cfg=cfg))(gen)
  scrambled = dreams.at[1].set(dreams[0]).at[3].set(jnp.flip(dreams[3]))  # change only unrewarded rows
  for x, y in zip(jax.tree.leaves(grad(dreams)), jax.tree.leaves(grad(scrambled))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-7)
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(grad(dreams)))


def test_lora_apply_matches_manual_merge(model):
  cfg, _, params, _ = model
  ad = lora_lib.init(params, roles.roles_for(cfg), jax.random.key(0), 4)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(lora_lib.apply(params, ad, alpha=8.0))))
  # Targets chosen by role: queries, values, every MLP's up/down (CMS levels too), no experts.
  adapted = {jax.tree_util.keystr(p[:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(ad)[0]}
  assert "['groups'][0]['attn']['wq']" in adapted and "['groups'][0]['levels'][1]['mlp']['w_down']" in adapted
  assert not any("experts" in k or "wk" in k or "w_gate" in k for k in adapted)
  one = ad["groups"][0]["attn"]["wq"]
  one["b"] = jnp.ones_like(one["b"])
  w = params["groups"][0]["attn"]["wq"]
  expected = w + 2.0 * jnp.einsum("lir,lro->lio", one["a"], one["b"]).reshape(w.shape)
  np.testing.assert_allclose(np.asarray(lora_lib.apply(params, ad, alpha=8.0)["groups"][0]["attn"]["wq"]),
                             np.asarray(expected), rtol=1e-6)


def test_novelty_expert_only_matters_once_it_holds_something(model):
  cfg, graphdef, params, world = model
  tokens, _ = _dream_batch(world, 2)
  f = lambda p: nnx.merge(graphdef, p)(tokens)[0]
  forced = D.force_experts(params, roles.roles_for(cfg), jnp.array([1, 2]))
  np.testing.assert_array_equal(np.asarray(f(forced)), np.asarray(f(params)))  # slots still at B = 0
  filled = jax.tree.map(lambda x: x, params)
  filled["groups"][0]["levels"][1]["experts"][2]["b"] = jnp.ones_like(filled["groups"][0]["levels"][1]["experts"][2]["b"])
  assert float(jnp.abs(f(D.force_experts(filled, roles.roles_for(cfg), jnp.array([1, 2]))) - f(filled)).max()) > 1e-3


def test_sft_loop_moves_only_trainable_leaves(model):
  cfg, graphdef, params, world = model
  tokens, mask = _dream_batch(world, 2)
  p = expand.set_expert(params, roles.roles_for(cfg), 1, 0, active=True)
  trainable = jax.tree_util.tree_map_with_path(lambda path, _: jnp.float32(
      "['levels'][1]['experts'][0]" in jax.tree_util.keystr(path) and "active" not in jax.tree_util.keystr(path)), p)
  out = sft_loop(graphdef, p, tokens, mask, trainable, lr=1e-2, steps=3, cfg=cfg)
  for (path, a), b, t in zip(jax.tree_util.tree_flatten_with_path(p)[0], jax.tree.leaves(out), jax.tree.leaves(trainable)):
    if float(t) == 0:
      assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
  assert not np.array_equal(np.asarray(p["groups"][0]["levels"][1]["experts"][0]["b"]),
                            np.asarray(out["groups"][0]["levels"][1]["experts"][0]["b"]))


def test_minibatch_write_draws_rows_by_loss_weight(model):
  """With all loss weight on one row, every drawn minibatch is copies of that row: the
  minibatched write equals full-batch training on that row alone (a weight-0 row is never
  drawn)."""
  cfg, graphdef, params, world = model
  tokens, mask = _dream_batch(world, 3, seed=2)
  mask = mask * jnp.array([0, 1, 0])[:, None]
  ones = jax.tree.map(lambda _: jnp.float32(1), params)
  mb = sft_loop(graphdef, params, tokens, mask, ones, jax.random.key(4), lr=1e-2, steps=3, batch=5, cfg=cfg)
  # The row alone, as a batch of the minibatch's size (5 copies: the same mean loss), so both
  # sides run the same kernels and differ only if a drawn row is not row 1.
  alone = sft_loop(graphdef, params, tokens[jnp.array([1] * 5)], mask[jnp.array([1] * 5)], ones, lr=1e-2, steps=3, cfg=cfg)
  for a, b in zip(jax.tree.leaves(mb), jax.tree.leaves(alone)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_probes_are_answerable_from_their_passages():
  world = DayWorld(days=3, per_day=6)
  for day in range(world.days):
    passage = world.day_passage(day)[1:].reshape(-1, 2 + world.attr_len + 1)
    assert np.all(passage[:, -1] == SEP)
    stated = {(int(r[0]), int(r[1])): tuple(r[2:-1]) for r in passage}
    probes, mask = world.probes(world.day_pairs(day))
    assert len(probes) == world.per_day * world.n_relations
    for row, m in zip(probes, mask):  # BOS QUERY e r a..: the answer is written in the passage
      assert row[1] == QUERY and stated[(int(row[2]), int(row[3]))] == tuple(row[m == 1])
  days = [set(world.day_entities(d).tolist()) for d in range(world.days)]
  assert all(not (a & b) for i, a in enumerate(days) for b in days[i + 1:])
  assert all(min(d) >= world.n_old for d in days)  # new facts never were old facts
  tokens, mask = world.pretrain_batch(0, 0, 4)
  assert tokens.max() < world.vocab_size and mask.sum() > 0 and tokens.shape == (4, world.passage_len + world.dream_len)


@pytest.mark.slow
def test_dream_cli_runs_resumes_and_rejects_bad_methods(tmp_path):
  run = tmp_path / "dream"
  cmd = [sys.executable, "-m", "sleep_jax.cli", "dream", DREAM_TINY, f"run_dir={run}", "train.steps=10",
         "dreaming.write_steps=3", "mesh.data=2"]
  out = subprocess.run(cmd, env=subprocess_env(2), cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads((run / "results.json").read_text())
  speed = json.loads((run / "vmap_speedup.json").read_text())
  assert [r["method"] for r in rows] == ["base", "finetune", "dream", "sleep"]
  assert speed["max_abs_diff"] < 1e-4 and speed["speedup"] > 0
  base = rows[0]
  assert base["backward_transfer"] == 0.0 and base["forgetting"] == 0.0  # no update, nothing moves
  assert (run / "results.png").exists() and (run / "methods/sleep/seed0/day1.json").exists()
  reading_mtime = (run / "base_reading.json").stat().st_mtime_ns
  again = subprocess.run(cmd, env=subprocess_env(2), cwd=REPO, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0 and json.loads((run / "results.json").read_text()) == rows
  assert (run / "base_reading.json").stat().st_mtime_ns == reading_mtime  # measured once, read back on resume
  # More dreaming seeds on a finished run: seed 0 is read back, seed 1 added (no refusal).
  more = subprocess.run(cmd + ["dreaming.methods=[base]", "dreaming.seeds=2"], env=subprocess_env(2), cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  assert more.returncode == 0, more.stderr[-3000:]
  (grown,) = json.loads((run / "results.json").read_text())
  assert grown["seeds"] == 2 and grown["per_seed"][0] == base["per_seed"][0]
  assert (run / "methods/base/seed1/day1.json").exists()
  bad = subprocess.run(cmd + ["dreaming.methods=[base,nap]"], env=subprocess_env(2), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2 and "unknown method 'nap'" in bad.stderr and "Traceback" not in bad.stderr


def test_replay_targets_are_the_models_own_greedy_beliefs(model):
  """greedy_targets rewrites only masked positions, to a fixed point of the model's argmax
  (each target conditioned on the relabelled ones before it)."""
  cfg, graphdef, params, world = model
  tokens, mask = _dream_batch(world, 4, seed=3)
  span = int(np.asarray(mask[0]).sum())
  out = jax.jit(lambda t, m: D.greedy_targets(graphdef, params, t, m, span=span, cfg=cfg))(tokens, mask)
  target = np.asarray(mask[:, 1:]).astype(bool)
  np.testing.assert_array_equal(np.asarray(out)[:, 1:][~target], np.asarray(tokens)[:, 1:][~target])
  np.testing.assert_array_equal(np.asarray(out)[:, 0], np.asarray(tokens)[:, 0])
  pred = np.asarray(jnp.argmax(nnx.merge(graphdef, params)(out[:, :-1])[0], -1))
  np.testing.assert_array_equal(pred[target], np.asarray(out)[:, 1:][target])
  assert (np.asarray(out) != np.asarray(tokens)).any()  # an untrained model disagrees with the table


def test_sleep_writes_the_rewarded_dreams_of_every_round():
  """run_day('sleep') writes what every round rewarded (weights kept), not the last round's only."""
  class FakeDreamer:  # round r dreams two texts of token r; the first of each is rewarded
    cfg = SimpleNamespace(dreaming=SimpleNamespace(rounds=2, generator="carried", memory=0))
    rests, written = [], None

    def sleep_round(self, params, gen, opt, day, rng, np_rng, *, rest):
      self.rests.append(rest)
      r = len(self.rests) - 1
      return gen, opt, jnp.full((2, 3), r), jnp.ones((2, 3), jnp.int32), jnp.array([1.0, 0.0])

    def write_expert(self, params, tokens, mask, weights, rng, day, memory=None):
      self.written = (np.asarray(tokens), np.asarray(weights))
      return params

  d = FakeDreamer()
  _, info = run_day(d, "sleep", {"params": {}, "gen": None, "opt": None}, 0, 0)
  tokens, weights = d.written
  assert d.rests == [True, True, False] and info["rewarded_dreams"] == [1.0, 1.0, 1.0]
  assert tokens[:, 0].tolist() == [0, 0, 1, 1, 2, 2] and weights.tolist() == [1, 0, 1, 0, 1, 0]


def test_rotations_put_every_statement_at_every_position():
  """Rotation k of a text holds statement (j - k) mod n at slot j, with BOS kept, and the
  closed-book loss mask maps onto itself."""
  world = DayWorld(n_old=8, n_pool=8, n_relations=1, attr_len=2, n_symbols=6, days=2, per_day=4, qa_per_example=3)
  tokens, mask = _dream_batch(world, 2, seed=5)
  S, n = world.stmt_len, world.qa_per_example
  rot = np.asarray(D.rotations(tokens, S))
  assert rot.shape == (n * 2, tokens.shape[1])
  stmts = np.asarray(tokens)[:, 1:].reshape(2, n, S)
  for k in range(n):
    for b in range(2):
      row = rot[k * 2 + b]
      assert row[0] == np.asarray(tokens)[b, 0]
      for j in range(n):
        np.testing.assert_array_equal(row[1 + j * S:1 + (j + 1) * S], stmts[b, (j - k) % n])
  np.testing.assert_array_equal(np.asarray(D.rotations(mask, S)), np.tile(np.asarray(mask), (n, 1)))


def test_rows_report_the_mean_and_spread_over_dreaming_seeds():
  from sleep_jax.dreaming.run import over_seeds, summarize
  R0, R1 = np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([[0.5, 0.0], [0.5, 1.0]])
  per_seed = [{"method": "sleep", **summarize(R, old), "wall_s": 2.0, "per_day_new": [R[0, 0], R[1, 1]],
               "per_day_old": [1.0, old]} for R, old in ((R0, 0.75), (R1, 0.25))]
  assert per_seed[0]["backward_transfer"] == -0.5 and per_seed[1]["forgetting"] == 0.0
  row = over_seeds(per_seed)
  assert row["seeds"] == 2 and row["wall_s"] == 4.0
  assert row["new_accuracy"] == 0.75 and row["new_accuracy_std"] == 0.0  # (1 + .5) / 2 and (.5 + 1) / 2
  assert row["old_accuracy"] == 0.5 and row["old_accuracy_std"] == 0.25
  assert row["backward_transfer"] == -0.25 and row["per_day_new"] == [0.75, 0.75]
  assert [r["old_accuracy"] for r in row["per_seed"]] == [0.75, 0.25]


def test_reading_replay_rows_are_the_dreams_back_in_context(model):
  """Each row is the day's passage then the dream; only the dream's attribute symbols are
  targets, relabelled to the model's own greedy reading; every other token is kept."""
  from sleep_jax.dreaming.harness import Dreamer
  cfg, graphdef, params, world = model
  tokens, _ = _dream_batch(world, 3, seed=4)
  rows, mask = Dreamer(cfg, graphdef, world).reading_rows(params, 1, tokens)
  rows, mask = np.asarray(rows), np.asarray(mask)
  P = world.passage_len
  assert rows.shape == (3, P + tokens.shape[1] - 1) and mask.shape == rows.shape
  np.testing.assert_array_equal(rows[:, :P], np.broadcast_to(world.day_passage(1), (3, P)))
  np.testing.assert_array_equal(mask[:, P:], np.broadcast_to(world.attr_mask(world.qa_per_example), (3, rows.shape[1] - P)))
  assert mask[:, :P].sum() == 0
  kept = mask[:, P:] == 0
  np.testing.assert_array_equal(rows[:, P:][kept], np.asarray(tokens)[:, 1:][kept])
  pred = np.asarray(jnp.argmax(nnx.merge(graphdef, params)(jnp.asarray(rows[:, :-1]))[0], -1))
  np.testing.assert_array_equal(pred[mask[:, 1:] == 1], rows[:, 1:][mask[:, 1:] == 1])


def _tiny(model, *overrides):
  cfg = load_config(DREAM_TINY, list(overrides))
  return cfg, model[1], model[2], DayWorld(**cfg.dreaming.world)


@pytest.mark.parametrize("generator", ["per_day", "carried"])
def test_per_day_generator_starts_every_night_fresh(model, generator):
  """dreaming.generator=per_day: each night's first round sees a fresh generator LoRA and
  Adam state (what day 0 starts from), whatever earlier nights' ReST-EM did; carried: the
  last night's."""
  from sleep_jax.dreaming.harness import Dreamer
  cfg, graphdef, params, world = _tiny(model, f"dreaming.generator={generator}", "dreaming.memory=0")

  class Recorder(Dreamer):
    seen = []

    def sleep_round(self, params, gen, opt, day, rng, np_rng, *, rest):
      self.seen.append((day, gen, opt))  # ReST-EM stand-in: every round moves the adapter and its state
      gen, opt = jax.tree.map(lambda x: x + 1.0, gen), jax.tree.map(lambda x: x + 1 if hasattr(x, "shape") else x, opt)
      t, m = _dream_batch(world, 2)
      return gen, opt, t, m, jnp.ones(2)

    def write_expert(self, params, tokens, mask, weights, rng, day, memory=None):
      return params

  d = Recorder(cfg, graphdef, world)
  fresh_gen, fresh_opt = d.fresh_generator(params, 7)
  state = {"params": params, "gen": fresh_gen, "opt": fresh_opt}
  ends = []
  for day in range(2):
    state, _ = run_day(d, "sleep", state, day, 7)
    ends.append((state["gen"], state["opt"]))
  starts = [(g, o) for i, (day, g, o) in enumerate(d.seen) if i % (cfg.dreaming.rounds + 1) == 0]
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(starts[0], (fresh_gen, fresh_opt))
  assert same(starts[1], (fresh_gen, fresh_opt)) == (generator == "per_day")
  if generator == "carried":
    assert same(starts[1], ends[0])


def test_memory_keeps_weighted_dreams_covering_pairs_and_rehearses_greedy_beliefs(model):
  """remember keeps only rows of weight > 0, at most `memory`, covering the night's distinct
  (entity, relation) pairs; a later write rehearses those rows with the model's greedy
  beliefs as targets (weight 1), empty slots weigh nothing."""
  from sleep_jax.dreaming.harness import Dreamer
  cfg, graphdef, params, world = _tiny(model, "dreaming.memory=2", "dreaming.replay=0", "dreaming.reading_replay=false",
                                       "dreaming.rotate=false")
  d = Dreamer(cfg, graphdef, world)
  tokens, mask = _dream_batch(world, 5, seed=2)
  # Row 3 repeats row 1's pairs: after row 1 (or 3) it adds nothing, so the other is never picked.
  tokens = tokens.at[3].set(tokens[1])
  weights = jnp.array([0.0, 1.0, 0.0, 1.0, 1.0])
  mem = d.remember(d.empty_memory(), tokens, weights, 0, np.random.default_rng(0))
  assert mem["tokens"].shape[0] == world.days * 2
  kept = {tuple(r) for r in np.asarray(mem["tokens"][:2])}
  assert np.asarray(mem["weights"]).tolist() == [1, 1, 0, 0]
  assert tuple(np.asarray(tokens[4])) in kept and len(kept) == 2 and tuple(np.asarray(tokens[0])) not in kept
  mem = d.remember(mem, tokens[4:], jnp.ones(1), 1, np.random.default_rng(0))  # a night with one row: one slot left empty
  assert np.asarray(mem["weights"]).tolist() == [1, 1, 1, 0]
  seen = {}
  d.sft_expert = lambda p, t, m, trainable, rng: seen.update(t=np.asarray(t), m=np.asarray(m)) or p
  night, nmask = _dream_batch(world, 3, seed=9)
  d.write_expert(params, night, nmask, jnp.ones(3), jax.random.key(0), 1, mem)
  n = night.shape[0]
  mtok, mmask = D.closed_book(mem["tokens"][:, 1:], d.attr_mask)
  span = int(np.asarray(mmask[0]).sum())
  want = np.asarray(jax.jit(lambda t, m: D.greedy_targets(graphdef, params, t, m, span=span, cfg=cfg))(mtok, mmask))
  np.testing.assert_array_equal(seen["t"][:n], np.asarray(night))
  np.testing.assert_array_equal(seen["t"][n:], want)
  assert (want != np.asarray(mem["tokens"])).any()  # an untrained model's beliefs are not the dreamed attributes
  np.testing.assert_array_equal(seen["m"][n:], np.asarray(mmask) * np.asarray(mem["weights"])[:, None])


def test_dream_memory_survives_a_resume_and_day_two_matches(model, tmp_path, monkeypatch):
  """A run stopped after day 1 and resumed gives day 2 bit-identical to an uninterrupted run:
  params, generator and the dream memory (day 1's rows carried through the checkpoint)."""
  from sleep_jax.checkpoint import Checkpointer
  from sleep_jax.dreaming import run as run_mod
  from sleep_jax.dreaming.harness import Dreamer
  over = ("dreaming.write_steps=1", "dreaming.memory=2", "dreaming.replay=0", "dreaming.reading_replay=false",
          "dreaming.rotate=false")
  cfg_a, graphdef, params, world = _tiny(model, f"run_dir={tmp_path / 'a'}", *over)
  cfg_b = load_config(DREAM_TINY, [f"run_dir={tmp_path / 'b'}", *over])

  class CheapDreams(Dreamer):  # the real write and memory; dreams drawn from rng (no sampler to compile)
    def dream(self, params, gen, day, rng):
      t, m = _dream_batch(world, 4, seed=int(jax.random.randint(rng, (), 0, 1 << 30)))
      return t, m, jnp.zeros(4)

  d = CheapDreams(cfg_a, graphdef, world)
  run_mod.run_method(cfg_a, world, d, "dream", params)

  real = run_mod.run_day

  def stop_on_day_two(dreamer, method, state, day, seed):
    if day == 1:
      raise KeyboardInterrupt("stopped after day 1")
    return real(dreamer, method, state, day, seed)

  monkeypatch.setattr(run_mod, "run_day", stop_on_day_two)
  with pytest.raises(KeyboardInterrupt):
    run_mod.run_method(cfg_b, world, d, "dream", params)
  monkeypatch.setattr(run_mod, "run_day", real)
  d.cfg = cfg_b
  run_mod.run_method(cfg_b, world, d, "dream", params)

  def final(cfg):
    mdir = os.path.join(cfg.run_dir, "methods", "dream", "seed0")
    gen, opt = d.fresh_generator(params, run_mod.dream_seed(cfg, 0))
    init = {"params": params, "gen": gen, "opt": opt, "memory": d.empty_memory()}
    ck = Checkpointer(mdir, keep=1, async_save=False)
    step, state, _ = ck.restore_latest(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), init))
    ck.close()
    return step, state, json.loads(open(os.path.join(mdir, "day1.json")).read())

  (sa, a, ja), (sb, b, jb) = final(cfg_a), final(cfg_b)
  assert sa == sb == world.days
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert ja["day_accuracy"] == jb["day_accuracy"] and ja["old_accuracy"] == jb["old_accuracy"]
  w = np.asarray(a["memory"]["weights"]).reshape(world.days, 2)
  assert (w > 0).all()  # both nights' rows kept, the first night's through the checkpoint


@pytest.mark.parametrize("key,value,says", [("generator", "both", "use 'per_day' or 'carried'"),
                                            ("memory", "-1", "need memory >= 0")])
def test_bad_generator_or_memory_is_one_config_error_naming_the_key(key, value, says):
  from sleep_jax.config import ConfigError
  from sleep_jax.dreaming.run import _check
  with pytest.raises(ConfigError, match=f"dreaming.{key}'.*{says}"):
    _check(load_config(DREAM_TINY, [f"dreaming.{key}={value}"]))
  _check(load_config(DREAM_TINY))  # the defaults pass
