"""Structural parameter addressing (models/roles.py) equals the path / leaf-name addressing
it replaced (commit d378938), on the committed cms, hybrid and seeding configs:

  decay masks, CMS level labels, the GDN warm-up mask, one optimizer update, seeding's
  trainable masks for every (level, slot) ("train" labels before), expert activation / reset / free slots, dreaming's
  forced experts, LoRA init + merge, and whole-model growth -- all bit-identical.

  python experiments/check_roles_equivalence.py

Extracts the old package from git history into a temporary directory and runs this file
there in "old" mode (needs the repo's history), then here in "new" mode, and compares.
Result before the old code was deleted: 50 of 50 results identical.
"""
import os
import pickle
import subprocess
import sys
import tempfile

CONFIGS = ["experiments/continual.yaml", "experiments/tiny.yaml", "experiments/knowledge_seeding.yaml"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dump(mode: str, out: str) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from sleep_jax import sharding as shd
  from sleep_jax import sleep as sl
  from sleep_jax import train
  from sleep_jax.config import load_config
  from sleep_jax.dreaming import dreams, lora
  from sleep_jax.models import model_factory
  from sleep_jax.seeding import expand, steps

  def flat(t):
    return {jax.tree_util.keystr(p): (np.asarray(v) if hasattr(v, "shape") else v)
            for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}

  res = {}
  for name in CONFIGS:
    cfg = load_config(os.path.join(ROOT, name), [])
    make = model_factory(cfg)
    params = nnx.to_pure_dict(nnx.split(make(nnx.Rngs(3)))[1])
    if mode == "new":
      from sleep_jax.models import roles
      R = roles.roles_for(cfg)
      res[name, "decay"] = flat(roles.labels(R, lambda r: r.decay))
      if cfg.model.kind == "cms":
        res[name, "cmslab"] = flat(roles.labels(R, lambda r: "rest" if r.cms_level is None else f"level{r.cms_level}"))
      if cfg.model.kind == "hybrid":
        res[name, "gdn"] = flat(sl.gdn_only_mask(R))
      args = lambda p, *x: (p, R, *x)  # noqa: E731
      lab = lambda p, **kw: steps.trainable(R, **kw)  # noqa: E731
    else:
      res[name, "decay"] = flat(train.decay_mask(params))
      if cfg.model.kind == "cms":
        from sleep_jax.models.cms import cms_update_labels
        res[name, "cmslab"] = flat(cms_update_labels(params))
      if cfg.model.kind == "hybrid":
        res[name, "gdn"] = flat(sl.gdn_only_mask(params))
      args = lambda p, *x: (p, *x)  # noqa: E731
      lab = lambda p, **kw: jax.tree.map(lambda x: x == "train", steps.train_labels(p, **kw))  # noqa: E731
    tx, _ = train.make_optimizer(cfg)
    upd, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    res[name, "update"] = flat(upd)
    if cfg.model.kind != "cms":
      continue
    n_levels = len(cfg.model.cms.d_ff)
    for lvl in range(n_levels):
      res[name, "labels", lvl, None] = flat(lab(params, level=lvl, slot=None))
      for slot in range(cfg.model.cms.experts):
        res[name, "labels", lvl, slot] = flat(lab(params, level=lvl, slot=slot))
      p1 = expand.set_expert(*args(params, lvl, 1), active=True)
      res[name, "set", lvl] = flat(p1)
      res[name, "active", lvl] = expand.active_slots(*args(p1, lvl))
      res[name, "free", lvl] = expand.next_free_slot(*args(p1, lvl))
      res[name, "reset", lvl] = flat(expand.reset_level(*args(p1, lvl)))
    res[name, "force"] = flat(dreams.force_experts(*args(params, jnp.array([1, 2] + [0] * (n_levels - 2)))))
    ad = jax.tree.map(lambda x: x + 0.01, lora.init(*args(params, jax.random.key(5), 4)))
    res[name, "lora"] = flat(lora.apply(params, ad, alpha=8.0))
    if name.endswith("knowledge_seeding.yaml"):
      big = nnx.to_pure_dict(nnx.split(model_factory(expand.student_config(cfg))(nnx.Rngs(4)))[1])
      small = shd.abstract_model(make)[2] if mode == "old" else R
      res[name, "grow"] = flat(expand.grow_params(p1, small, big, width=cfg.seeding.grow_width))
  with open(out, "wb") as f:
    pickle.dump(res, f)


def main() -> None:
  import numpy as np

  tmp = tempfile.mkdtemp()
  subprocess.run(f"git archive d378938 sleep_jax | tar -x -C {tmp}", shell=True, check=True, cwd=ROOT)
  env = {**os.environ, "PYTHONPATH": tmp}
  subprocess.run([sys.executable, __file__, "old", f"{tmp}/old.pkl"], check=True, env=env, cwd=tmp)
  subprocess.run([sys.executable, __file__, "new", f"{tmp}/new.pkl"], check=True,
                 env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT)
  old, new = (pickle.load(open(f"{tmp}/{m}.pkl", "rb")) for m in ("old", "new"))
  assert old.keys() == new.keys(), set(old) ^ set(new)
  bad = []
  for k in old:
    a, b = old[k], new[k]
    if isinstance(a, dict):
      same = a.keys() == b.keys() and all(
          (np.array_equal(a[x], b[x]) and np.shape(a[x]) == np.shape(b[x])) if isinstance(a[x], np.ndarray)
          else a[x] == b[x] for x in a)
    else:
      same = a == b
    if not same:
      bad.append(k)
  print(f"{len(old) - len(bad)} of {len(old)} results identical" + (f"; differ: {bad}" if bad else ""))
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  if len(sys.argv) == 3:
    dump(sys.argv[1], sys.argv[2])
  else:
    main()
