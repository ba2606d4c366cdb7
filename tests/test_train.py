"""Sharded training equals single-device training; accumulation and bf16 behave."""

import jax
import numpy as np
import pytest

from conftest import TINY
from sleep_jax import data as data_lib
from sleep_jax import sharding as shd
from sleep_jax.config import MeshConfig, load_config
from sleep_jax.models import roles
from sleep_jax.models import roles
from sleep_jax.train import Trainer


def losses(cfg, mesh, steps=3):
  trainer = Trainer(cfg, mesh=mesh)
  state = trainer.init_state()
  it = data_lib.make_train_iterator(cfg.data, global_batch_size=cfg.train.batch_size, seed=cfg.seed)
  out = []
  for _ in range(steps):
    state, m = trainer.train_step(state, shd.global_batch(next(it), trainer.mesh))
    out.append(float(m["loss"]))
  return np.array(out), trainer, state


def one_device():
  return shd.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 8, 1), (4, 1, 2)])
def test_sharded_losses_equal_single_device(tiny_overrides, mesh):
  cfg = load_config(TINY, tiny_overrides + ["model.n_heads=2", "model.d_ff=64"])
  ref, _, _ = losses(cfg, one_device())
  sharded_mesh = shd.make_mesh(MeshConfig(*mesh))
  got, trainer, state = losses(cfg, sharded_mesh)
  np.testing.assert_allclose(got, ref, atol=1e-4)
  assert ref[-1] < ref[0]  # it trains
  if mesh[1] > 1:  # parameters really are split over fsdp
    emb = state["params"]["embed"]
    assert emb.sharding.shard_shape(emb.shape) != emb.shape


def test_grad_accumulation_matches_full_batch(tiny_overrides):
  cfg = load_config(TINY, tiny_overrides)
  ref, _, _ = losses(cfg, shd.make_mesh(cfg.mesh))
  cfg4 = load_config(TINY, tiny_overrides + ["train.grad_accum=4"])
  got, _, _ = losses(cfg4, shd.make_mesh(cfg4.mesh))
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_bf16_compute_keeps_f32_master_weights(tiny_overrides):
  cfg = load_config(TINY, tiny_overrides + ["model.compute_dtype=bfloat16"])
  got, _, state = losses(cfg, shd.make_mesh(cfg.mesh))
  assert all(p.dtype == np.float32 for p in jax.tree.leaves(state["params"]))
  ref, _, _ = losses(load_config(TINY, tiny_overrides), shd.make_mesh(cfg.mesh))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, ref, atol=5e-2)  # same trajectory up to bf16 rounding


def test_logical_rules_map_to_mesh_axes():
  mesh = shd.make_mesh(MeshConfig(2, 2, 2))
  rules = [["embed", "fsdp"], ["mlp", "tensor"], ["vocab", "tensor"], ["layers", None]]
  spec = shd.logical_to_mesh(("layers", "embed", "mlp"), (3, 64, 128), mesh, rules)
  assert tuple(spec) == (None, "fsdp", "tensor")
  # A dimension the mesh axis does not divide stays replicated.
  assert tuple(shd.logical_to_mesh(("vocab", "embed"), (7, 64), mesh, rules)) == (None, "fsdp")
  assert shd.mesh_shape(MeshConfig(-1, 2, 1), 8) == (4, 2, 1)


def test_sliding_window_warmup_trains_only_gdn_layers(tiny_overrides):
  cfg = load_config(TINY, tiny_overrides + ["model.kind=hybrid", "model.layer_pattern=[attn,gdn]",
                                            "model.eviction=sliding", "sleep.warmup_gdn_steps=2"])
  trainer = Trainer(cfg)
  state = trainer.init_state()
  before = jax.device_get(state["params"])
  it = data_lib.make_train_iterator(cfg.data, global_batch_size=cfg.train.batch_size, seed=cfg.seed)
  assert trainer.step_fn(1) is trainer.warmup_step and trainer.step_fn(2) is trainer.train_step
  for step in range(2):  # the LR schedule starts at 0: the second step moves the weights
    state, _ = trainer.step_fn(step)(state, shd.global_batch(next(it), trainer.mesh))
  after = jax.device_get(state["params"])
  from sleep_jax.sleep import gdn_only_mask

  mask = gdn_only_mask(roles.roles_for(cfg))
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
  flat_mask, flat_changed = jax.tree.leaves(mask), jax.tree.leaves(changed)
  assert any(flat_mask) and not all(flat_mask)
  unchanged = [jax.tree_util.keystr(p) for (p, c), m in zip(jax.tree_util.tree_leaves_with_path(changed), flat_mask) if m and not c]
  assert not unchanged, unchanged  # every GDN parameter trained
  assert not any(c for c, m in zip(flat_changed, flat_mask) if not m)  # the rest bit-identical


def test_depth_curriculum_trains_at_one_pass_first(tiny_overrides):
  """sleep.single_pass_steps = K: steps < K are exactly the N = 1 model's steps, then N."""
  base = tiny_overrides + ["model.kind=hybrid", "model.layer_pattern=[attn,gdn]"]
  cur = Trainer(load_config(TINY, base + ["sleep.passes=3", "sleep.single_pass_steps=1"]))
  one = Trainer(load_config(TINY, base + ["sleep.passes=1"]))
  # Later steps are the N = 3 step itself (cur.train_step is what a plain passes=3 trainer
  # runs), so one N = 1 reference suffices: 3 compiles, not 4.
  assert cur.step_fn(0) is cur.single_pass_step and cur.step_fn(1) is cur.train_step
  it = data_lib.make_train_iterator(cur.cfg.data, global_batch_size=cur.cfg.train.batch_size, seed=0)
  batch = shd.global_batch(next(it), cur.mesh)
  loss = lambda t, fn: float(fn(t.init_state(), batch)[1]["loss"])
  assert loss(cur, cur.step_fn(0)) == loss(one, one.train_step)
  assert loss(cur, cur.step_fn(1)) != loss(one, one.train_step)  # tiny.yaml consolidates
