"""Packed documents: at a segment-id change everything that carries over resets (fast weights
S, conv taps, attention), so a document's logits do not depend on the document before it."""

import jax.numpy as jnp
import numpy as np
import pytest

from test_hybrid import jit, make_model, tiny_cfg
from sleep_jax.sleep import sleep_forward


def packed(first_len=10, T=28, seed=0, vocab=8):
  """Two fillers for the first document, one second document; positions restart per document."""
  rng = np.random.default_rng(seed)
  a, a2, b = (rng.integers(0, vocab, n) for n in (first_len, first_len, T - first_len))
  seg = np.r_[np.zeros(first_len), np.ones(T - first_len)].astype(np.int32)
  pos = np.r_[np.arange(first_len), np.arange(T - first_len)].astype(np.int32)
  tokens = np.stack([np.r_[a, b], np.r_[a2, b]]).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(np.stack([pos] * 2)), jnp.asarray(np.stack([seg] * 2))


@pytest.mark.parametrize("eviction,passes", [("hard", 1), ("sliding", 1), ("sliding", 3), ("hard", 2)])
def test_second_document_is_blind_to_the_first(eviction, passes):
  cfg = tiny_cfg(eviction, passes=passes)
  cfg.model.attn_conv = 3  # the attention's short conv must not reach across the boundary either
  model = make_model(cfg)
  tokens, pos, seg = packed()
  mask = jnp.zeros(tokens.shape, jnp.int32)  # every chunk consolidates
  out = jit(lambda t: sleep_forward(model, t, mask, cfg, positions_BT=pos, segment_ids_BT=seg))(tokens)
  np.testing.assert_allclose(out[0, 10:], out[1, 10:], atol=2e-5)
  assert np.abs(out[0, :10] - out[1, :10]).max() > 1e-3  # the first documents do differ
  # Without segment ids the second document does see the first: the reset is real.
  plain = jit(lambda t: sleep_forward(model, t, mask, cfg, positions_BT=pos))(tokens)
  assert np.abs(plain[0, 10:] - plain[1, 10:]).max() > 1e-3


def test_plain_call_resets_at_documents():
  """The decoder call itself (no eviction: an imported model's full attention, GDN states
  carried over the whole row)."""
  cfg = tiny_cfg("none", passes=1)
  model = make_model(cfg)
  tokens, pos, seg = packed()
  out = jit(lambda t: model(t, pos, seg)[0])(tokens)
  np.testing.assert_allclose(out[0, 10:], out[1, 10:], atol=2e-5)
  # The second document alone, from the start of a stream, gets the same logits.
  alone = jit(lambda t: model(t)[0])(tokens[:1, 10:])
  np.testing.assert_allclose(out[0, 10:], alone[0], atol=2e-5)
