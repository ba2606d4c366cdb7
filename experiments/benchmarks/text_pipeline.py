"""The tokenized text pipeline on the real offline corpus (the Python standard library's own
sources): tokenizing throughput, data wait per train step, packing efficiency.

    python experiments/benchmarks/text_pipeline.py [--seq-len 1024] [--vocab 8192] [--steps 40]

1. A byte-level BPE of --vocab tokens is trained on the corpus's train files (once; cached in
   --work), then one timed pass reads and tokenizes every train document in grain worker
   threads (--threads): tokens/s and MB/s of UTF-8 text.
2. The packed array_record cache is built (the first pass of `sleep-jax train`) and its
   packing efficiency read back: real tokens / window tokens (goal >= 0.98).
3. The train iterator (shuffled windows, --batch rows of --seq-len) feeds a small jitted
   step (an embedding lookup and a d x d matmul per token, block_until_ready); data wait is
   the time blocked in next(iterator), per step and as a share of the step.
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

from sleep_jax.config import CorpusConfig, DataConfig  # noqa: E402
from sleep_jax.data import make_train_iterator  # noqa: E402
from sleep_jax.data.tokenized import corpus_builders, data_tokenizer, pack_report, scan_all, tokenized_documents  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--subdir", default="", help="a stdlib subdirectory only (tests); default the whole stdlib")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--d", type=int, default=256, help="width of the simulated step's matmul")
  p.add_argument("--work", default="/tmp/sleep_jax_bench_text", help="tokenizer and dataset cache")
  a = p.parse_args()

  tag = f"{a.subdir or 'all'}_{a.vocab}"
  cfg = DataConfig(source="corpus", corpora=[CorpusConfig(format="stdlib", path=a.subdir, name="stdlib")],
                   tokenizer=os.path.join(a.work, f"tokenizer_{tag}"), train_tokenizer_vocab=a.vocab,
                   seq_len=a.seq_len, data_dir=os.path.join(a.work, "datasets"), tokenize_threads=a.threads,
                   prefetch=2)
  t0 = time.perf_counter()
  tok = data_tokenizer(cfg)
  t_tok = time.perf_counter() - t0
  corpus = scan_all(cfg)[0]
  refs = corpus.refs["train"]

  # 1. tokenizing throughput (read + encode in grain threads, nothing written)
  t0 = time.perf_counter()
  n_tokens = sum(len(ids) for ids in tokenized_documents(refs, tok, threads=a.threads, progress=False))
  t_encode = time.perf_counter() - t0
  n_bytes = sum(r[3] - r[2] for r in refs)

  # 2. the packed cache and its packing efficiency
  t0 = time.perf_counter()
  (_, builder), = corpus_builders(cfg, prepare=True)
  t_build = time.perf_counter() - t0
  report = pack_report(builder)["train"]

  # 3. data wait while a small jitted step runs
  it = make_train_iterator(cfg, global_batch_size=a.batch, seed=0)
  emb = jax.random.normal(jax.random.key(0), (tok.vocab_size, a.d)) * 0.02
  w = jax.random.normal(jax.random.key(1), (a.d, a.d)) * 0.02

  @jax.jit
  def step(tokens_BT, segment_ids_BT):
    h_BTD = jnp.take(emb, tokens_BT, axis=0)
    return (jnp.tanh(h_BTD @ w) * (segment_ids_BT > 0)[..., None]).sum()

  first = next(it)
  step(first["tokens"], first["segment_ids"]).block_until_ready()  # compile outside the timing
  waits, steps = [], []
  for _ in range(a.steps):
    t0 = time.perf_counter()
    batch = next(it)
    t1 = time.perf_counter()
    step(batch["tokens"], batch["segment_ids"]).block_until_ready()
    waits.append(t1 - t0)
    steps.append(time.perf_counter() - t0)
  it.close()
  wait_ms, step_ms = statistics.median(waits) * 1e3, statistics.median(steps) * 1e3

  result = {
      "corpus": f"stdlib{('/' + a.subdir) if a.subdir else ''} (python {sys.version.split()[0]})",
      "documents": report["documents"], "text_mb": round(n_bytes / 1e6, 2), "tokens": n_tokens,
      "vocab_size": tok.vocab_size, "threads": a.threads, "tokenizer_train_s": round(t_tok, 2),
      "tokens_per_s": round(n_tokens / t_encode), "mb_per_s": round(n_bytes / 1e6 / t_encode, 2),
      "build_s": round(t_build, 2), "seq_len": a.seq_len, "windows": report["windows"],
      "cut_documents": report["cut_documents"], "packing_efficiency": round(report["packing_efficiency"], 5),
      "batch": a.batch, "step_ms": round(step_ms, 3), "data_wait_ms": round(wait_ms, 3),
      "data_wait_frac": round(wait_ms / step_ms, 4), "mean_data_wait_ms": round(statistics.mean(waits) * 1e3, 3),
  }
  print(f"text pipeline on {result['corpus']}: {result['documents']} train files, {result['text_mb']} MB, "
        f"BPE vocab {tok.vocab_size}, {a.threads} grain threads, {jax.devices()[0].platform}")
  print(f"{'measure':<34}{'value':>14}")
  for name, key, fmt in (("tokenize tokens/s", "tokens_per_s", "{:,}"), ("tokenize MB/s", "mb_per_s", "{}"),
                         ("tokens (train split)", "tokens", "{:,}"), ("cache build s (first pass)", "build_s", "{}"),
                         (f"windows of {a.seq_len}", "windows", "{:,}"), ("documents cut at a window edge", "cut_documents", "{:,}"),
                         ("packing efficiency", "packing_efficiency", "{:.5f}"), ("step ms (median)", "step_ms", "{}"),
                         ("data wait ms per step (median)", "data_wait_ms", "{}"), ("data wait / step", "data_wait_frac", "{}")):
    print(f"{name:<34}{fmt.format(result[key]):>14}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
