"""Chunkwise vs recurrent gated delta rule on this CPU: forward and forward+backward.

    python experiments/benchmarks/gdn.py [--reps 7] [--T 4096] [--chunks 32,64,128]

Times are medians over repetitions after a warm-up (compile) call, all in one process, so
the ratios (recurrent time / chunk time) are comparable even on a shared, noisy machine.
Prints a table, then one JSON object on the last line.
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
import jax.numpy as jnp  # noqa: E402

from sleep_jax.ops.gated_delta import gated_delta_rule  # noqa: E402


def make_inputs(B, T, H, K, V, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(ks[0], (B, T, H, K)))
  k = unit(jax.random.normal(ks[1], (B, T, H, K)))
  v = jax.random.normal(ks[2], (B, T, H, V))
  alpha = jax.random.uniform(ks[3], (B, T, H), minval=0.9, maxval=1.0)
  beta = jax.random.uniform(ks[4], (B, T, H), minval=0.0, maxval=1.0)
  return q, k, v, alpha, beta


def build(mode, chunk_size):
  def fwd(q, k, v, alpha, beta):
    return gated_delta_rule(q, k, v, alpha, beta, mode=mode, chunk_size=chunk_size)

  def loss(q, k, v, alpha, beta):
    o, S = fwd(q, k, v, alpha, beta)
    return jnp.sum(o * o) + jnp.sum(S * S)

  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def median_time(f, args, reps):
  jax.block_until_ready(f(*args))  # compile + warm-up
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--B", type=int, default=4)
  p.add_argument("--T", type=int, default=4096)
  p.add_argument("--H", type=int, default=4)
  p.add_argument("--K", type=int, default=64)
  p.add_argument("--V", type=int, default=64)
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--chunks", default="32,64,128")
  a = p.parse_args()
  args = make_inputs(a.B, a.T, a.H, a.K, a.V)

  rows = {}
  fwd, bwd = build("recurrent", 64)
  rows["recurrent"] = (median_time(fwd, args, a.reps), median_time(bwd, args, a.reps))
  for C in (int(c) for c in a.chunks.split(",")):
    fwd, bwd = build("chunk", C)
    rows[f"chunk C={C}"] = (median_time(fwd, args, a.reps), median_time(bwd, args, a.reps))

  rec_f, rec_b = rows["recurrent"]
  chunk_rows = {n: t for n, t in rows.items() if n.startswith("chunk")}
  best_f = min(chunk_rows, key=lambda n: chunk_rows[n][0])
  best_b = min(chunk_rows, key=lambda n: chunk_rows[n][1])

  print(f"gated delta rule  B={a.B} T={a.T} H={a.H} K={a.K} V={a.V} float32, "
        f"median of {a.reps}, {jax.devices()[0].platform}")
  print(f"{'impl':<14}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd x':>8}{'f+b x':>8}")
  for n, (tf, tb) in rows.items():
    print(f"{n:<14}{tf * 1e3:>10.1f}{tb * 1e3:>12.1f}{rec_f / tf:>8.2f}{rec_b / tb:>8.2f}")
  result = {
    "shape": {"B": a.B, "T": a.T, "H": a.H, "K": a.K, "V": a.V},
    "recurrent_fwd_s": rec_f,
    "recurrent_fwd_bwd_s": rec_b,
    "chunk_fwd_s": {n.split("=")[1]: t[0] for n, t in chunk_rows.items()},
    "chunk_fwd_bwd_s": {n.split("=")[1]: t[1] for n, t in chunk_rows.items()},
    "best_chunk_fwd": int(best_f.split("=")[1]),
    "best_chunk_fwd_bwd": int(best_b.split("=")[1]),
    "speedup_fwd": rec_f / chunk_rows[best_f][0],
    "speedup_fwd_bwd": rec_b / chunk_rows[best_b][1],
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
