"""Continual-learning world for paper B's dreaming: old knowledge, reading, and "days".

Entities (FactWorld tokens) fall in two pools: `n_old` old entities, whose facts the base
model learns closed-book, and a reading pool, whose entities appear in passages. Formats:

  QA statement   QUERY ent rel s_1..s_A                 (closed-book fact, also a dream's unit)
  passage        BOS [ent rel s_1..s_A SEP] x F         (facts written as text)
  reading        passage QUERY ent rel s.. QUERY ...    (restate facts of the passage as QA)
  closed-book    BOS QUERY ent rel s.. QUERY ...        (facts from the weights alone)

Pre-training mixes closed-book QA on the old facts with reading passages of reading-pool
entities under *fresh random* attributes, so the model learns to copy from context, not to
memorise the pool. Day d's passage states the table facts of `per_day` reading-pool
entities of its own; after the passage is evicted, the day's closed-book probes ask for
them. A dream is what the model writes after `passage QUERY`: QA statements, some wrong.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sleep_jax.data.facts import BOS, QUERY, SEP, FactWorld


@dataclasses.dataclass(frozen=True)
class DayWorld:
  n_old: int = 32
  n_pool: int = 64
  n_relations: int = 2
  attr_len: int = 2
  n_symbols: int = 10
  days: int = 3
  per_day: int = 8  # new entities per day (each with n_relations facts); also per pre-training passage
  qa_per_example: int = 4  # QA statements after a passage / per closed-book example
  seed: int = 0

  def __post_init__(self):
    if self.days * self.per_day > self.n_pool or min(self.per_day, self.days, self.qa_per_example) < 1:
      raise ValueError("need days, per_day, qa_per_example >= 1 and days * per_day <= n_pool")

  @property
  def facts(self) -> FactWorld:
    return FactWorld(n_entities=self.n_old + self.n_pool, n_old=self.n_old, n_relations=self.n_relations,
                     attr_len=self.attr_len, n_symbols=self.n_symbols, seed=self.seed)

  @property
  def vocab_size(self) -> int:
    return self.facts.vocab_size

  @property
  def stmt_len(self) -> int:
    return 3 + self.attr_len  # QUERY ent rel attr

  @property
  def passage_len(self) -> int:
    return 1 + self.per_day * self.n_relations * (2 + self.attr_len + 1)

  @property
  def dream_len(self) -> int:
    return self.qa_per_example * self.stmt_len

  def day_entities(self, day: int) -> np.ndarray:
    order = np.random.default_rng([self.seed, 3]).permutation(self.n_pool)
    return self.n_old + np.sort(order[day * self.per_day:(day + 1) * self.per_day])

  def day_pairs(self, day: int) -> np.ndarray:
    ents = self.day_entities(day)
    return np.stack(np.meshgrid(ents, np.arange(self.n_relations), indexing="ij"), -1).reshape(-1, 2)

  def old_pairs(self) -> np.ndarray:
    return self.facts.facts("old")

  # -- formats ------------------------------------------------------------------------------
  def qa(self, pairs_F2, attrs_FA) -> np.ndarray:
    """QA statements [F, stmt_len]."""
    f = self.facts
    return np.concatenate([np.full((len(pairs_F2), 1), QUERY), f.ent(pairs_F2[:, :1]), f.rel(pairs_F2[:, 1:]),
                           f.sym(attrs_FA)], axis=1).astype(np.int32)

  def passage(self, pairs_F2, attrs_FA) -> np.ndarray:
    """BOS + facts as text [1 + F * (3 + A)]."""
    f = self.facts
    body = np.concatenate([f.ent(pairs_F2[:, :1]), f.rel(pairs_F2[:, 1:]), f.sym(attrs_FA),
                           np.full((len(pairs_F2), 1), SEP)], axis=1).reshape(-1)
    return np.concatenate([[BOS], body]).astype(np.int32)

  def day_passage(self, day: int) -> np.ndarray:
    pairs = self.day_pairs(day)
    return self.passage(pairs, self.facts.table[pairs[:, 0], pairs[:, 1]])

  def probes(self, pairs_F2) -> tuple[np.ndarray, np.ndarray]:
    """Closed-book probes: tokens [F, 1 + stmt_len] = BOS QUERY e r a.., mask on a.."""
    tokens = np.concatenate([np.full((len(pairs_F2), 1), BOS),
                             self.qa(pairs_F2, self.facts.table[pairs_F2[:, 0], pairs_F2[:, 1]])], axis=1)
    mask = np.zeros_like(tokens)
    mask[:, 4:] = 1
    return tokens, mask

  def reading_probes(self, pairs_F2, attrs_FA) -> tuple[np.ndarray, np.ndarray]:
    """In-context probes in the pre-training reading layout: the passage of these facts, then
    qa_per_example of them restated as QA; row f restates facts f, f+1, .. (mod F), so every
    fact is asked at every QA position. Mask on the restated attributes. [F, T] each."""
    F, q = len(pairs_F2), self.qa_per_example
    if F < q:
      raise ValueError(f"reading probes need at least qa_per_example={q} facts, got {F}")
    passage, qa = self.passage(pairs_F2, attrs_FA), self.qa(pairs_F2, attrs_FA)
    rows = np.stack([np.concatenate([passage, qa[(f + np.arange(q)) % F].reshape(-1)]) for f in range(F)])
    mask = np.concatenate([np.zeros(len(passage), np.int32), self.attr_mask(q)])
    return rows.astype(np.int32), np.broadcast_to(mask, rows.shape).copy()

  def fresh_facts(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(pairs [F, 2], attrs [F, A]) of a pre-training style passage: per_day reading-pool
    entities under fresh random attributes."""
    ents = self.n_old + rng.choice(self.n_pool, self.per_day, replace=False)
    pairs = np.stack(np.meshgrid(ents, np.arange(self.n_relations), indexing="ij"), -1).reshape(-1, 2)
    return pairs, rng.integers(0, self.n_symbols, (len(pairs), self.attr_len))

  def attr_mask(self, n_stmts: int) -> np.ndarray:
    """Loss mask over QA statements [n_stmts * stmt_len]: the attribute symbols."""
    unit = np.zeros(self.stmt_len, np.int32)
    unit[3:] = 1
    return np.tile(unit, n_stmts)

  # -- pre-training batches: pure functions of (seed, step) ---------------------------------
  def pretrain_batch(self, seed: int, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, step, 17])
    T = self.passage_len + self.dream_len
    tokens = np.zeros((batch_size, T), np.int32)
    mask = np.zeros((batch_size, T), np.int32)
    q = self.qa_per_example
    old = self.old_pairs()
    for b in range(batch_size):
      if b % 4 == 0:  # closed-book QA on old facts, packed (learnt fast: a quarter of the rows)
        pairs = old[rng.integers(0, len(old), q)]
        seq = np.concatenate([[BOS], self.qa(pairs, self.facts.table[pairs[:, 0], pairs[:, 1]]).reshape(-1)])
        tokens[b, :len(seq)] = seq
        # The whole statement is a target, the entity too: what the model writes after
        # `BOS QUERY` unprompted must be the facts it knows (generative replay samples there).
        mask[b, 1:len(seq)] = 1
      else:  # reading: a passage with fresh attributes, then some of its facts restated
        pairs, attrs = self.fresh_facts(rng)
        ask = rng.choice(len(pairs), q, replace=False)
        tokens[b] = np.concatenate([self.passage(pairs, attrs), self.qa(pairs[ask], attrs[ask]).reshape(-1)])
        # Entity and relation of a restated fact are the writer's choice (a uniform pick is
        # the best guess); the attribute must be copied from the passage.
        mask[b, self.passage_len:] = 1
    return tokens, mask

  def dream_prompt(self, day: int) -> np.ndarray:
    return np.concatenate([self.day_passage(day), [QUERY]]).astype(np.int32)
