"""Long-context evaluation on text: what a model keeps of text it can no longer attend to.

Two measurements over a run's newest checkpoint (`sleep-jax eval RUN_DIR --long-context`):

* Perplexity by position. Every target of the packed eval split, bucketed by its offset
  since the last eviction (stream index t mod L: at offset 0 attention has just been
  emptied, so a hard-eviction model knows the earlier chunks only through its fast weights
  S) and by its distance to the start of its document. `ppl_after_eviction` is the
  perplexity of the targets in the first L/4 positions of every chunk after the first whose
  document began in an earlier chunk (there is something to remember), the figure paper A's
  claim is about. Input position t predicts token t + 1.
* Passkey retrieval across evictions. Real eval text with `passkey = "DDDDD"` written at the
  start of one chunk and, `gap` chunks later (after `gap` evictions), `assert passkey == "`
  asked; accuracy = every digit token right under teacher forcing (the greedy answer). The
  digits are random per example; filler is the eval split's own text.

Models without eviction are measured at the same positions (nothing is evicted there: the
full-attention reference).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax import data as data_lib
from sleep_jax import losses
from sleep_jax.config import Config
from sleep_jax.models import forward
from sleep_jax.train import Trainer, segment_inputs, split_batch

KEY_TEXT, QUERY_TEXT = 'passkey = "', '\nassert passkey == "'


def _nll_fn(trainer: Trainer):
  cfg = trainer.cfg

  def nll(params, batch):
    inputs, targets, mask = split_batch(batch)
    logits, _ = forward(trainer.model(params), inputs, mask, cfg, training=False, **segment_inputs(batch))
    ce_BT = losses.token_ce(logits, targets)
    return ce_BT, jnp.argmax(logits, -1) == targets

  return jax.jit(nll)


def _segment_start(seg_BT: np.ndarray) -> np.ndarray:
  """Index of the first token of each token's segment (within its row)."""
  B, T = seg_BT.shape
  idx = np.broadcast_to(np.arange(T), (B, T))
  new = np.ones((B, T), bool)
  new[:, 1:] = seg_BT[:, 1:] != seg_BT[:, :-1]
  return np.maximum.accumulate(np.where(new, idx, 0), axis=1)


def _ppl(nll_sum: float, n: float) -> float:
  return float(math.exp(nll_sum / n)) if n else float("nan")


def perplexity_by_position(trainer: Trainer, params, *, num_batches: int | None = None) -> dict[str, Any]:
  """Perplexity overall, right after an eviction, by offset since eviction, by distance to
  the document start (buckets [0, L), [L, 2L), [2L, 4L), ...)."""
  cfg = trainer.cfg
  L = cfg.sleep.chunk_len
  fn = _nll_fn(trainer)
  off_sum, off_n = np.zeros(L), np.zeros(L)
  dist_sum: dict[int, float] = {}
  dist_n: dict[int, float] = {}
  after_sum = after_n = all_sum = all_n = 0.0
  B = cfg.train.batch_size
  for batch in data_lib.make_eval_batches(cfg.data, batch_size=B, num_batches=num_batches):
    local = {k: batch[k] for k in ("tokens", "loss_mask", "positions", "segment_ids") if k in batch}
    nll, _ = jax.device_get(fn(params, {k: jnp.asarray(v) for k, v in local.items()}))
    mask = (batch["loss_mask"][:, 1:] > 0) & batch["valid"][:, None]
    T = nll.shape[1]
    t = np.broadcast_to(np.arange(T), nll.shape)  # input stream index (predicts t + 1)
    seg = batch.get("segment_ids", np.ones_like(batch["tokens"]))[:, :-1]
    start = _segment_start(seg)
    offset, chunk_start = t % L, (t // L) * L
    remembered = mask & (t >= L) & (start < chunk_start)  # its document began before this chunk
    np.add.at(off_sum, offset[remembered], nll[remembered])
    np.add.at(off_n, offset[remembered], 1)
    after = remembered & (offset < max(1, L // 4))
    after_sum += float(nll[after].sum())
    after_n += float(after.sum())
    all_sum += float(nll[mask].sum())
    all_n += float(mask.sum())
    dist = t - start
    bucket = np.where(dist < L, 0, np.floor(np.log2(np.maximum(dist, 1) / L)).astype(int) + 1)
    for b in np.unique(bucket[mask]):
      sel = mask & (bucket == b)
      dist_sum[int(b)] = dist_sum.get(int(b), 0.0) + float(nll[sel].sum())
      dist_n[int(b)] = dist_n.get(int(b), 0.0) + float(sel.sum())
  label = lambda b: f"[0,{L})" if b == 0 else f"[{L << (b - 1)},{L << b})"  # noqa: E731
  return {
      "ppl": _ppl(all_sum, all_n), "eval_tokens": int(all_n),
      "ppl_after_eviction": _ppl(after_sum, after_n), "after_eviction_tokens": int(after_n),
      "ppl_by_offset": [_ppl(s, n) for s, n in zip(off_sum, off_n)],
      "ppl_by_distance": {label(b): _ppl(dist_sum[b], dist_n[b]) for b in sorted(dist_sum)},
  }


def passkey_examples(tok, filler_N: np.ndarray, *, n: int, gap: int, L: int, T: int, seed: int):
  """(tokens [n, T], answer mask [n, T]): the key at the start of chunk 1, the question
  `gap` chunks later, its digits the targets. filler_N: eval text tokens to fill with."""
  rng = np.random.default_rng([seed, gap])
  key, query = tok.encode(KEY_TEXT), tok.encode(QUERY_TEXT)
  tokens, mask = np.zeros((n, T), np.int32), np.zeros((n, T), np.int32)
  for i in range(n):
    digits = tok.encode("".join(str(d) for d in rng.integers(0, 10, 5)))
    stmt = key + digits + tok.encode('"\n')
    q_end = (1 + gap) * L + L // 2  # the question ends mid-chunk, gap evictions after the key
    a_end = q_end + len(digits)
    if a_end > T:
      raise ValueError(f"passkey gap {gap} does not fit in {T} tokens with chunk_len {L}")
    fill_len = q_end - len(query) - L - len(stmt)
    if fill_len < 0:
      raise ValueError(f"chunk_len {L} is too short for a passkey statement of {len(stmt)} tokens")
    start = int(rng.integers(0, max(1, len(filler_N) - T)))
    fill = filler_N[start:start + T]
    row = list(fill[:L]) + stmt + list(fill[L:L + fill_len]) + query + digits
    row += list(fill[len(row):T]) if len(row) < T else []
    tokens[i, :T] = np.asarray(row[:T], np.int32)
    mask[i, q_end:a_end] = 1
  return tokens, mask


def passkey_accuracy(trainer: Trainer, params, tok, filler_N: np.ndarray, *, n: int = 32,
                     gaps: tuple[int, ...] = (1, 2, 4)) -> dict[str, float]:
  """Exact-match accuracy of the passkey per gap (evictions between key and question)."""
  cfg = trainer.cfg
  L, T = cfg.sleep.chunk_len, cfg.data.seq_len
  fn = _nll_fn(trainer)
  out = {}
  for gap in gaps:
    if (1 + gap) * L + L // 2 + 8 > T:
      continue
    tokens, mask = passkey_examples(tok, filler_N, n=n, gap=gap, L=L, T=T, seed=cfg.seed)
    B = cfg.train.batch_size
    hits = []
    for s in range(0, n, B):
      t, m = tokens[s:s + B], mask[s:s + B]
      pad = B - len(t)
      batch = {"tokens": np.pad(t, ((0, pad), (0, 0))), "loss_mask": np.pad(m, ((0, pad), (0, 0)))}
      _, ok = jax.device_get(fn(params, {k: jnp.asarray(v) for k, v in batch.items()}))
      target = batch["loss_mask"][:, 1:] > 0
      hits += list(np.all(ok | ~target, axis=1)[:len(t)])
    out[f"gap{gap}"] = float(np.mean(hits))
  out["mean"] = float(np.mean([v for k, v in out.items()])) if out else float("nan")
  return out


def eval_filler(cfg: Config, n_batches: int = 4) -> np.ndarray:
  """Eval-split text tokens, concatenated (padding dropped), to fill passkey examples."""
  parts = []
  for batch in data_lib.make_eval_batches(cfg.data, batch_size=cfg.train.batch_size, num_batches=n_batches):
    keep = batch["segment_ids"] > 0 if "segment_ids" in batch else batch["loss_mask"] >= 0
    parts.append(batch["tokens"][keep & batch["valid"][:, None]])
  return np.concatenate(parts)


def evaluate_long_context(cfg: Config, *, num_batches: int | None = None, passkeys: int = 32) -> dict[str, Any]:
  """Both measurements on the newest checkpoint of cfg.run_dir; writes long_context.json there."""
  from sleep_jax.data.tokenized import data_tokenizer
  from sleep_jax.evaluate import restore_for_eval

  if cfg.data.source != "corpus":
    raise ValueError("long-context evaluation needs a text corpus (data.source=corpus)")
  trainer, step, params = restore_for_eval(cfg)
  result = {"step": step, "passes": cfg.sleep.passes, "chunk_len": cfg.sleep.chunk_len,
            **perplexity_by_position(trainer, params, num_batches=num_batches)}
  tok = data_tokenizer(cfg.data)
  result["passkey"] = passkey_accuracy(trainer, params, tok, eval_filler(cfg), n=passkeys)
  result["passkey_accuracy"] = result["passkey"]["mean"]
  if jax.process_index() == 0:
    with open(os.path.join(cfg.run_dir, "long_context.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result


def format_long_context(r: dict[str, Any]) -> str:
  """A few human lines: the headline figures, then the by-offset curve."""
  lines = [f"long context (step {r['step']}, N = {r['passes']}, chunk {r['chunk_len']}): ppl {r['ppl']:.3f}, "
           f"right after an eviction {r['ppl_after_eviction']:.3f} ({r['after_eviction_tokens']} tokens), "
           f"passkey {r['passkey_accuracy']:.3f} {json.dumps(r['passkey'])}",
           "ppl by distance to document start: " + ", ".join(f"{k} {v:.3f}" for k, v in r["ppl_by_distance"].items()),
           "ppl by offset since eviction: " + " ".join(f"{v:.2f}" for v in r["ppl_by_offset"])]
  return "\n".join(lines)
