"""Packed text from the pipeline, through the Trainer's forward: every document of a packed
batch gets exactly the logits it gets alone (a hybrid with GDN and sliding attention, at
N = 1 and N = 2), and the windows hold exactly the documents, in order.

"Alone" is the document in a row of its own at the same stream offset, everything else
padding: the chunk schedule (where consolidation chunks begin) is a function of the stream
index for any row, so the reference keeps the offset and changes only what surrounds it.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.config import Config, CorpusConfig, DataConfig, ModelConfig, SleepConfig
from sleep_jax.data import data_sources, make_train_iterator
from sleep_jax.models import forward, model_factory
from sleep_jax.train import segment_inputs
from flax import nnx

SEQ = 48


def _docs(n=40, seed=0):
  rng = np.random.default_rng(seed)
  return ["".join(chr(c) for c in rng.integers(97, 123, rng.integers(3, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
  root = tmp_path_factory.mktemp("packed")
  docs = _docs()
  (root / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
  cfg = DataConfig(source="corpus", corpora=[CorpusConfig(path=str(root / "docs.jsonl"), format="jsonl", field="body")],
                   tokenizer="bytes", seq_len=SEQ, eval_fraction=0.1, data_dir=str(root / "data"), prefetch=0)
  return cfg, docs


def test_windows_hold_the_documents_in_order(packed):
  cfg, docs = packed
  train = data_sources(cfg)["train"][0]
  pieces, stream = [], []
  for i in range(len(train)):
    w = train[i]
    seg, pos, mask, tok = w["segment_ids"], w["positions"], w["loss_mask"], w["tokens"]
    assert seg[0] == 1 and np.all(np.diff(seg[seg > 0]) >= 0)
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
      assert np.array_equal(pos[idx], np.arange(len(idx)))  # positions restart per piece
      assert mask[idx[0]] == 0 and np.all(mask[idx[1:]] == 1)  # no target crosses a boundary
      pieces.append(bytes(tok[idx].astype(np.uint8)))
    assert np.all(tok[seg == 0] == 0) and np.all(mask[seg == 0] == 0) and np.all(pos[seg == 0] == 0)
    if i < len(train) - 1:
      assert np.all(seg > 0)  # concat-then-split: only the last window is padded
  stream = b"".join(pieces).decode()
  # Every train document appears whole and in corpus order; the eval ones (10%) never do.
  train_docs = [d for d in docs if d in stream]
  assert stream == "".join(train_docs) and 0 < len(docs) - len(train_docs) < len(docs) // 2


def _model_cfg(passes):
  model = ModelConfig(kind="hybrid", vocab_size=256, d_model=32, n_heads=2, head_dim=16, d_ff=64, eviction="sliding",
                      layer_pattern=["attn", "gdn"], gdn_conv=4, gdn_chunk=4, attn_conv=3, init_std=0.2)
  return Config(model=model, sleep=SleepConfig(passes=passes, chunk_len=8))


def _alone(batch):
  """One row per (row, segment): that document at the same offset, the rest padding."""
  rows, spans = {k: [] for k in batch}, []
  for r in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      keep = seg == s
      for k, v in batch.items():
        rows[k].append(np.where(keep, v[r], 0) if k != "segment_ids" else keep.astype(np.int32))
      idx = np.flatnonzero(keep)
      spans.append((r, idx[0], idx[-1] + 1))
  return {k: np.stack(v) for k, v in rows.items()}, spans


_OUT = {}


def _outputs(packed, passes):
  """Logits of the packed rows and of their documents alone, in one compiled call per N:
  (text mask, all-zero mask: every chunk consolidates, text mask without segment ids)."""
  if passes not in _OUT:
    cfg = _model_cfg(passes)
    model = model_factory(cfg)(nnx.Rngs(0))
    batch = next(make_train_iterator(packed[0], global_batch_size=4, seed=3))
    alone, spans = _alone(batch)
    both = {k: jnp.asarray(np.concatenate([batch[k], alone[k]])) for k in batch}

    @jax.jit
    def run(b):
      inputs, mask = b["tokens"][:, :-1], b["loss_mask"][:, 1:]
      seg = segment_inputs(b)
      return (forward(model, inputs, mask, cfg, **seg)[0],
              forward(model, inputs, jnp.zeros_like(mask), cfg, **seg)[0],
              forward(model, inputs, mask, cfg, positions_BT=seg["positions_BT"])[0])

    _OUT[passes] = (len(batch["tokens"]), spans, [np.asarray(x) for x in run(both)])
  return _OUT[passes]


@pytest.mark.parametrize("passes", [1, 2])
def test_each_document_gets_its_logits_alone(packed, passes):
  B, spans, (text, zero, plain) = _outputs(packed, passes)
  assert len(spans) > 8  # several documents per row
  for out in (text, zero):
    for i, (r, a, b) in enumerate(spans):
      b = min(b, SEQ - 1)  # logits exist for inputs tokens[:, :-1]
      np.testing.assert_allclose(out[r, a:b], out[B + i, a:b], atol=3e-5, err_msg=f"row {r} [{a}, {b})")
  # The test can fail: without segment ids a later document sees the one before it.
  r, a, b = next(s for s in spans if s[1] > 0)
  assert np.abs(plain[r, a:b] - text[r, a:b]).max() > 1e-3


def test_sleep_passes_change_the_consolidated_logits(packed):
  """N = 2 is not N = 1 when chunks consolidate: the equality above is not vacuous at N = 2."""
  one, two = _outputs(packed, 1)[2][1], _outputs(packed, 2)[2][1]
  assert np.abs(one - two).max() > 1e-3
