"""The continual-learning harness: days of new facts, one model trajectory per method.

Every day the method reads the day's passage (it is then evicted: no method sees it at
probe time) and updates its weights; then closed-book probes ask for every day's facts and
for the old facts. Methods:

  base      no update
  finetune  full-parameter SFT on the passage text itself (finetune_lr)
  dream     m dreams, no selection, no RL, written into a new slow-level CMS expert
  sleep     `rounds` of dream -> select (top-k + b random by gradient norm) -> isolated LoRA
            copies (vmapped) -> reward -> ReST-EM on the generator's LoRA; then a last
            dream/select/reward pass, and the rewarded dreams of every round (the night's
            useful dreams, not only the last round's) are written into a new slow-level
            expert (expansion: every other weight stays bit-identical). With
            `dreaming.generator=per_day` the generator's LoRA and its optimizer start fresh
            every day (trained on that night's passage only); `carried` keeps them.

Dream memory (`dreaming.memory`, dream and sleep alike): after each night up to `memory` of
its closed-book dreams of weight > 0 (sleep: the rewarded ones) join the method's state, a
fixed buffer of `days * memory` rows checkpointed with it; every later write rehearses them
with the model's current greedy beliefs as targets, so later days' experts keep what
earlier nights taught (the passage itself is evicted and never kept).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sleep_jax import freeze, rng_streams
from sleep_jax.config import Config
from sleep_jax.data.facts import BOS, QUERY
from sleep_jax.data.days import DayWorld
from sleep_jax.dreaming import dreams as D
from sleep_jax.dreaming import lora as lora_lib
from sleep_jax.models import roles
from sleep_jax.seeding import expand, steps as seed_steps

METHODS = ("base", "finetune", "dream", "sleep")


def sft_loop(graphdef, params, tokens_BT, mask_BT, trainable, rng=None, *, lr: float, steps: int, batch: int = 0, cfg):
  """`steps` Adam steps of SFT as one lax.scan (one compile for every day). Only leaves with
  trainable = 1 move (freeze.masked): the others stay bit-identical.

  batch = 0 trains on every row each step. Otherwise each step draws `batch` rows with
  replacement, each with probability proportional to its loss weight (the row's mask sum, so
  a row of weight 0 is never drawn): the same objective in expectation, and a write's cost no
  longer grows with its number of texts (rotations x (dreams + replay)).
  """
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(10, max(steps - 1, 0)), max(steps, 11), lr * 0.1)
  tx = freeze.masked(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule)), trainable)
  row_w = jnp.sum(mask_BT[:, 1:].astype(jnp.float32), -1)
  rows_p = row_w / jnp.maximum(jnp.sum(row_w), 1e-9)

  def body(carry, key):
    p, opt = carry
    t, m = tokens_BT, mask_BT
    if batch:
      idx = jax.random.choice(key, tokens_BT.shape[0], (batch,), p=rows_p)
      t, m = t[idx], (m[idx] > 0).astype(m.dtype)
    upd, opt = tx.update(jax.grad(functools.partial(D.sft_loss, cfg=cfg), argnums=1)(graphdef, p, t, m), opt, p)
    return (optax.apply_updates(p, upd), opt), None

  keys = jax.random.split(jax.random.key(0) if rng is None else rng, steps)
  (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), keys)
  return params


class Dreamer:
  """Jitted pieces for one model config (compiled once, shared by every method and day)."""

  def __init__(self, cfg: Config, graphdef, world: DayWorld):
    self.cfg, self.graphdef, self.world = cfg, graphdef, world
    self.roles = roles.roles_for(cfg)
    dc = cfg.dreaming
    self.alpha = dc.lora_alpha
    self.attr_mask = jnp.asarray(world.attr_mask(world.qa_per_example))
    self.sample = jax.jit(functools.partial(D.sample_dreams, graphdef, cfg=cfg, m=dc.dreams, length=world.dream_len,
                                            temperature=dc.dream_temperature, novelty=dc.novelty_expert))
    self.importance = jax.jit(functools.partial(D.importance, graphdef, cfg=cfg))
    copy = functools.partial(D.train_copy, graphdef, steps=dc.copy_steps, lr=dc.copy_lr, alpha=self.alpha, cfg=cfg)
    self.copy_one = jax.jit(copy)
    self.copies = jax.jit(jax.vmap(copy, in_axes=(None, 0, 0, 0)))
    self.rewards = jax.jit(functools.partial(D.copy_rewards, graphdef, alpha=self.alpha, cfg=cfg))
    self.probe = jax.jit(functools.partial(D.probe_scores, graphdef, cfg=cfg))
    rest_tx = optax.adam(dc.rest_lr)
    self.rest_tx = rest_tx

    def rest_step(params, gen, opt, prompt, dreams, weights):
      g = jax.grad(lambda a: D.rest_em_loss(graphdef, params, a, prompt, dreams, weights, alpha=self.alpha,
                                            cfg=cfg))(gen)
      upd, opt = rest_tx.update(g, opt, gen)
      return optax.apply_updates(gen, upd), opt

    self.rest_step = jax.jit(rest_step)
    start = jnp.asarray([BOS, QUERY], jnp.int32)  # closed-book mode: what the model knows unprompted
    self.replay = jax.jit(lambda p, rng: D.sample_dreams(
        graphdef, p, start, rng, cfg=cfg, m=max(dc.replay, 1), length=world.dream_len, temperature=1.0,
        novelty=False))
    self.relabel = jax.jit(functools.partial(D.greedy_targets, graphdef, span=world.qa_per_example * world.attr_len,
                                             cfg=cfg))
    self.sft_expert = jax.jit(functools.partial(sft_loop, graphdef, lr=dc.write_lr, steps=dc.write_steps,
                                                batch=dc.write_batch, cfg=cfg))
    self.sft_all = jax.jit(functools.partial(sft_loop, graphdef, lr=dc.finetune_lr, steps=dc.write_steps, cfg=cfg))

  # -- per-method state carried across days ------------------------------------------------
  def fresh_generator(self, params, seed: int) -> tuple[dict, object]:
    """The generator's LoRA (B = 0: the model itself) and a fresh ReST-EM optimizer state;
    the same draw on every call for one dreaming seed."""
    gen = lora_lib.init(params, self.roles, rng_streams.key(seed, "dreaming/generator_lora"),
                        self.cfg.dreaming.lora_rank)
    return gen, self.rest_tx.init(gen)

  def empty_memory(self) -> dict:
    """The dream memory: tokens [days * max(memory, 1), 1 + dream_len] (closed-book rows) and
    weights (0: an empty row). A fixed shape, so a day's checkpoint restores it."""
    n = self.world.days * max(self.cfg.dreaming.memory, 1)
    return {"tokens": jnp.zeros((n, 1 + self.world.dream_len), jnp.int32), "weights": jnp.zeros((n,), jnp.float32)}

  def remember(self, memory: dict, tokens, weights, day: int, np_rng: np.random.Generator) -> dict:
    """Day `day`'s slot of the memory: up to `memory` of the night's closed-book rows with
    weight > 0, picked greedily to cover the most distinct (entity, relation) pairs not yet
    covered (ties in random order); fewer rows if the night had fewer."""
    M = self.cfg.dreaming.memory
    if not M:
      return memory
    tokens, weights = np.asarray(tokens), np.asarray(weights)
    cand = np.flatnonzero(weights > 0)
    cand = cand[np_rng.permutation(len(cand))]
    S = self.world.stmt_len
    stmts = tokens[:, 1:].reshape(tokens.shape[0], -1, S)
    pairs = {i: {(int(a), int(b)) for a, b in stmts[i, :, 1:3]} for i in cand}
    covered, picked = set(), []
    for _ in range(min(M, len(cand))):
      rest = [i for i in cand if i not in picked]
      best = max(rest, key=lambda i: len(pairs[i] - covered))  # first maximum: the random order breaks ties
      picked.append(best)
      covered |= pairs[best]
    rows = np.zeros((M, tokens.shape[1]), np.int32)
    w = np.zeros((M,), np.float32)
    rows[:len(picked)], w[:len(picked)] = tokens[picked], 1.0
    sl = slice(day * M, (day + 1) * M)
    return {"tokens": memory["tokens"].at[sl].set(jnp.asarray(rows)), "weights": memory["weights"].at[sl].set(w)}

  # -- one day of each method -------------------------------------------------------------
  def dream(self, params, gen, day: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(closed-book tokens [m, T], masks [m, T], importance [m]) of m fresh dreams."""
    # One adapter for a whole sampling run: merged once (a weight-sized add), rather than
    # unmerged, which costs two more small products per adapted projection per token.
    writer = params if gen is None else lora_lib.apply(params, gen, alpha=self.alpha)
    dreams = self.sample(writer, jnp.asarray(self.world.dream_prompt(day)), rng)
    tokens, mask = D.closed_book(dreams, self.attr_mask)
    return tokens, mask, self.importance(params, tokens, mask)

  def isolated_copies(self, params, tokens, mask, rng):
    adapters = jax.vmap(lambda k: lora_lib.init(params, self.roles, k, self.cfg.dreaming.lora_rank))(
        jax.random.split(rng, tokens.shape[0]))
    return self.copies(params, adapters, tokens, mask)

  def sleep_round(self, params, gen, opt, day: int, rng, np_rng, *, rest: bool):
    dc = self.cfg.dreaming
    k_dream, k_copy = jax.random.split(rng)
    tokens, mask, scores = self.dream(params, gen, day, k_dream)
    keep = D.select(np.asarray(scores), dc.top_k, dc.random_extra, np_rng)
    probes, pmask = (jnp.asarray(a) for a in self.world.probes(self.world.day_pairs(day)))
    adapters = self.isolated_copies(params, tokens[keep], mask[keep], k_copy)
    reward, _ = self.rewards(params, adapters, probes, pmask)
    weights = jnp.zeros(tokens.shape[0]).at[keep].set(reward)
    if rest and float(weights.sum()) > 0:
      prompt = jnp.asarray(self.world.dream_prompt(day))
      for _ in range(dc.rest_steps):
        gen, opt = self.rest_step(params, gen, opt, prompt, tokens[:, 1:], weights)
    return gen, opt, tokens, mask, weights

  def write_expert(self, params, tokens, mask, weights, rng, day: int, memory: dict | None = None):
    """Write dreams into a newly activated slow-level expert (only it trains).

    Two kinds of generative replay ride along, both the model's own text with its own
    greedy beliefs as targets (what it already knows stays the target elsewhere):
    * `dreaming.replay` closed-book texts it writes from nothing (its old facts);
    * with `dreaming.reading_replay`, every dream of the night in context (the day's passage,
      then the dream): a closed-book write otherwise also changes how the model reads, and
      the next day's dreams come out wrong;
    * `memory`: earlier nights' kept dreams (run_day's dream memory), relabelled the same
      way, so this day's expert does not overwrite what earlier days' experts taught.
    With `dreaming.write_targets=statements` a closed-book text's whole statements are
    targets (as in pre-training), not only their attributes: the model then writes these
    facts unprompted, so the next nights' generative replay rehearses them too. With
    `dreaming.rotate`, every closed-book text is written in each cyclic order of its
    statements. Closed-book rows are right-padded to the in-context length (causal: padding
    changes nothing before it).
    """
    dc = self.cfg.dreaming
    reading = self.reading_rows(params, day, tokens) if dc.reading_replay else None
    if dc.replay:
      replay, rmask = D.closed_book(self.replay(params, rng), self.attr_mask)
      replay = self.relabel(params, replay, rmask)
      tokens, mask = jnp.concatenate([tokens, replay]), jnp.concatenate([mask, rmask])
      weights = jnp.concatenate([weights, jnp.ones(replay.shape[0], weights.dtype)])
    if memory is not None and dc.memory:  # empty rows too (weight 0): one compiled write for every day
      mtok, mmask = D.closed_book(memory["tokens"][:, 1:], self.attr_mask)
      tokens = jnp.concatenate([tokens, self.relabel(params, mtok, mmask)])
      mask = jnp.concatenate([mask, mmask])
      weights = jnp.concatenate([weights, memory["weights"].astype(weights.dtype)])
    if dc.write_targets == "statements":  # the entity too: later nights' replay then recalls these facts
      mask = jnp.broadcast_to((jnp.arange(mask.shape[1]) > 0).astype(mask.dtype), mask.shape)
    if dc.rotate:  # every statement at every position, as the probes ask at the first
      n = self.world.qa_per_example
      tokens = D.rotations(tokens, self.world.stmt_len)
      mask, weights = jnp.tile(mask, (n, 1)), jnp.tile(weights, n)
    mask = mask * weights[:, None].astype(mask.dtype)
    if reading is not None:
      pad = reading[0].shape[1] - tokens.shape[1]
      tokens = jnp.concatenate([jnp.pad(tokens, ((0, 0), (0, pad))), reading[0]])
      mask = jnp.concatenate([jnp.pad(mask, ((0, 0), (0, pad))), reading[1]])
    slow = roles.cms_levels(self.roles) - 1
    slot = expand.next_free_slot(jax.device_get(params), self.roles, slow)
    params = expand.set_expert(params, self.roles, slow, slot, active=True)
    # An array mask (not a static one): one compiled write serves every day's new slot.
    trainable = jax.tree.map(jnp.float32, seed_steps.trainable(self.roles, level=slow, slot=slot))
    return self.sft_expert(params, tokens, mask, trainable, rng_streams.fold(rng, "write/minibatches"))

  def reading_rows(self, params, day: int, closed_BT) -> tuple[jax.Array, jax.Array]:
    """The night's dreams back in context: day passage + dream [M, P + N], targets the
    model's own greedy reading of the attributes."""
    passage = jnp.asarray(self.world.day_passage(day))
    rows = jnp.concatenate([jnp.broadcast_to(passage, (closed_BT.shape[0], passage.shape[0])), closed_BT[:, 1:]], 1)
    mask = jnp.concatenate([jnp.zeros(passage.shape[0], jnp.int32), self.attr_mask.astype(jnp.int32)])
    mask = jnp.broadcast_to(mask, rows.shape)
    return self.relabel(params, rows, mask), mask

  def finetune(self, params, day: int):
    passage = jnp.asarray(self.world.day_passage(day))[None]
    mask = jnp.ones_like(passage).at[:, 0].set(0)
    return self.sft_all(params, passage, mask, jax.tree.map(lambda _: jnp.float32(1), params))

  def accuracy(self, params, pairs) -> float:
    probes, pmask = self.world.probes(pairs)
    return float(self.probe(params, jnp.asarray(probes), jnp.asarray(pmask))[0])


def run_day(dreamer: Dreamer, method: str, state: dict, day: int, seed: int):
  """One day of `method` on its state {params, gen, opt, memory}: returns (state, info)."""
  dc = dreamer.cfg.dreaming
  params, gen, opt, memory = state["params"], state["gen"], state["opt"], state.get("memory")
  rng = jax.random.fold_in(rng_streams.key(seed, "dreaming/day"), day)
  np_rng = rng_streams.numpy(seed, "dreaming/day/select", day)
  info: dict = {}
  night = None
  if method == "finetune":
    params = dreamer.finetune(params, day)
  elif method == "dream":
    tokens, mask, _ = dreamer.dream(params, None, day, rng)
    night = (tokens, jnp.ones(tokens.shape[0]))
    params = dreamer.write_expert(params, tokens, mask, night[1], rng_streams.fold(rng, "write"), day, memory)
  elif method == "sleep":
    if dc.generator == "per_day":  # tonight's ReST-EM starts from the model itself
      gen, opt = dreamer.fresh_generator(params, seed)
    rewarded, rounds = [], []
    for r in range(dc.rounds + 1):  # the last pass only collects dreams, with no ReST step
      gen, opt, tokens, mask, weights = dreamer.sleep_round(params, gen, opt, day, jax.random.fold_in(rng, r), np_rng,
                                                            rest=r < dc.rounds)
      rewarded.append(float(weights.sum()))
      rounds.append((tokens, mask, weights))
    info["rewarded_dreams"] = rewarded
    # Unrewarded rows have weight 0: no loss (and never drawn by a minibatched write).
    tokens, mask, weights = (jnp.concatenate(parts) for parts in zip(*rounds))
    night = (tokens, weights)
    params = dreamer.write_expert(params, tokens, mask, weights, rng_streams.fold(rng, "write"), day, memory)
  if night is not None and memory is not None and dc.memory:
    memory = dreamer.remember(memory, *night, day, rng_streams.numpy(seed, "dreaming/day/memory", day))
    info["memory_rows"] = int(np.sum(np.asarray(memory["weights"]) > 0))
  return {"params": params, "gen": gen, "opt": opt, "memory": memory}, info


def vmap_speedup(dreamer: Dreamer, params, day: int, seed: int) -> dict:
  """Wall time of the isolated copies: vmapped vs a sequential loop over the same dreams."""
  tokens, mask, _ = dreamer.dream(params, None, day, rng_streams.key(seed, "dreams"))
  keep = np.arange(min(tokens.shape[0], dreamer.cfg.dreaming.top_k + dreamer.cfg.dreaming.random_extra))
  t, m = tokens[keep], mask[keep]
  adapters = jax.vmap(lambda k: lora_lib.init(params, dreamer.roles, k, dreamer.cfg.dreaming.lora_rank))(
      jax.random.split(rng_streams.key(seed, "copies"), len(keep)))
  one = lambda i: jax.tree.map(lambda a: a[i], adapters)
  jax.block_until_ready(dreamer.copies(params, adapters, t, m))  # compile both first
  jax.block_until_ready(dreamer.copy_one(params, one(0), t[0], m[0]))
  t0 = time.perf_counter()
  vm = jax.block_until_ready(dreamer.copies(params, adapters, t, m))
  t1 = time.perf_counter()
  seq = [jax.block_until_ready(dreamer.copy_one(params, one(i), t[i], m[i])) for i in range(len(keep))]
  t2 = time.perf_counter()
  diff = max(float(jnp.max(jnp.abs(a - b))) for i, s in enumerate(seq)
             for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[i], vm)), jax.tree.leaves(s)))
  return {"copies": len(keep), "vmapped_s": t1 - t0, "sequential_s": t2 - t1, "speedup": (t2 - t1) / (t1 - t0),
          "max_abs_diff": diff}
