"""Train-step memory and time of Algorithm 1 against the number of sleep passes N.

    python experiments/benchmarks/sleep_memory.py [--passes 1,2,4,8] [--d-model 256] [--batch 16]

A paper-shaped hybrid (attn-gdn-attn-gdn) on Rule 110 batches (K=4 strings of W=24 bits,
L=24: four consolidation chunks and one prediction chunk). Memory is XLA's own analysis of
the compiled, single-device train step (`memory_analysis()`: temp + argument + output bytes;
arguments and outputs are params + AdamW state + batch, temp holds the activations). Times
are medians over repetitions interleaved across N, in this one process. Goals: memory(8) / memory(1) <= 1.5 and
time(N) <= N * time(1). Prints a table, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sleep_jax import sharding as shd  # noqa: E402
from sleep_jax.config import Config, MeshConfig, ModelConfig, SleepConfig, TrainConfig  # noqa: E402
from sleep_jax.data.tasks import rule110  # noqa: E402
from sleep_jax.train import Trainer  # noqa: E402


def make_cfg(a, passes: int) -> Config:
  model = ModelConfig(kind="hybrid", vocab_size=rule110.VOCAB_SIZE, d_model=a.d_model, n_heads=a.heads,
                      head_dim=a.d_model // a.heads, d_ff=4 * a.d_model, layer_pattern=["attn", "gdn"],
                      pattern_repeats=2, eviction="hard", gdn_chunk=a.W)
  return Config(model=model, sleep=SleepConfig(passes=passes, chunk_len=a.W),
                train=TrainConfig(batch_size=a.batch, steps=100), mesh=MeshConfig(1, 1, 1))


def make_batch(a) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  ex = [rule110.sample(rng, K=4, W=a.W, steps=8) for _ in range(a.batch)]
  return {k: np.stack([e[k] for e in ex]) for k in ("tokens", "loss_mask")}


def compile_step(a, passes: int, batch) -> dict:
  cfg = make_cfg(a, passes)
  trainer = Trainer(cfg, mesh=shd.make_mesh(cfg.mesh, devices=jax.devices()[:1]))
  state = trainer.init_state()
  gbatch = shd.global_batch(batch, trainer.mesh)
  t0 = time.perf_counter()
  compiled = trainer.train_step.lower(state, gbatch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  out = {"temp": mem.temp_size_in_bytes, "argument": mem.argument_size_in_bytes,
         "output": mem.output_size_in_bytes, "alias": mem.alias_size_in_bytes, "compile_s": compile_s}
  out["total"] = out["temp"] + out["argument"] + out["output"]
  for _ in range(2):  # warm-up
    state, m = compiled(state, gbatch)
  jax.block_until_ready(m)
  out["run"] = (compiled, state, gbatch)
  return out


def time_interleaved(rows: dict, reps: int) -> None:
  """Median step time per N, repetitions interleaved across N so that load drift on a shared
  machine hits every N alike (states are donated: each step feeds the next)."""
  times = {n: [] for n in rows}
  for _ in range(reps):
    for n, r in rows.items():
      compiled, state, gbatch = r["run"]
      t0 = time.perf_counter()
      state, m = compiled(state, gbatch)
      jax.block_until_ready(m)
      times[n].append(time.perf_counter() - t0)
      r["run"] = (compiled, state, gbatch)
      r["loss"] = float(m["loss"])
  for n, r in rows.items():
    r["step_s"] = statistics.median(times[n])


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--passes", default="1,2,4,8")
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--W", type=int, default=24)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--reps", type=int, default=7)
  a = p.parse_args()
  batch = make_batch(a)
  ns = [int(n) for n in a.passes.split(",")]
  rows = {n: compile_step(a, n, batch) for n in ns}
  time_interleaved(rows, a.reps)

  mb = lambda b: b / 2**20
  base = rows[ns[0]]
  print(f"hybrid attn-gdn x2, d={a.d_model}, heads={a.heads}, batch={a.batch}, T={batch['tokens'].shape[1] - 1}, "
        f"L={a.W}, float32, remat per chunk, pass and layer; {jax.devices()[0].platform}, median of {a.reps} steps")
  print(f"{'N':>3}{'temp MiB':>10}{'arg MiB':>9}{'out MiB':>9}{'total MiB':>11}{'mem xN1':>9}"
        f"{'step s':>9}{'time xN1':>10}{'compile s':>11}")
  for n, r in rows.items():
    print(f"{n:>3}{mb(r['temp']):>10.1f}{mb(r['argument']):>9.1f}{mb(r['output']):>9.1f}{mb(r['total']):>11.1f}"
          f"{r['total'] / base['total']:>9.2f}{r['step_s']:>9.3f}{r['step_s'] / base['step_s']:>10.2f}"
          f"{r['compile_s']:>11.1f}")
  result = {
      "config": {"d_model": a.d_model, "heads": a.heads, "batch": a.batch, "L": a.W, "layers": "attn-gdn-attn-gdn"},
      "passes": ns,
      "total_bytes": {n: r["total"] for n, r in rows.items()},
      "temp_bytes": {n: r["temp"] for n, r in rows.items()},
      "step_s": {n: r["step_s"] for n, r in rows.items()},
      "time_over_n_time1": {n: r["step_s"] / (n * base["step_s"]) for n, r in rows.items()},
  }
  if 1 in rows and 8 in rows:
    result["memory_ratio_8_over_1"] = rows[8]["total"] / rows[1]["total"]
    result["temp_ratio_8_over_1"] = rows[8]["temp"] / rows[1]["temp"]
  result["time_within_n_time1"] = all(r["step_s"] <= n * base["step_s"] for n, r in rows.items())
  print(json.dumps(result))


if __name__ == "__main__":
  main()
