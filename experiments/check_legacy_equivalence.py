"""The one decoder equals the three model kinds it replaced (Transformer, HybridLM,
CMSTransformer at commit dd584e1) on every committed experiment config: the same weights
(converted to the new layout) give the same training logits and the same decoded tokens.

  python experiments/check_legacy_equivalence.py

Extracts the old package from git history into a temporary directory (needs the repo's
history). Run when the decoder changed; the result of the run that preceded the deletion
of the old code is in the commit message that deleted it.
"""
import os
import subprocess
import sys
import tempfile

_old = tempfile.mkdtemp()
subprocess.run(f"git archive dd584e1 sleep_jax | tar -x -C {_old} && mv {_old}/sleep_jax {_old}/sleep_jax_old && "
               f"grep -rl sleep_jax {_old}/sleep_jax_old | xargs sed -i 's/\\bsleep_jax\\./sleep_jax_old./g; "
               f"s/from sleep_jax import/from sleep_jax_old import/g'", shell=True, check=True,
               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _old)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import sleep_jax_old.config as oc
from sleep_jax_old.models import model_factory as old_factory, forward as old_forward
from sleep_jax.config import load_config
from sleep_jax.models import model_factory, forward
from sleep_jax.generate import sample_tokens
import sleep_jax_old.generate as og

def convert(old):
  new = {k: v for k, v in old.items() if k not in ("blocks", "groups")}
  groups = {0: old["blocks"]} if "blocks" in old else dict(old["groups"])
  out = {}
  for i, g in groups.items():
    g = dict(g)
    if "attn_norm" in g:
      g["mixer_norm"] = g.pop("attn_norm")
    if "gdn" in g:
      gd = dict(g["gdn"]); c = gd.pop("conv"); K = c.shape[-1] // 3
      gd["conv_q"], gd["conv_k"], gd["conv_v"] = c[..., :K], c[..., K:2 * K], c[..., 2 * K:]
      g["gdn"] = gd
    out[i] = g
  new["groups"] = out
  return new

def check(path, overrides, T=None):
  ocfg = oc.load_config(path, overrides); cfg = load_config(path, overrides)
  om = old_factory(ocfg)(nnx.Rngs(0)); og_, ost = nnx.split(om)
  nm = model_factory(cfg)(nnx.Rngs(0)); ng, nst = nnx.split(nm)
  old_p = nnx.to_pure_dict(ost); new_p = convert(old_p)
  want_struct = jax.tree.structure(nnx.to_pure_dict(nst))
  assert jax.tree.structure(new_p) == want_struct, (jax.tree.structure(new_p), want_struct)
  # The same seed draws the same initial model.
  same_init = all(bool((x == y).all()) for x, y in zip(jax.tree.leaves(new_p), jax.tree.leaves(nnx.to_pure_dict(nst))))
  assert same_init, f"{path} {overrides}: seed 0 no longer gives the initial model it gave"
  nnx.replace_by_pure_dict(nst, new_p); nm = nnx.merge(ng, nst)
  T = T or cfg.data.seq_len
  rng = np.random.default_rng(0)
  toks = jnp.asarray(rng.integers(0, cfg.model.vocab_size, (2, T)), jnp.int32)
  mask = jnp.asarray((np.arange(T) >= T - 3)[None].repeat(2, 0), jnp.int32)
  a = jax.jit(lambda t, m: old_forward(om, t, m, ocfg, training=True)[0])(toks, mask)
  b = jax.jit(lambda t, m: forward(nm, t, m, cfg, training=True)[0])(toks, mask)
  d = float(jnp.abs(a - b).max())
  # decoding
  pr = toks[:, :max(3, T // 2)]
  oa = jax.jit(lambda st, p: og.sample_tokens(og_, st, p, jax.random.key(0), ocfg, steps=5, return_logits=True))(ost, pr)
  nb = jax.jit(lambda st, p: sample_tokens(ng, st, p, jax.random.key(0), cfg, steps=5, return_logits=True))(nnx.split(nm)[1], pr)
  dd = float(jnp.abs(oa[1] - nb[1]).max()); same = bool((oa[0] == nb[0]).all())
  print(f"{path} {' '.join(overrides)}: forward max|diff| {d:.2e} (|logits| {float(jnp.abs(a).max()):.2f}); decode max|diff| {dd:.2e}, tokens equal {same}")
  return d, dd, same

cases = [("experiments/tiny.yaml", []), ("experiments/tiny.yaml", ["sleep.passes=3"]),
         ("experiments/tiny.yaml", ["model.eviction=sliding", "sleep.passes=2", "model.attn_conv=3"]),
         ("experiments/rule110_cpu.yaml", []), ("experiments/khop_cpu.yaml", ["sleep.passes=3"]),
         ("experiments/arith_cpu.yaml", []), ("experiments/continual.yaml", []),
         ("experiments/dream_tiny.yaml", []), ("experiments/seed_tiny.yaml", []),
         ("experiments/knowledge_seeding.yaml", []),
         ("experiments/tiny.yaml", ["model.kind=transformer", "model.eviction=hard", "sleep.passes=1"]),
         ("experiments/tiny.yaml", ["model.kind=transformer", "model.eviction=none", "sleep.passes=1", "model.attn_conv=4"]),
         ("experiments/tiny.yaml", ["model.kind=transformer", "model.eviction=sliding", "sleep.passes=1"])]
bad = 0
for path, ov in cases:
  d, dd, same = check(path, ov)
  bad += (d > 1e-4) + (dd > 1e-4) + (not same)
print("FAILURES", bad)
sys.exit(1 if bad else 0)
