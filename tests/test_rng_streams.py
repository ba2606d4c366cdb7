"""Named random streams (sleep_jax/rng_streams.py): stable across processes, independent."""

import jax
import numpy as np

from sleep_jax import rng_streams


def test_stream_ids_are_pinned_so_saved_runs_replay_the_same_draws():
  # A changed hash would silently change every seeded experiment: the ids are part of the format.
  assert rng_streams.stream_id("seeding/fast_expert") == 1576765764
  assert rng_streams.stream_id("train/state") == 105749770


def test_streams_differ_by_name_and_seed_and_agree_across_forms():
  a, b = rng_streams.key(0, "seeding/fast_expert"), rng_streams.key(0, "seeding/consolidate")
  assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
  assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(rng_streams.key(1, "seeding/fast_expert")))
  # The typed and the raw key of one stream are the same stream.
  np.testing.assert_array_equal(jax.random.key_data(a), rng_streams.raw_key(0, "seeding/fast_expert"))
  # seed 0's stream "x" is not seed 1's stream "x" shifted (what ad hoc seed + k offsets did).
  assert rng_streams.seed(0, "dreaming/seed1") != rng_streams.seed(1, "dreaming/seed0")
  assert rng_streams.numpy(0, "x", 3).integers(1 << 30) == rng_streams.numpy(0, "x", 3).integers(1 << 30)
  assert rng_streams.numpy(0, "x", 3).integers(1 << 30) != rng_streams.numpy(0, "x", 4).integers(1 << 30)
