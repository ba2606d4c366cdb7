"""One night of `sleep` on day 0, dissected: which entities the rewarded dreams cover, and
what the write stored, fact by fact. The figures behind session 6 of the search log.

    python experiments/dissect_write.py RUN_DIR [key=value ...]

RUN_DIR holds a `sleep-jax dream` run (its config.yaml and base/); overrides change the
dreaming settings, e.g. dreaming.rotate=false dreaming.dream_temperature=0.5.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sleep_jax.checkpoint import Checkpointer  # noqa: E402
from sleep_jax.config import load_config  # noqa: E402
from sleep_jax.data.days import DayWorld  # noqa: E402
from sleep_jax.data.facts import FIRST  # noqa: E402
from sleep_jax.dreaming import lora as lora_lib  # noqa: E402
from sleep_jax.dreaming.harness import Dreamer  # noqa: E402
from sleep_jax.train import Trainer  # noqa: E402


def main() -> None:
  run_dir = sys.argv[1]
  cfg = load_config(os.path.join(run_dir, "config.yaml"), ["mesh.data=1", *sys.argv[2:]])
  trainer = Trainer(cfg)
  _, state, _ = Checkpointer(os.path.join(run_dir, "base"), keep=5, async_save=False).restore_latest(
      trainer.abstract_state)
  params, world, day = state["params"], DayWorld(**cfg.dreaming.world), 0
  dreamer = Dreamer(cfg, trainer.graphdef, world)
  rng, np_rng = jax.random.fold_in(jax.random.key(cfg.seed), day), np.random.default_rng([cfg.seed, day, 23])
  gen = lora_lib.init(params, dreamer.roles, jax.random.key(cfg.seed + 9), cfg.dreaming.lora_rank)
  opt, night, ents = dreamer.rest_tx.init(gen), [], world.day_entities(day)
  for r in range(cfg.dreaming.rounds + 1):
    gen, opt, tokens, mask, weights = dreamer.sleep_round(params, gen, opt, day, jax.random.fold_in(rng, r), np_rng,
                                                          rest=r < cfg.dreaming.rounds)
    night.append((tokens, mask, weights))
    named = np.asarray(tokens)[np.asarray(weights) > 0][:, 1:].reshape(-1, world.stmt_len)[:, 1] - FIRST
    counts = np.bincount(named[named >= 0], minlength=world.facts.n_entities)[ents]
    print(f"round {r}: {int(np.asarray(weights).sum())} rewarded dreams, statements per day entity {counts.tolist()}")
  tokens, mask, weights = (jnp.concatenate(parts) for parts in zip(*night))
  written = dreamer.write_expert(params, tokens, mask, weights, jax.random.fold_in(rng, 99), day)
  # In place: each rewarded dream as it was dreamed, every attribute right after the write?
  logits = nnx.merge(trainer.graphdef, written)(tokens[:, :-1])[0]
  right = (jnp.argmax(logits, -1) == tokens[:, 1:]) | (mask[:, 1:] == 0)
  print(f"rewarded dreams fitted in place: {float(jnp.mean(jnp.all(right, -1)[weights > 0])):.3f}")
  probes, _ = world.probes(world.day_pairs(day))
  pred = np.asarray(jnp.argmax(nnx.merge(trainer.graphdef, written)(jnp.asarray(probes[:, :-1]))[0], -1))
  for e, row, p in zip(ents, probes, pred):
    print(f"entity {int(e)}: truth {row[4:].tolist()} written {p[3:].tolist()}")
  print(f"day 0 probes {dreamer.accuracy(written, world.day_pairs(day)):.3f}, "
        f"old facts {dreamer.accuracy(written, world.old_pairs()):.3f}")


if __name__ == "__main__":
  main()
