"""How well the dreaming base model reads: the figures behind README's continual-learning remark.

    python experiments/diagnose_dreams.py [RUN_DIR [METHOD [SEED]]]      (default runs/continual)

With METHOD, the model is that method's after its last day (RUN_DIR/methods/METHOD/seedSEED,
dreaming seed 0 by default), so what its writes did to reading shows.

Restores RUN_DIR/base (the pre-trained CMS model of `sleep-jax dream`), then prints
  * per-token accuracy of the attribute symbols it must copy from a passage (reading rows
    of 64 fresh pre-training examples, teacher-forced), and of closed-book old facts;
  * of day 0's m dreams (the harness's own sampler and settings), how many QA statements
    name an entity of the day and how many state its attribute correctly;
  * of the closed-book texts generative replay writes unprompted, how many statements are
    about old facts, how many old entities they cover and how many are right.
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
from sleep_jax.dreaming import dreams as D  # noqa: E402
from sleep_jax.dreaming.harness import Dreamer  # noqa: E402
from sleep_jax.train import Trainer  # noqa: E402


def main() -> None:
  run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/continual"
  cfg = load_config(os.path.join(run_dir, "config.yaml"), ["mesh.data=1"])
  trainer = Trainer(cfg)
  step, state, _ = Checkpointer(os.path.join(run_dir, "base"), keep=5, async_save=False).restore_latest(
      trainer.abstract_state)
  params, world = state["params"], DayWorld(**cfg.dreaming.world)
  if len(sys.argv) > 2:  # a method's params after its last day (the checkpoint also holds gen, opt)
    seed = sys.argv[3] if len(sys.argv) > 3 else "0"
    ck = Checkpointer(os.path.join(run_dir, "methods", sys.argv[2], f"seed{seed}"), keep=1, async_save=False)
    day, mstate, _ = ck.restore_latest(None)
    saved = jax.tree_util.tree_leaves(mstate["params"])  # orbax turns list indices into str keys
    params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params),
                                          [jnp.asarray(b, a.dtype) for a, b in zip(jax.tree_util.tree_leaves(params), saved)])
    print(f"{sys.argv[2]} after day {day - 1}:")
  tokens, mask = world.pretrain_batch(123, 0, 64)
  logits = nnx.merge(trainer.graphdef, params)(jnp.asarray(tokens[:, :-1]))[0]
  ok = np.asarray(jnp.argmax(logits, -1)) == tokens[:, 1:]
  closed = np.arange(len(tokens)) % 4 == 0  # pretrain_batch: every 4th row is closed-book
  attr = np.zeros_like(ok)
  n_closed = world.qa_per_example * world.stmt_len  # closed-book rows: their attribute symbols only
  attr[closed, :n_closed] = world.attr_mask(world.qa_per_example) == 1
  for q in range(world.qa_per_example):  # reading rows: the attribute targets of each restated fact
    start = world.passage_len + q * world.stmt_len + 3 - 1
    attr[~closed, start:start + world.attr_len] = True
  print(f"base step {step}: copy accuracy {ok[~closed][attr[~closed]].mean():.3f} per token, "
        f"closed-book {ok[closed][attr[closed]].mean():.3f}")
  dreamer = Dreamer(cfg, trainer.graphdef, world)
  dreams, _, _ = dreamer.dream(params, None, 0, jax.random.key(0))
  stmts, ents, correct = _statements(world, dreams)
  day = set(world.day_entities(0).tolist())
  print(f"day 0 dreams: {len(stmts)} statements, {sum(e in day for e in ents)} about the day's entities, "
        f"{correct.sum()} correct")
  # Generative replay: what the model writes closed-book, unprompted (relabelled as in a write).
  replay, rmask = D.closed_book(dreamer.replay(params, jax.random.key(1)), dreamer.attr_mask)
  stmts, ents, correct = _statements(world, dreamer.relabel(params, replay, rmask))
  old = (ents >= 0) & (ents < world.n_old)
  print(f"replay: {len(stmts)} statements, {old.sum()} about old facts ({len(set(ents[old].tolist()))} of "
        f"{world.n_old} old entities), {correct[old].sum()} of those correct")


def _statements(world: DayWorld, texts_BT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(statements [S, stmt_len], entity ids [S], correct [S]) of closed-book texts BOS + QA...
  (relation 0: the dreaming worlds have one)."""
  stmts = np.asarray(texts_BT)[:, 1:].reshape(-1, world.stmt_len)
  ents = stmts[:, 1] - FIRST
  correct = np.array([0 <= e < world.facts.n_entities and np.array_equal(s[3:], world.facts.sym(world.facts.table[e, 0]))
                      for e, s in zip(ents, stmts)])
  return stmts, ents, correct


if __name__ == "__main__":
  main()
