"""Isolated dream copies: all LoRA copies at once with jax.vmap vs a sequential loop (SEAL's way).

    python experiments/benchmarks/dream_copies.py [--config experiments/continual.yaml] [--copies 4,8,16]

The model of the config (random initialisation: the speed does not depend on the weights)
samples dreams for day 0; K of them each train their own LoRA adapter for
`dreaming.copy_steps` Adam steps. The adapters are unmerged (models/adapters.py): the
batched copies share the base weights (unbatched in the vmap, so x W is one matmul over all
K copies' rows) and only the rank-r products and the Adam state are per copy. Timed: one
jitted vmapped call over the K adapters against K calls of the jitted single-copy function,
same dreams, both compiled beforehand (median of `--reps` interleaved repetitions), in wall
time and in this process's CPU time (the CPU time ratio is the work ratio: on a shared,
oversubscribed machine wall time also measures waiting for a core). The adapters of both
ways agree to `max_abs_diff` (float rounding, grown by `copy_steps` Adam steps).
`bound_speedup`: the sequential loop against ONE adapter trained on the same K dreams as one
batch -- the same tokens with no per-copy work at all, the ceiling of any batching of the
copies on this machine at this model size.
Prints a table, then one JSON object on the last line (`speedup_vmap_over_sequential` at the
largest K, wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import functools  # noqa: E402

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from sleep_jax.config import load_config  # noqa: E402
from sleep_jax.data.days import DayWorld  # noqa: E402
from sleep_jax.dreaming import dreams as D  # noqa: E402
from sleep_jax.dreaming import lora as lora_lib  # noqa: E402
from sleep_jax.dreaming.harness import Dreamer  # noqa: E402
from sleep_jax.models import model_factory  # noqa: E402
from sleep_jax.sharding import abstract_model  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="experiments/continual.yaml")
  ap.add_argument("--copies", default="4,8,16")
  ap.add_argument("--reps", type=int, default=3)
  a = ap.parse_args()
  cfg = load_config(a.config, ["mesh.data=1"])
  make = model_factory(cfg)
  graphdef = abstract_model(make)[0]
  params = nnx.to_pure_dict(nnx.split(make(nnx.Rngs(0)))[1])
  ks = [int(k) for k in a.copies.split(",")]
  cfg.dreaming.dreams = max(ks)
  dreamer = Dreamer(cfg, graphdef, DayWorld(**cfg.dreaming.world))
  tokens, mask, _ = dreamer.dream(params, None, 0, jax.random.key(0))
  dc = cfg.dreaming
  # One copy's function on a [K, T] batch: one adapter, every dream, no per-copy work.
  as_batch = jax.jit(functools.partial(D.train_copy, graphdef, steps=dc.copy_steps, lr=dc.copy_lr, alpha=dc.lora_alpha,
                                       cfg=cfg))
  rows = []
  for k in ks:
    t, m = tokens[:k], mask[:k]
    adapters = jax.vmap(lambda key: lora_lib.init(params, dreamer.roles, key, cfg.dreaming.lora_rank))(jax.random.split(jax.random.key(1), k))
    one = [jax.tree.map(lambda x, i=i: x[i], adapters) for i in range(k)]
    vm = jax.block_until_ready(dreamer.copies(params, adapters, t, m))
    jax.block_until_ready(as_batch(params, one[0], t, m))
    seq = [jax.block_until_ready(dreamer.copy_one(params, one[i], t[i], m[i])) for i in range(k)]
    diff = max(float(abs(x[i] - y).max()) for i in range(k)
               for x, y in zip(jax.tree.leaves(vm), jax.tree.leaves(seq[i])))
    tv, ts, cv, cs, tb = [], [], [], [], []
    for _ in range(a.reps):
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(dreamer.copies(params, adapters, t, m))
      c1, t1 = time.process_time(), time.perf_counter()
      for i in range(k):
        jax.block_until_ready(dreamer.copy_one(params, one[i], t[i], m[i]))
      c2, t2 = time.process_time(), time.perf_counter()
      t3 = time.perf_counter()
      jax.block_until_ready(as_batch(params, one[0], t, m))
      tb.append(time.perf_counter() - t3)
      tv.append(t1 - t0)
      ts.append(t2 - t1)
      cv.append(c1 - c0)
      cs.append(c2 - c1)
    med = statistics.median
    rows.append({"copies": k, "vmapped_s": med(tv), "sequential_s": med(ts), "speedup": med(ts) / med(tv),
                 "vmapped_cpu_s": med(cv), "sequential_cpu_s": med(cs), "cpu_speedup": med(cs) / med(cv),
                 "one_adapter_batch_s": med(tb), "bound_speedup": med(ts) / med(tb), "max_abs_diff": diff})
  print(f"{'copies':>6} {'vmapped s':>10} {'sequential s':>13} {'speed-up':>9} {'cpu speed-up':>13} {'bound':>6} "
        f"{'max |diff|':>11}")
  for r in rows:
    print(f"{r['copies']:>6} {r['vmapped_s']:>10.3f} {r['sequential_s']:>13.3f} {r['speedup']:>9.2f} "
          f"{r['cpu_speedup']:>13.2f} {r['bound_speedup']:>6.2f} {r['max_abs_diff']:>11.1e}")
  print(json.dumps({"copy_steps": cfg.dreaming.copy_steps, "rows": rows,
                    "speedup_vmap_over_sequential": rows[-1]["speedup"]}))


if __name__ == "__main__":
  main()
