"""Chunkwise vs recurrent gated delta rule on this CPU: forward and forward+backward.

    python experiments/benchmarks/gdn.py [--reps 7] [--T 4096] [--chunks 32,64,128]

Times are medians (and minima) over repetitions after a compile and a warm-up call, all in
one process, so the ratios (recurrent time / chunk time) are comparable even on a shared,
noisy machine. Prints a table, then one JSON object on the last line; speedup_fwd and
speedup_fwd_bwd compare medians, with the best chunk size for each.
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


def time_it(f, args, reps):
  """(median, min) wall seconds over `reps` calls, after a compile and a warm-up call."""
  jax.block_until_ready(f(*args))
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), min(times)


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

  load_start = os.getloadavg()[0]
  rows = {}  # name -> ((fwd median, fwd min), (fwd+bwd median, fwd+bwd min))
  fwd, bwd = build("recurrent", 64)
  rows["recurrent"] = (time_it(fwd, args, a.reps), time_it(bwd, args, a.reps))
  for C in (int(c) for c in a.chunks.split(",")):
    fwd, bwd = build("chunk", C)
    rows[f"chunk C={C}"] = (time_it(fwd, args, a.reps), time_it(bwd, args, a.reps))

  (rec_f, rec_f_min), (rec_b, rec_b_min) = rows["recurrent"]
  chunks = {int(n.split("=")[1]): t for n, t in rows.items() if n.startswith("chunk")}
  best_f = min(chunks, key=lambda c: chunks[c][0][0])
  best_b = min(chunks, key=lambda c: chunks[c][1][0])

  print(f"gated delta rule  B={a.B} T={a.T} H={a.H} K={a.K} V={a.V} float32, {jax.devices()[0].platform}, "
        f"median (min) of {a.reps}, load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}")
  print(f"{'impl':<14}{'fwd ms':>16}{'fwd+bwd ms':>18}{'fwd x':>8}{'f+b x':>8}")
  for n, ((tf, tf_min), (tb, tb_min)) in rows.items():
    print(f"{n:<14}{tf * 1e3:>8.1f} ({tf_min * 1e3:>5.1f}){tb * 1e3:>9.1f} ({tb_min * 1e3:>6.1f})"
          f"{rec_f / tf:>8.2f}{rec_b / tb:>8.2f}")
  result = {
    "shape": {"B": a.B, "T": a.T, "H": a.H, "K": a.K, "V": a.V},
    "reps": a.reps,
    "recurrent_fwd_s": rec_f,
    "recurrent_fwd_bwd_s": rec_b,
    "chunk_fwd_s": {c: t[0][0] for c, t in chunks.items()},
    "chunk_fwd_bwd_s": {c: t[1][0] for c, t in chunks.items()},
    "best_chunk_fwd": best_f,
    "best_chunk_fwd_bwd": best_b,
    "speedup_fwd": rec_f / chunks[best_f][0][0],
    "speedup_fwd_bwd": rec_b / chunks[best_b][1][0],
    # The same ratios from the fastest repetition of each: less sensitive to other load.
    "speedup_fwd_min": rec_f_min / min(t[0][1] for t in chunks.values()),
    "speedup_fwd_bwd_min": rec_b_min / min(t[1][1] for t in chunks.values()),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
