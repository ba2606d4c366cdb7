"""The chunked losses (ops/chunked_ce.py) equal the plain ones computed from full float32
logits: values and gradients (features and head weight), tied and untied heads, T not a
multiple of the chunk, masked tokens, V not a multiple of the head-gradient block; and a few
train steps of the tiny config log the same losses with the loss chunked as without."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY
from flax import nnx

from sleep_jax import data as data_lib
from sleep_jax import losses
from sleep_jax import sharding as shd
from sleep_jax.config import load_config
from sleep_jax.models import model_factory
from sleep_jax.ops import chunked_ce
from sleep_jax.seeding import distill, steps
from sleep_jax.train import Trainer, loss_chunk_for

B, T, D, V = 2, 13, 8, 50


def _inputs(tied: bool, seed: int = 0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(k[0], (B, T, D))
  w = jax.random.normal(k[1], (V, D) if tied else (D, V))
  targets = jax.random.randint(k[2], (B, T), 0, V)
  mask = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32).at[1, :5].set(0.0)
  return x, w, targets, mask


def _plain_logits(x, w, tied):  # the reference: one einsum over the whole [B, T, V]
  return jnp.einsum("btd,vd->btv" if tied else "btd,dv->btv", x, w)


@pytest.fixture
def small_blocks(monkeypatch):
  monkeypatch.setattr(chunked_ce, "DW_BLOCK", 16)  # V = 50: blocks 0-15, .., 32-47, then 34-49 shifted back


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [4, 32])
def test_cross_entropy_equals_plain_values_and_grads(tied, chunk, small_blocks):
  x, w, targets, mask = _inputs(tied)

  def plain(x, w):
    logits = _plain_logits(x, w, tied)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (ce * mask).sum(), (ce, jnp.argmax(logits, -1) == targets)

  def chunked(x, w):
    ce, hit = chunked_ce.chunked_cross_entropy(x, w, targets, tied=tied, chunk=chunk)
    return (ce * mask).sum(), (ce, hit)

  (want, (ce_p, hit_p)), g_p = jax.value_and_grad(plain, (0, 1), has_aux=True)(x, w)
  (got, (ce_c, hit_c)), g_c = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(x, w)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(ce_c, ce_p, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(hit_c, hit_p)
  for a, b in zip(g_c, g_p):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(g_c[0][1, :5]).max()) == 0.0  # masked tokens get no gradient


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_divergence_equals_plain_values_and_grads(kind, small_blocks):
  x_s, w_s, _, mask = _inputs(tied=False, seed=1)
  x_t, w_t, _, _ = _inputs(tied=True, seed=2)
  div = functools.partial(distill.token_divergence, kind=kind, beta=0.3, temperature=1.5)

  def plain(x_s, w_s):
    return losses.masked_mean(div(_plain_logits(x_t, w_t, True), _plain_logits(x_s, w_s, False)), mask)

  def chunked(x_s, w_s):
    d = chunked_ce.chunked_divergence(div, x_t, w_t, x_s, w_s, tied_t=True, tied_s=False, chunk=5)
    return losses.masked_mean(d, mask)

  want, g_p = jax.value_and_grad(plain, (0, 1))(x_s, w_s)
  got, g_c = jax.jit(jax.value_and_grad(chunked, (0, 1)))(x_s, w_s)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for a, b in zip(g_c, g_p):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_seeding_terms_equal_plain_through_a_decoder():
  """ks_step's distillation and log-prob terms, read from decoders' head inputs and weights
  with the logits chunked, equal those from their full logits (gradients w.r.t. the student)."""
  cfg = load_config(None, ["model.vocab_size=40", "model.d_model=16", "model.n_heads=2", "model.head_dim=8",
                           "model.d_ff=32", "model.n_layers=1"])
  tied_cfg = load_config(None, ["model.vocab_size=40", "model.d_model=16", "model.n_heads=2", "model.head_dim=8",
                                "model.d_ff=32", "model.n_layers=1", "model.tie_embeddings=true"])
  teacher = model_factory(tied_cfg)(nnx.Rngs(0))
  s_graphdef, s_params = nnx.split(model_factory(cfg)(nnx.Rngs(1)))
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 11), 0, 40)
  div = functools.partial(distill.token_divergence, kind="jsd", beta=0.4, temperature=1.3)

  def terms(params, chunk):
    student = nnx.merge(s_graphdef, params)
    t_out = steps._head_out(teacher, tokens[:, :-1], chunk)
    s_out = steps._head_out(student, tokens[:, :-1], chunk)
    d = steps._divergence(div, t_out, s_out, chunk).mean()
    return d + steps._target_logp(s_out, tokens[:, 1:], chunk).mean(), d

  grad = jax.jit(jax.value_and_grad(terms, has_aux=True), static_argnums=1)
  (want, d_p), g_p = grad(s_params, 0)
  (got, d_c), g_c = grad(s_params, 4)
  assert float(d_p) > 1e-3  # the two models differ: the divergence is not trivially 0
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_c, g_p)


def test_auto_chunk_turns_on_for_large_vocabularies():
  chunk = lambda v, c=-1: loss_chunk_for(load_config(None, [f"model.vocab_size={v}", f"train.loss_chunk={c}"]))
  assert chunk(324) == 0 and chunk(32767) == 0
  assert chunk(32768) == 256 and chunk(151936) == 32  # ~2^23 logits per chunk and row
  assert chunk(151936, 0) == 0 and chunk(324, 7) == 7


def test_train_and_eval_steps_with_the_chunked_loss_equal_the_plain_ones(tiny_overrides):
  """The tiny sleeping model (loss through sleep_forward's pass 1): 3 train steps and an eval
  step give the same figures with train.loss_chunk = 5 (T = 27: not a multiple) as with 0."""
  out = {}
  for chunk in (0, 5):
    cfg = load_config(TINY, tiny_overrides + [f"train.loss_chunk={chunk}", "train.batch_size=8"])
    trainer = Trainer(cfg)
    state = trainer.init_state()
    it = data_lib.make_train_iterator(cfg.data, global_batch_size=cfg.train.batch_size, seed=0)
    losses = []
    for _ in range(3):
      batch = shd.global_batch(next(it), trainer.mesh)
      state, m = trainer.train_step(state, batch)
      losses.append([float(m["loss"]), float(m["grad_norm"]), float(m["token_accuracy"])])
    ev = jax.device_get(trainer.eval_step(state["params"], batch))
    out[chunk] = (np.array(losses), float(ev["loss_sum"]), np.asarray(ev["exact_B"]))
  np.testing.assert_allclose(out[5][0], out[0][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[5][1], out[0][1], rtol=1e-5)
  np.testing.assert_array_equal(out[5][2], out[0][2])
