"""Long-context text evaluation (sleep_jax/longctx.py): the passkey layout, and perplexity by
position against a brute-force recount and the trainer's own eval loss."""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from sleep_jax import data as data_lib
from sleep_jax.config import load_config
from sleep_jax.data.tokenized import ByteTokenizer
from sleep_jax.longctx import KEY_TEXT, QUERY_TEXT, _nll_fn, passkey_examples, perplexity_by_position
from sleep_jax.train import Trainer

L, SEQ = 8, 49


def test_passkey_layout_key_before_the_evictions_question_after():
  tok = ByteTokenizer()
  filler = np.frombuffer(b"x = 1\n" * 100, np.uint8).astype(np.int32)
  for gap in (1, 2, 4):
    tokens, mask = passkey_examples(tok, filler, n=3, gap=gap, L=32, T=257, seed=0)
    for row, m in zip(tokens, mask):
      text = bytes(row.astype(np.uint8)).decode()
      assert text[32:].startswith(KEY_TEXT)  # the key opens chunk 1
      digits = text[32 + len(KEY_TEXT):32 + len(KEY_TEXT) + 5]
      q_end = (1 + gap) * 32 + 16  # the question ends gap chunks later, mid-chunk
      assert text[q_end - len(QUERY_TEXT):q_end] == QUERY_TEXT
      assert bytes(row[m > 0].astype(np.uint8)).decode() == digits and digits.isdigit()
  assert not np.array_equal(passkey_examples(tok, filler, n=2, gap=1, L=32, T=257, seed=0)[0],
                            passkey_examples(tok, filler, n=2, gap=1, L=32, T=257, seed=1)[0])


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("longctx")
  rng = np.random.default_rng(0)
  docs = ["".join(chr(c) for c in rng.integers(97, 123, rng.integers(5, 60))) for _ in range(120)]
  (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  cfg = load_config("experiments/tiny.yaml", [
      "model.kind=hybrid", "model.layer_pattern=[gdn,attn]", "model.eviction=hard", "model.vocab_size=256",
      "data.source=corpus", f"data.corpora=[{{path: {root / 'docs.jsonl'}, format: jsonl}}]",
      "data.tokenizer=bytes", f"data.seq_len={SEQ}", "data.eval_fraction=0.2", f"data.data_dir={root / 'data'}",
      "data.prefetch=0", f"sleep.chunk_len={L}", "sleep.passes=2", "sleep.schedule=every_chunk",
      "train.batch_size=8", f"run_dir={root / 'run'}"])
  trainer = Trainer(cfg)
  return cfg, trainer, trainer.init_state()["params"]


def test_perplexity_by_position_recounts_and_matches_eval_loss(text_run):
  cfg, trainer, params = text_run
  r = perplexity_by_position(trainer, params, num_batches=3)
  # Brute force over the same batches: per-token loops, no vectorised bucketing.
  fn = _nll_fn(trainer)
  tot = n_tot = after = n_after = loss_sum = tokens = 0.0
  for batch in data_lib.make_eval_batches(cfg.data, batch_size=cfg.train.batch_size, num_batches=3):
    local = {k: batch[k] for k in ("tokens", "loss_mask", "positions", "segment_ids")}
    nll, _ = jax.device_get(fn(params, local))
    ev = jax.device_get(trainer.eval_step(params, local))
    loss_sum, tokens = loss_sum + float(ev["loss_sum"]), tokens + float(ev["tokens"])
    for b in range(nll.shape[0]):
      if not batch["valid"][b]:
        continue
      seg = batch["segment_ids"][b]
      for t in range(nll.shape[1]):
        if batch["loss_mask"][b, t + 1] == 0:
          continue
        tot, n_tot = tot + nll[b, t], n_tot + 1
        start = t
        while start > 0 and seg[start - 1] == seg[t]:
          start -= 1
        if t >= L and start < (t // L) * L and t % L < L // 4:
          after, n_after = after + nll[b, t], n_after + 1
  assert r["eval_tokens"] == n_tot == tokens and r["after_eviction_tokens"] == n_after > 0
  np.testing.assert_allclose(r["ppl"], math.exp(tot / n_tot), rtol=1e-5)
  np.testing.assert_allclose(r["ppl"], math.exp(loss_sum / tokens), rtol=1e-4)  # the trainer's own loss
  np.testing.assert_allclose(r["ppl_after_eviction"], math.exp(after / n_after), rtol=1e-5)
  assert len(r["ppl_by_offset"]) == L and set(r["ppl_by_distance"]) <= {"[0,8)", "[8,16)", "[16,32)", "[32,64)"}


def test_long_context_eval_needs_a_text_run(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.yaml").write_text("data: {source: task}\n")
  out = subprocess.run([sys.executable, "-m", "sleep_jax.cli", "eval", str(run), "--long-context"],
                       capture_output=True, text=True)
  assert out.returncode == 2 and "--long-context needs a text corpus" in out.stderr.strip().splitlines()[-1]
