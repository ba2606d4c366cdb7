"""Compiled memory of the loss, forward and backward: chunked (ops/chunked_ce.py) against the
plain float32 cross-entropy over full logits, in the same run.

  python experiments/benchmarks/loss_memory.py [--vocab 151936] [--seq 4096] [--d-model 1024]
      [--chunk N] [--dtype float32] [--untied] [--check-vocab 4096]

The function measured is value_and_grad of the masked CE sum w.r.t. the final-normed features
x [1, T, D] and the head weight (tied embedding [V, D] by default: Qwen3-0.6B's head,
D = 1024, V = 151,936). Memory is XLA's analysis of the compiled program
(`memory_analysis()`): temp bytes (the loss's working memory: logits, softmax, their
gradients) and output bytes (the loss and the gradients dx, dW: the same shapes in both).
The ratio key is (temp + output) chunked over (temp + output) plain; the temp-only ratio is
reported beside it. Nothing runs at full size; the chunked loss is executed against the plain
one at V = --check-vocab (same T, D) and their values and gradients compared.
Prints a table, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from sleep_jax.ops.chunked_ce import chunked_cross_entropy, project  # noqa: E402
from sleep_jax.train import auto_loss_chunk  # noqa: E402


def loss_fns(tied: bool, chunk: int):
  def plain(x, w, targets, mask):
    logits = project(x, w, tied)  # [1, T, V] float32, as Decoder.head gives token_stats
    return (optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask).sum()

  def chunked(x, w, targets, mask):
    return (chunked_cross_entropy(x, w, targets, tied=tied, chunk=chunk)[0] * mask).sum()

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))  # noqa: E731
  return {"plain": grad(plain), "chunked": grad(chunked)}


def shapes(T: int, D: int, V: int, dtype, tied: bool):
  return (jax.ShapeDtypeStruct((1, T, D), dtype), jax.ShapeDtypeStruct((V, D) if tied else (D, V), dtype),
          jax.ShapeDtypeStruct((1, T), jnp.int32), jax.ShapeDtypeStruct((1, T), jnp.float32))


def memory(fn, args) -> dict:
  t = time.perf_counter()
  mem = fn.lower(*args).compile().memory_analysis()
  return {"temp": mem.temp_size_in_bytes, "output": mem.output_size_in_bytes,
          "argument": mem.argument_size_in_bytes, "compile_s": time.perf_counter() - t}


def check(fns, T: int, D: int, V: int, dtype, tied: bool) -> float:
  """Max relative difference, chunked vs plain, over the loss and both gradients at V."""
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(k[0], (1, T, D), dtype)
  w = (jax.random.normal(k[1], (V, D) if tied else (D, V)) / np.sqrt(D)).astype(dtype)
  targets = jax.random.randint(k[2], (1, T), 0, V)
  mask = (jax.random.uniform(k[3], (1, T)) > 0.2).astype(jnp.float32)
  got, want = (jax.tree.leaves(fns[n](x, w, targets, mask)) for n in ("chunked", "plain"))
  return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) /
                   max(float(jnp.max(jnp.abs(b.astype(jnp.float32)))), 1e-30)) for a, b in zip(got, want))


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--vocab", type=int, default=151936)
  ap.add_argument("--seq", type=int, default=4096)
  ap.add_argument("--d-model", type=int, default=1024)
  ap.add_argument("--chunk", type=int, default=-1, help="positions per chunk (default: train.loss_chunk's auto value at --vocab)")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="features and head weight")
  ap.add_argument("--untied", action="store_true", help="an unembedding [D, V] instead of the tied embedding")
  ap.add_argument("--check-vocab", type=int, default=4096)
  a = ap.parse_args(argv)
  dtype, tied = jnp.dtype(a.dtype), not a.untied
  if a.chunk < 0:
    a.chunk = auto_loss_chunk(a.vocab) or 32
  fns = loss_fns(tied, a.chunk)
  args = shapes(a.seq, a.d_model, a.vocab, dtype, tied)
  mem = {name: memory(fn, args) for name, fn in fns.items()}
  err = check(loss_fns(tied, a.chunk), a.seq, a.d_model, a.check_vocab, dtype, tied)
  total = {n: m["temp"] + m["output"] for n, m in mem.items()}
  result = {"vocab": a.vocab, "seq": a.seq, "d_model": a.d_model, "chunk": a.chunk, "dtype": a.dtype, "tied": tied,
            "backend": jax.default_backend(),
            **{f"{n}_{k}_bytes": m[k] for n, m in mem.items() for k in ("temp", "output", "argument")},
            "memory_ratio_chunked_over_plain": total["chunked"] / total["plain"],
            "temp_ratio_chunked_over_plain": mem["chunked"]["temp"] / mem["plain"]["temp"],
            "check_vocab": a.check_vocab, "check_max_rel_diff": err}
  gb = lambda b: f"{b / 2**30:8.3f}"  # noqa: E731
  print(f"loss fwd+bwd, V={a.vocab}, T={a.seq}, D={a.d_model}, {a.dtype}, {'tied' if tied else 'untied'}, "
        f"chunk={a.chunk} ({jax.default_backend()})")
  print(f"{'loss':10s} {'temp GiB':>9s} {'output GiB':>11s} {'temp+out GiB':>13s} {'compile s':>10s}")
  for n, m in mem.items():
    print(f"{n:10s} {gb(m['temp']):>9s} {gb(m['output']):>11s} {gb(total[n]):>13s} {m['compile_s']:10.1f}")
  print(f"ratio (temp+output) {result['memory_ratio_chunked_over_plain']:.4f}; temp only "
        f"{result['temp_ratio_chunked_over_plain']:.4f}; chunked vs plain at V={a.check_vocab}: max rel diff {err:.2e}")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
