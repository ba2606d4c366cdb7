"""MQAR probe: can a model of a given config learn in-context associative recall?

Multi-query associative recall (Zoology, Arora et al. 2023): a sequence lists P key-value
pairs, then asks Q of the keys again; the loss and the accuracy are on the values only.
A 2-layer attention model learns it at any width, so a config that does not is either
too small to train in the budget, badly tuned, or broken. This isolates the "reading"
rows of the dreaming world (experiments/continual.yaml) from everything else in it.

  python experiments/probe_recall.py --steps 3000 --attn_conv 4 --out conv4.json
  python experiments/probe_recall.py --plot curves.png plain.json conv4.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from sleep_jax.config import Config
from sleep_jax.models import model_factory


def mqar_batch(rng: np.random.Generator, batch: int, pairs: int, queries: int, n_keys: int, n_values: int):
  """tokens [B, 2P + 2Q] and the mask [B, 2P + 2Q] of positions whose *next* token is a value to recall.

  Token ids: keys 0..n_keys-1, values n_keys..n_keys+n_values-1 (no BOS needed: position 0
  is always a key).
  """
  keys_BP = np.argsort(rng.random((batch, n_keys)), axis=1)[:, :pairs]  # distinct keys per row
  vals_BP = rng.integers(0, n_values, (batch, pairs)) + n_keys
  ask_BQ = np.stack([rng.choice(pairs, queries, replace=queries > pairs) for _ in range(batch)])
  q_keys_BQ = np.take_along_axis(keys_BP, ask_BQ, 1)
  q_vals_BQ = np.take_along_axis(vals_BP, ask_BQ, 1)
  ctx = np.stack([keys_BP, vals_BP], -1).reshape(batch, -1)
  qs = np.stack([q_keys_BQ, q_vals_BQ], -1).reshape(batch, -1)
  tokens = np.concatenate([ctx, qs], 1).astype(np.int32)
  mask = np.zeros_like(tokens)
  mask[:, 2 * pairs::2] = 1  # a query key: the next token is its value
  return tokens, mask


def plot_curves(paths: list[str], out: str) -> None:
  """Eval accuracy against step, one line per --out json of earlier runs."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for path in paths:
    with open(path) as f:
      r = json.load(f)
    a = r["args"]
    ax.plot([c["step"] for c in r["curve"]], [c["eval_acc"] for c in r["curve"]], marker=".",
            label=f"{a['kind']} L{a['layers']} d{a['d_model']} lr {a['lr']:g}, attn_conv {a.get('attn_conv', 0)}")
  ax.axhline(r["chance"], color="gray", ls=":", label="chance")
  ax.set(xlabel="step", ylabel="MQAR eval accuracy", ylim=(0, 1.02))
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--kind", default="transformer", choices=["transformer", "cms", "hybrid"])
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--d_model", type=int, default=64)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--steps", type=int, default=3000)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--pairs", type=int, default=16)
  p.add_argument("--queries", type=int, default=16)
  p.add_argument("--n_keys", type=int, default=64)
  p.add_argument("--n_values", type=int, default=64)
  p.add_argument("--init_std", type=float, default=0.02)
  p.add_argument("--attn_conv", type=int, default=0, help="model.attn_conv: short conv before q/k/v")
  p.add_argument("--eval_every", type=int, default=250)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="write the accuracy curve here (json)")
  p.add_argument("--plot", nargs="+", metavar=("PNG", "JSON"), help="only plot earlier --out files to PNG")
  a = p.parse_args(argv)
  if a.plot:
    return plot_curves(a.plot[1:], a.plot[0])

  cfg = Config()
  m = cfg.model
  m.kind, m.n_layers, m.d_model, m.n_heads = a.kind, a.layers, a.d_model, a.heads
  m.head_dim, m.d_ff, m.init_std = a.d_model // a.heads, 4 * a.d_model, a.init_std
  m.vocab_size, m.attn_conv = a.n_keys + a.n_values, a.attn_conv
  if a.kind == "cms":
    m.cms.d_ff = [2 * a.d_model, 2 * a.d_model]
  model = model_factory(cfg)(nnx.Rngs(a.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, a.lr, 50, a.steps), weight_decay=0.0)
  opt_state = opt.init(params)

  def loss_fn(params, tokens, mask):
    logits = nnx.merge(graphdef, params)(tokens)[0]
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    m = mask[:, :-1]
    correct = (logits[:, :-1].argmax(-1) == tokens[:, 1:]) * m
    return (nll * m).sum() / m.sum(), correct.sum() / m.sum()

  @jax.jit
  def step(params, opt_state, tokens, mask):
    (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, mask)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc

  eval_acc = jax.jit(lambda params, t, mk: loss_fn(params, t, mk)[1])
  rng = np.random.default_rng(a.seed)
  eval_batch = mqar_batch(np.random.default_rng(10_000 + a.seed), 512, a.pairs, a.queries, a.n_keys, a.n_values)
  curve, t0 = [], time.time()
  bar = tqdm.trange(1, a.steps + 1, desc=f"mqar {a.kind} L{a.layers} d{a.d_model} lr{a.lr:g} conv{a.attn_conv}", mininterval=2.0)
  for i in bar:
    tokens, mask = mqar_batch(rng, a.batch, a.pairs, a.queries, a.n_keys, a.n_values)
    params, opt_state, loss, acc = step(params, opt_state, tokens, mask)
    if i % a.eval_every == 0 or i == a.steps:
      ev = float(eval_acc(params, *eval_batch))
      curve.append({"step": i, "train_loss": float(loss), "eval_acc": ev, "wall_s": round(time.time() - t0, 1)})
      bar.set_postfix(loss=f"{float(loss):.3f}", eval_acc=f"{ev:.3f}")
  result = {"args": vars(a), "chance": 1 / a.n_values, "curve": curve}
  print(json.dumps({"final_eval_acc": curve[-1]["eval_acc"], "chance": result["chance"], **{
      k: vars(a)[k] for k in ("kind", "layers", "d_model", "lr", "steps", "attn_conv")}}))
  if a.out:
    with open(a.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
