"""Wake decoding speed vs context length: the sleeping hybrid against a full-attention transformer.

    python experiments/benchmarks/decode.py [--contexts 1024,32768] [--d-model 256] [--chunk-len 256]

Both models have the same width, heads and depth (hybrid attn-gdn-attn-gdn, transformer of
4 attention layers). The decode state after C tokens of context is constructed directly
(random fast weights / KV entries, position counter t = C), then `--steps` real greedy decode
steps are timed as one jitted `lax.scan` (median over interleaved repetitions, one process). With
steps = chunk_len every timed window includes exactly one sleep (N passes over a chunk), so
the sleeping model's figure is its amortised cost. The hybrid's state has the same shapes at
every context length, so it compiles once; the transformer's KV cache holds C + steps
positions. Goals: hybrid speed(32k) / speed(1k) >= 0.9 and hybrid / transformer at 32k >= 5.
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
from flax import nnx  # noqa: E402

from sleep_jax.config import Config, ModelConfig, SleepConfig  # noqa: E402
from sleep_jax.generate import decode_step, init_cache, sample_logits  # noqa: E402
from sleep_jax.models import model_factory  # noqa: E402


def configs(a):
  common = dict(vocab_size=256, d_model=a.d_model, n_heads=a.heads, head_dim=a.d_model // a.heads, d_ff=4 * a.d_model)
  sleep = SleepConfig(passes=a.passes, chunk_len=a.chunk_len)
  hybrid = Config(model=ModelConfig(kind="hybrid", layer_pattern=["attn", "gdn"], pattern_repeats=2, eviction="hard",
                                    gdn_chunk=64, **common), sleep=sleep)
  full = Config(model=ModelConfig(kind="transformer", n_layers=4, eviction="none", **common), sleep=sleep)
  return hybrid, full


def filled(cache, t: int, key):
  """The cache after t tokens: random entries everywhere, the position counter at t."""
  leaves, treedef = jax.tree.flatten(cache)
  keys = jax.random.split(key, len(leaves))
  out = [jnp.full_like(x, t) if x.ndim == 0 else
         (0.05 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
         else x for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, out)


def make_decoder(graphdef, cfg, steps: int):
  @jax.jit
  def run(state, cache, token_B):
    model = nnx.merge(graphdef, state)

    def body(carry, _):
      cache, tok = carry
      logits, cache = decode_step(model, cache, tok, cfg)
      return (cache, sample_logits(logits, None)), None

    (cache, tok), _ = jax.lax.scan(body, (cache, token_B), None, length=steps)
    return tok, cache["state"]["t"]

  return run


def time_interleaved(runs: dict, reps: int) -> dict:
  """Median seconds per entry of {name: (fn, args)}, repetitions interleaved across entries so
  that load drift on a shared machine hits every entry alike."""
  for fn, args in runs.values():
    jax.block_until_ready(fn(*args))  # compile + warm-up
  times = {name: [] for name in runs}
  for _ in range(reps):
    for name, (fn, args) in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--contexts", default="1024,32768")
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--chunk-len", type=int, default=256)
  p.add_argument("--passes", type=int, default=2)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=0, help="timed decode steps (default: chunk_len)")
  p.add_argument("--reps", type=int, default=7, help="hybrid repetitions (the transformer gets half)")
  a = p.parse_args()
  steps = a.steps or a.chunk_len
  contexts = [int(c) for c in a.contexts.split(",")]
  hcfg, tcfg = configs(a)
  B, key = a.batch, jax.random.key(0)
  token_B = jnp.zeros((B,), jnp.int32)

  hgraph, hstate = nnx.split(model_factory(hcfg)(nnx.Rngs(0)))
  tgraph, tstate = nnx.split(model_factory(tcfg)(nnx.Rngs(0)))
  hrun = make_decoder(hgraph, hcfg, steps)
  trun = make_decoder(tgraph, tcfg, steps)
  hmodel, tmodel = nnx.merge(hgraph, hstate), nnx.merge(tgraph, tstate)
  rows, runs = {}, {}
  for C in contexts:
    hcache = filled(init_cache(hmodel, B, C + steps, hcfg), C, key)
    tcache = filled(init_cache(tmodel, B, C + steps, tcfg), C, key)
    t_end = int(hrun(hstate, hcache, token_B)[1])
    assert t_end == C + steps, t_end
    runs[("hybrid", C)] = (hrun, (hstate, hcache, token_B))
    runs[("full", C)] = (trun, (tstate, tcache, token_B))
    kv = lambda c: nbytes([g["kv"] for g in c["state"]["layers"] if "kv" in g])
    kv_h = kv(hcache)
    rows[C] = {"hybrid_kv_bytes": kv_h, "hybrid_state_bytes": nbytes(hcache) - kv_h, "full_kv_bytes": kv(tcache)}
  hybrid_runs = {k: v for k, v in runs.items() if k[0] == "hybrid"}
  secs = {**time_interleaved(hybrid_runs, a.reps),
          **time_interleaved({k: v for k, v in runs.items() if k[0] == "full"}, max(1, a.reps // 2))}
  for C in contexts:
    rows[C]["hybrid_tok_s"] = B * steps / secs[("hybrid", C)]
    rows[C]["full_tok_s"] = B * steps / secs[("full", C)]

  print(f"decode: d={a.d_model}, heads={a.heads}, 4 layers, batch={B}, {steps} greedy steps per timing, "
        f"median of {a.reps} (full: {max(1, a.reps // 2)}); hybrid L={a.chunk_len}, N={a.passes}, hard eviction; "
        f"{jax.devices()[0].platform}")
  print(f"{'context':>8}{'hybrid tok/s':>14}{'full tok/s':>12}{'speedup':>9}{'hybrid KV MiB':>15}"
        f"{'hybrid S+conv MiB':>19}{'full KV MiB':>13}")
  for C, r in rows.items():
    print(f"{C:>8}{r['hybrid_tok_s']:>14.1f}{r['full_tok_s']:>12.1f}{r['hybrid_tok_s'] / r['full_tok_s']:>9.2f}"
          f"{r['hybrid_kv_bytes'] / 2**20:>15.2f}{r['hybrid_state_bytes'] / 2**20:>19.2f}"
          f"{r['full_kv_bytes'] / 2**20:>13.1f}")
  lo, hi = min(contexts), max(contexts)
  result = {
      "config": {"d_model": a.d_model, "heads": a.heads, "layers": 4, "batch": B, "chunk_len": a.chunk_len,
                 "passes": a.passes, "steps": steps},
      "rows": {str(C): r for C, r in rows.items()},
      f"decode_speed_{hi // 1024}k_over_{lo // 1024}k": rows[hi]["hybrid_tok_s"] / rows[lo]["hybrid_tok_s"],
      f"full_attention_speed_{hi // 1024}k_over_{lo // 1024}k": rows[hi]["full_tok_s"] / rows[lo]["full_tok_s"],
      f"speedup_vs_full_attention_{hi // 1024}k": rows[hi]["hybrid_tok_s"] / rows[hi]["full_tok_s"],
      "hybrid_kv_bytes": rows[hi]["hybrid_kv_bytes"],
      "hybrid_state_bytes": rows[hi]["hybrid_state_bytes"],
      f"full_kv_bytes_{hi // 1024}k": rows[hi]["full_kv_bytes"],
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
