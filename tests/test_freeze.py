"""freeze.masked, the one way parameters are frozen: frozen leaves stay bit-identical, and
the trainable ones move exactly as under optax.multi_transform with set_to_zero."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sleep_jax import freeze


def _tree(seed):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"a": jax.random.normal(k[0], (4, 3)), "b": {"c": jax.random.normal(k[1], (5,)),
                                                     "d": jax.random.normal(k[2], (2, 2))}}


def _run(tx, params, steps=4):
  opt = tx.init(params)
  for i in range(steps):
    grads = jax.tree.map(lambda x: 3.0 * x, _tree(100 + i))  # large enough that clipping acts
    upd, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, upd)
  return params


def test_masked_equals_multi_transform_and_keeps_frozen_leaves_bit_identical():
  params = _tree(0)
  trainable = {"a": True, "b": {"c": False, "d": True}}
  inner = lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-1, weight_decay=0.1))
  ours = _run(freeze.masked(inner(), trainable), params)
  labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
  ref = _run(optax.multi_transform({"train": inner(), "freeze": optax.set_to_zero()}, labels), params)
  for x, y, on, p in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), jax.tree.leaves(trainable),
                         jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert on != np.array_equal(np.asarray(x), np.asarray(p))  # trainable moved, frozen did not (no decay)


def test_an_array_mask_in_a_jitted_step_equals_the_static_mask():
  params = _tree(1)
  static = {"a": False, "b": {"c": True, "d": False}}
  tx_static = freeze.masked(optax.adam(1e-1), static)
  grads = _tree(7)

  @jax.jit
  def traced(params, mask):
    tx = freeze.masked(optax.adam(1e-1), mask)
    upd, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, upd)

  upd, _ = tx_static.update(grads, tx_static.init(params), params)
  want = optax.apply_updates(params, upd)
  got = traced(params, jax.tree.map(jnp.float32, static))
  for x, y, on, p in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(static),
                         jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)  # jit vs eager rounding
    assert on != np.array_equal(np.asarray(x), np.asarray(p))  # frozen leaves bit-identical
