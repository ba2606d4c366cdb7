"""The one way to freeze parameters: `masked(tx, trainable)`.

`trainable` is a tree shaped like the parameters, made from their roles
(`roles.labels(param_roles, pred)`: Python bools) or of 0/1 arrays. Frozen parameters'
gradients are zeroed before `tx` (they take no part in clipping's global norm and leave no
trace in the moments) and their updates are zeroed after it (no weight decay either), so
they stay bit-identical.

Why not optax.multi_transform with set_to_zero: its state holds only the trainable
parameters' moments, so it changes with the mask. Here the state is tx's own over every
parameter, which lets
- training's GDN warm-up (only GDN layers train) hand one optimizer state to the main phase,
- dreaming write a different expert slot each day with one compiled step (the mask is an
  array argument, not a static label tree).
With a fixed mask the trainable leaves' updates equal multi_transform's exactly (zeros add
nothing to a global norm, and Adam is per leaf).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _keep(on, x):
  if isinstance(on, (bool, np.bool_)):  # a static mask: no select in the compiled step
    return x if on else jnp.zeros_like(x)
  return jnp.where(on > 0, x, jnp.zeros_like(x))


def keep_trainable(tree: Any, trainable: Any) -> Any:
  """tree with every frozen leaf replaced by zeros."""
  return jax.tree.map(lambda on, x: _keep(on, x), trainable, tree)


def masked(tx: optax.GradientTransformation, trainable: Any) -> optax.GradientTransformation:
  """tx on the trainable parameters only; every other parameter's update is exactly 0."""

  def update(grads, state, params=None):
    updates, state = tx.update(keep_trainable(grads, trainable), state, params)
    return keep_trainable(updates, trainable), state

  return optax.GradientTransformation(tx.init, update)

