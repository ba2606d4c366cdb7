"""Two questions about the isolated dream copies of a dreaming config, measured.

    python experiments/diagnose_copies.py batch CONFIG [key=value ...]
    python experiments/diagnose_copies.py sensitivity CONFIG run_dir=RUN_DIR [key=value ...]

batch: does batching rows make the copies' LoRA SFT gradient cheaper per row? The jitted
  gradient w.r.t. one adapter at batch 1 / 4 / 16 (random weights: the speed does not depend
  on them; best of 5). If the per-row time barely falls, no batching of the copies
  (vmapped or one adapter over all dreams) can beat a loop of single copies.
sensitivity: why vmapped and sequential copies can end far apart after `copy_steps` Adam
  steps although their gradients agree to float rounding. On the run's trained base
  (RUN_DIR/base) and the dreams and adapters `vmap_speedup` uses, per copy: max |vmapped -
  sequential| of the trained adapter; then, for the copy that differs most, the same
  sequential copy from its initial A perturbed by 1e-7 and 1e-6 (B stays exactly 0, as
  initialised). A copy whose result moves as much under a 1e-6 perturbation as between the
  two ways is amplifying rounding (a chaotic trajectory), not computing something else.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sleep_jax import rng_streams  # noqa: E402
from sleep_jax import sharding as shd  # noqa: E402
from sleep_jax.config import load_config  # noqa: E402
from sleep_jax.dreaming import dreams as D  # noqa: E402
from sleep_jax.dreaming import lora as lora_lib  # noqa: E402
from sleep_jax.dreaming import run as dream_run  # noqa: E402
from sleep_jax.dreaming.harness import Dreamer  # noqa: E402
from sleep_jax.models import model_factory, roles  # noqa: E402
from sleep_jax.train import Trainer  # noqa: E402


def max_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def batch(cfg) -> None:
  make = model_factory(cfg)
  graphdef = shd.abstract_model(make)[0]
  params = nnx.to_pure_dict(nnx.split(make(nnx.Rngs(0)))[1])
  dc = cfg.dreaming
  adapter = lora_lib.init(params, roles.roles_for(cfg), jax.random.key(1), dc.lora_rank)
  loss = lambda a, t, m: D.sft_loss(graphdef, params, t, m, lora_lib.for_model(a, alpha=dc.lora_alpha), cfg=cfg)
  grad = jax.jit(jax.grad(loss))
  T = 20  # a dream's length at the committed configs
  print(f"{'rows':>5} {'ms':>9} {'ms per row':>11}")
  for B in (1, 4, 16):
    tokens_BT = jnp.asarray(np.random.default_rng(0).integers(3, cfg.model.vocab_size, (B, T)), jnp.int32)
    mask_BT = jnp.ones_like(tokens_BT)
    jax.block_until_ready(grad(adapter, tokens_BT, mask_BT))
    ts = []
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(grad(adapter, tokens_BT, mask_BT))
      ts.append(time.perf_counter() - t0)
    print(f"{B:>5} {min(ts) * 1e3:>9.2f} {min(ts) * 1e3 / B:>11.2f}", flush=True)


def sensitivity(cfg) -> None:
  world = dream_run._check(cfg)
  trainer = Trainer(cfg, mesh=shd.make_mesh(cfg.mesh))
  params = dream_run.pretrain(cfg, world, trainer)  # restores RUN_DIR/base
  dr = Dreamer(cfg, trainer.graphdef, world)
  seed = rng_streams.seed(cfg.seed, "dreaming/vmap_speedup")  # vmap_speedup's dreams and adapters
  tokens, mask, _ = dr.dream(params, None, 0, rng_streams.key(seed, "dreams"))
  K = min(tokens.shape[0], cfg.dreaming.top_k + cfg.dreaming.random_extra)
  t, m = tokens[:K], mask[:K]
  adapters = jax.vmap(lambda k: lora_lib.init(params, dr.roles, k, cfg.dreaming.lora_rank))(
      jax.random.split(rng_streams.key(seed, "copies"), K))
  vm = dr.copies(params, adapters, t, m)
  one = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
  seq = [dr.copy_one(params, one(adapters, i), t[i], m[i]) for i in range(K)]
  per_copy = [max_diff(one(vm, i), seq[i]) for i in range(K)]
  print("max |vmapped - sequential| per copy:", " ".join(f"{d:.1e}" for d in per_copy))
  i = int(np.argmax(per_copy))
  for eps in (1e-7, 1e-6):
    noise = lambda a: jnp.where(a != 0, a + eps * jax.random.normal(jax.random.key(7), a.shape, a.dtype), a)
    moved = max_diff(dr.copy_one(params, jax.tree.map(noise, one(adapters, i)), t[i], m[i]), seq[i])
    print(f"copy {i}, initial A perturbed by {eps:g}: max |diff| after {cfg.dreaming.copy_steps} Adam steps {moved:.1e} "
          f"(vmapped vs sequential: {per_copy[i]:.1e})")


if __name__ == "__main__":
  what, path, *overrides = sys.argv[1:]
  {"batch": batch, "sensitivity": sensitivity}[what](load_config(path, ["mesh.data=1", *overrides]))
