"""Synthetic facts (entity, relation) -> attribute, for paper B's knowledge seeding and
continual learning. Integer vocabulary, no tokenizer.

A `FactWorld` is a fixed table drawn from its seed: every entity e has, for every relation
r, an attribute of `attr_len` symbols. A fact is written

  BOS  ent_e  rel_r  s_1 ... s_A          (the statement; loss on s_1..s_A)

and asked for with the prompt BOS ent_e rel_r (the answer is s_1..s_A, exact match). The
world is small enough to hold in memory; batches are pure functions of (seed, step), so a
resumed stage sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD, BOS, QUERY, SEP = 0, 1, 2, 3
FIRST = 4  # first entity token
PROMPT_LEN = 3  # BOS ent rel


def world_from_config(cls, options: dict, key: str, vocab_size: int):
  """A world dataclass from config options, fitting a model vocabulary of `vocab_size`;
  ConfigError (one line naming `key` or model.vocab_size) otherwise."""
  from sleep_jax.config import ConfigError

  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(options) - known)
  if unknown:
    raise ConfigError(f"bad value for config key '{key}': unknown option '{unknown[0]}' (known: {', '.join(sorted(known))})")
  try:
    world = cls(**options)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"bad value for config key '{key}': {e}") from None
  if world.vocab_size > vocab_size:
    raise ConfigError(f"bad value for config key 'model.vocab_size': {vocab_size} < the vocabulary of {key} "
                      f"({world.vocab_size})")
  return world


@dataclasses.dataclass(frozen=True)
class FactWorld:
  n_entities: int = 96  # entities [0, n_old) are "old" knowledge, the rest are new
  n_old: int = 64
  n_relations: int = 2
  attr_len: int = 3
  n_symbols: int = 16
  seed: int = 0

  def __post_init__(self):
    if not 0 < self.n_old <= self.n_entities or self.n_relations < 1 or self.attr_len < 1 or self.n_symbols < 2:
      raise ValueError(f"bad FactWorld options: {self}")

  # -- vocabulary ----------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return FIRST + self.n_entities + self.n_relations + self.n_symbols

  def ent(self, e):
    return FIRST + np.asarray(e)

  def rel(self, r):
    return FIRST + self.n_entities + np.asarray(r)

  def sym(self, s):
    return FIRST + self.n_entities + self.n_relations + np.asarray(s)

  @property
  def seq_len(self) -> int:
    return PROMPT_LEN + self.attr_len

  # -- the table -----------------------------------------------------------------------------
  @property
  def table(self) -> np.ndarray:
    """attributes [n_entities, n_relations, attr_len] (symbol indices)."""
    rng = np.random.default_rng([self.seed, 7])
    return rng.integers(0, self.n_symbols, (self.n_entities, self.n_relations, self.attr_len))

  def entities(self, which: str) -> np.ndarray:
    if which == "old":
      return np.arange(self.n_old)
    if which == "new":
      return np.arange(self.n_old, self.n_entities)
    if which == "all":
      return np.arange(self.n_entities)
    raise ValueError(f"unknown entity set {which!r} (old | new | all)")

  def facts(self, which: str) -> np.ndarray:
    """(entity, relation) pairs [F, 2] of one entity set, in a fixed order."""
    ents = self.entities(which)
    return np.stack(np.meshgrid(ents, np.arange(self.n_relations), indexing="ij"), -1).reshape(-1, 2)

  def statements(self, pairs_F2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tokens [F, T] and loss_mask [F, T] (1 on the attribute symbols)."""
    pairs_F2 = np.asarray(pairs_F2)
    F = len(pairs_F2)
    attrs = self.table[pairs_F2[:, 0], pairs_F2[:, 1]]
    tokens = np.concatenate([np.full((F, 1), BOS), self.ent(pairs_F2[:, :1]), self.rel(pairs_F2[:, 1:]),
                             self.sym(attrs)], axis=1).astype(np.int32)
    mask = np.zeros_like(tokens)
    mask[:, PROMPT_LEN:] = 1
    return tokens, mask

  def prompts(self, pairs_F2: np.ndarray) -> np.ndarray:
    return self.statements(pairs_F2)[0][:, :PROMPT_LEN]

  def batch(self, which: str, seed: int, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Statements of `batch_size` facts drawn from one set: a pure function of (seed, step)."""
    facts = self.facts(which)
    idx = np.random.default_rng([seed, step, 11]).integers(0, len(facts), batch_size)
    return self.statements(facts[idx])

  def to_text(self, tokens) -> str:
    out = []
    for t in np.asarray(tokens).tolist():
      if t < FIRST:
        out.append({PAD: "_", BOS: "<s>", QUERY: "?", SEP: "|"}[t])
      elif t < FIRST + self.n_entities:
        out.append(f"e{t - FIRST}")
      elif t < FIRST + self.n_entities + self.n_relations:
        out.append(f"r{t - FIRST - self.n_entities}")
      else:
        out.append("abcdefghijklmnopqrstuvwxyz"[(t - FIRST - self.n_entities - self.n_relations) % 26])
    return " ".join(out)
