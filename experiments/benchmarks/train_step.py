"""Train-step CPU-MFU against a jnp.dot peak timed in the same process; async-save stall;
share of step time spent waiting for data.

  python experiments/benchmarks/train_step.py [--model transformer|hybrid|all] [--steps 8]

MFU counts model FLOPs (6 x matmul params x tokens + causal attention, PaLM appendix B
style, no remat recompute) divided by step time, over the peak of a large f32 matmul. This
machine's throughput drifts by up to 30% within minutes (a shared VM), so the peak is timed
right before and right after every step, the higher of the two counts, each step's MFU is
taken against its own peak, and the reported MFU is the median of those ratios.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from sleep_jax import data as data_lib  # noqa: E402
from sleep_jax import sharding as shd  # noqa: E402
from sleep_jax.checkpoint import Checkpointer  # noqa: E402
from sleep_jax.config import load_config  # noqa: E402
from sleep_jax.train import Trainer  # noqa: E402


_DOT = {}


def dot_peak(n: int = 2048, reps: int = 10) -> float:
  """FLOP/s of the best of `reps` [n, n] x [n, n] f32 jnp.dot calls."""
  if n not in _DOT:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    _DOT[n] = (jax.jit(jnp.dot), a, b)
    _DOT[n][0](a, b).block_until_ready()
  f, a, b = _DOT[n]
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(times)


def model_flops_per_step(cfg, params) -> float:
  """6 * (matmul params) * tokens + causal attention (fwd+bwd) for attention layers + the
  gated delta recurrence for GDN layers (its matmul-like terms S k, the rank-1 write and
  S q: 6 K V per token and head forward, x3 with the backward, as attention is counted)."""
  B, T = cfg.train.batch_size, cfg.data.seq_len - 1
  n_matmul = sum(p.size for path, p in jax.tree_util.tree_leaves_with_path(params)
                 if p.ndim >= 2 and "embed" != getattr(path[-1], "key", None) and "scale" not in str(path[-1]))
  mc = cfg.model
  hybrid = mc.kind == "hybrid"
  n_attn_layers = mc.layer_pattern.count("attn") * mc.pattern_repeats if hybrid else mc.n_layers
  n_gdn_layers = mc.layer_pattern.count("gdn") * mc.pattern_repeats if hybrid else 0
  attn_width = mc.n_heads * mc.head_dim
  # QK^T and PV: 2 matmuls x 2 flops x T^2/2 (causal) x width, times 3 for fwd + bwd.
  attn = 3 * 2 * 2 * (T * T / 2) * attn_width * n_attn_layers * B
  gdn = 3 * 6 * mc.head_dim * mc.head_dim * mc.n_heads * n_gdn_layers * B * T
  return 6 * n_matmul * B * T + attn + gdn


def write_corpus(path: str, n_bytes: int = 4_000_000) -> None:
  rng = np.random.default_rng(0)
  words = ["sleep", "dream", "memory", "state", "chunk", "pass", "weight", "model", "token", "the", "a", "of"]
  text = " ".join(rng.choice(words, size=n_bytes // 5))
  with open(path, "w") as f:
    f.write(text[:n_bytes])


def bench(name: str, overrides: list[str], steps: int, tmp: str) -> dict:
  cfg = load_config(None, overrides + [f"run_dir={tmp}/{name}", f"data.data_dir={tmp}/data",
                                       "data.source=text", f"data.text_path={tmp}/corpus.txt"])
  trainer = Trainer(cfg)
  state = trainer.init_state()
  it = data_lib.make_train_iterator(cfg.data, global_batch_size=cfg.train.batch_size, seed=0)
  state, m = trainer.train_step(state, shd.global_batch(next(it), trainer.mesh))  # compile
  jax.block_until_ready(m)
  step_times, data_times, peaks = [], [], []
  for _ in range(steps):  # no saves here: a background save would slow the peak timing too
    before = dot_peak(reps=5)
    t0 = time.perf_counter()
    local = next(it)
    t1 = time.perf_counter()
    state, m = trainer.train_step(state, shd.global_batch(local, trainer.mesh))
    jax.block_until_ready(m)
    data_times.append(t1 - t0)
    step_times.append(time.perf_counter() - t0)
    peaks.append(max(before, dot_peak(reps=5)))  # the higher of the peaks around the step
  ckpt = Checkpointer(cfg.run_dir, keep=2, async_save=True)
  save_stalls = []
  for i in range(3):  # an async save, as the loop does it; the stall is the blocking part
    state, m = trainer.train_step(state, shd.global_batch(next(it), trainer.mesh))
    jax.block_until_ready(m)
    ts = time.perf_counter()
    ckpt.save(steps + i, state, it.get_state())
    save_stalls.append(time.perf_counter() - ts)
  ckpt.close()
  step = statistics.median(step_times)
  flops = model_flops_per_step(cfg, state["params"])
  mfu = statistics.median(flops / s / p for s, p in zip(step_times, peaks))
  return {"model": name, "step_s": step, "mfu": mfu, "model_tflops": flops / 1e12,
          "peak_gflops": statistics.median(peaks) / 1e9,
          "save_stall_frac": statistics.median(save_stalls) / step,
          "data_wait_frac": sum(data_times) / sum(step_times),
          "tokens_per_s": cfg.train.batch_size * (cfg.data.seq_len - 1) / step}


COMMON = ["train.batch_size=8", "data.seq_len=513", "model.vocab_size=256", "model.d_model=512",
          "model.n_heads=8", "model.head_dim=64", "model.d_ff=2048", "model.remat=false",
          "train.warmup_steps=1", "data.train_examples=100000", "data.eval_examples=16"]
# Unrolled layers (model.scan_layers=false) are the CPU setting for these 4-layer models: a
# lax.scan over stacked layers costs XLA:CPU 15-25% here (stacked residuals written and
# read with dynamic slices, zero-filled gradient buffers); the scanned variants are listed too.
HYBRID = ["model.kind=hybrid", "model.layer_pattern=[attn,gdn]", "model.pattern_repeats=2",
          "model.eviction=hard", "sleep.chunk_len=512", "sleep.passes=1"]
MODELS = {
    "transformer": ["model.kind=transformer", "model.n_layers=4", "model.scan_layers=false"],
    "hybrid": HYBRID + ["model.scan_layers=false"],
    "transformer_scanned": ["model.kind=transformer", "model.n_layers=4", "model.scan_layers=true"],
    "hybrid_scanned": HYBRID + ["model.scan_layers=true"],
}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="all", choices=["all", *MODELS])
  ap.add_argument("--steps", type=int, default=8)
  args = ap.parse_args()
  names = list(MODELS) if args.model == "all" else [args.model]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    write_corpus(os.path.join(tmp, "corpus.txt"))
    for name in names:
      rows.append(bench(name, COMMON + MODELS[name], args.steps, tmp))
  print(f"{'model':<22}{'step s':>9}{'peak GF/s':>11}{'MFU':>7}{'tok/s':>9}{'save stall':>12}{'data wait':>11}")
  for r in rows:
    print(f"{r['model']:<22}{r['step_s']:>9.3f}{r['peak_gflops']:>11.0f}{r['mfu']:>7.2f}{r['tokens_per_s']:>9.0f}"
          f"{r['save_stall_frac']:>12.3f}{r['data_wait_frac']:>11.4f}")
  out = {"devices": jax.device_count()}
  for r in rows:
    prefix = "" if r["model"] == "transformer" else f"{r['model']}_"
    out.update({f"{prefix}mfu": r["mfu"], f"{prefix}peak_gflops": r["peak_gflops"], f"{prefix}save_stall_frac": r["save_stall_frac"],
                f"{prefix}data_wait_frac": r["data_wait_frac"], f"{prefix}step_s": r["step_s"]})
  print(json.dumps(out))


if __name__ == "__main__":
  main()
