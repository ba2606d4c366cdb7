"""Named random streams: every random draw of a run comes from (cfg.seed, a stream's name).

`key(seed, "seeding/fast_expert")` folds a stable hash of the name into the seed, so streams
are independent of each other and of their order of use, adding a stream changes no other
stream's draws, and a name says in the code what a stream is for (ad hoc offsets such as
seed + 2 collide: seed 0's "+ 2" is seed 2's "+ 0").

  key(seed, name)        a typed jax key (jax.random.key)
  raw_key(seed, name)    the same stream as uint32[2] (what a checkpointed train state holds)
  fold(key, name)        a named sub-stream of a key (inside jitted code too)
  seed(seed, name)       an int seed, for APIs that take one (data generators, nnx.Rngs)
  numpy(seed, name, *i)  a numpy Generator, optionally per index (a batch from its step)
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np


def stream_id(name: str) -> int:
  """A stable 31-bit id of a stream name (the same in every process and Python version)."""
  return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


def key(seed: int, name: str) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), stream_id(name))


def raw_key(seed: int, name: str) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed), stream_id(name))


def fold(k: jax.Array, name: str) -> jax.Array:
  return jax.random.fold_in(k, stream_id(name))


def seed(seed_: int, name: str) -> int:
  return int(np.random.SeedSequence([seed_, stream_id(name)]).generate_state(1)[0] & 0x7FFFFFFF)


def numpy(seed_: int, name: str, *index: int) -> np.random.Generator:
  return np.random.default_rng([seed_, stream_id(name), *index])
