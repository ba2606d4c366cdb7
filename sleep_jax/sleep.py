"""Algorithm 1 of Paper A: chunked forward with offline recurrence ("sleep") over fast weights.

The input is split into chunks of L = cfg.sleep.chunk_len positions (the last one padded).
S (the GDN states) starts at 0 and is carried by a `lax.scan` over chunks. Per chunk:

  h_1, S_1 = Blocks(embed(chunk), S)             pass 1: the chunk's logits come from h_1
  consolidation chunk:  h_n, S_n = Blocks(h_{n-1}, S_{n-1}) for n = 2..N ; carry S_N
  prediction chunk:     carry S_1

Logits always come from pass 1, because that is what wake inference computes (one forward
pass per token, `generate.py`); for a prediction chunk it is the only pass. Features and the
KV cache are dropped at chunk boundaries (hard eviction); with eviction == "sliding" the
attention also sees the previous chunk's keys/values within a window of L -- those of its
pass 1, i.e. the KV cache wake decoding built while reading that chunk (sleep never rewrites
the KV cache, it only updates S).

Consolidation is decided PER EXAMPLE: chunk c of example b consolidates iff all its targets
are masked. The extra passes run (as a `lax.cond`) when any example in the batch needs them;
examples that do not keep S_1 (`jnp.where`), so an example's result never depends on its
batch mates. With the fixed task layouts every example agrees, and a batch of prediction
chunks pays for one pass only.

Memory: every pass is `jax.checkpoint`-ed (only its inputs h, S are saved) and passes 2..N
are a `lax.scan`, so the backward pass holds one pass's activations at a time plus the
per-pass carries. `truncate_passes` = K stops gradients into the last K passes;
`adaptive_tol` > 0 freezes each example once |S_n - S_{n-1}| / |S_n| < tol (at most N passes).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.config import Config

PassFn = Callable[[jax.Array, tuple], tuple[jax.Array, tuple]]


def check_eviction(eviction: str) -> bool:
  """True for sliding-window eviction; the hybrid has no full-attention mode."""
  if eviction not in ("hard", "sliding"):
    raise ValueError(f"model.kind=hybrid needs model.eviction 'hard' or 'sliding' (got {eviction!r}): "
                     "attention state is evicted at every sleep chunk")
  return eviction == "sliding"


def _where_B(active_B, new, old):
  """Per-example select on pytrees whose batch axis is 1 (S: [R, B, ...]) or 0 (h: [B, ...])."""
  def sel(a, b, axis):
    shape = [1] * a.ndim
    shape[axis] = a.shape[axis]
    return jnp.where(active_B.reshape(shape), a, b)

  h_new, S_new = new
  h_old, S_old = old
  return sel(h_new, h_old, 0), jax.tree.map(lambda a, b: sel(a, b, 1), S_new, S_old)


def _repeat(pass_fn: PassFn, carry, n: int):
  if n <= 0:
    return carry
  return jax.lax.scan(lambda c, _: (pass_fn(*c), None), carry, None, length=n)[0]


def _state_sq_B(S) -> jax.Array:
  return sum(jnp.sum(jnp.square(s.astype(jnp.float32)), axis=(0, 2, 3, 4)) for s in S)


def consolidate(pass_fn: PassFn, h1_BLD, S1, active_B, *, passes: int, truncate: int = 0, tol: float = 0.0):
  """Passes 2..N of a chunk from pass 1's output (h_1, S_1). Returns (S, passes_used_B).

  Examples with active_B False (prediction chunks) keep S_1 and report 1 pass.
  truncate K in (0, N): gradients reach only the last K passes (stop_gradient on the carry
  entering pass N-K+1). tol > 0: adaptive depth, each example frozen once its relative state
  change drops below tol; `lax.scan` + `lax.cond` rather than a while_loop so it stays
  differentiable and skips the compute of passes no example needs. (Truncation is ignored
  in adaptive mode: "the last K passes" is not defined before the loop ends.)
  """
  B = h1_BLD.shape[0]
  ones_B = jnp.ones((B,), jnp.int32)
  if passes <= 1 or not S1:  # no GDN layer: nothing survives a chunk, sleeping is a no-op
    return S1, ones_B

  def fixed(h, S):
    carry = (h, S)
    if 0 < truncate < passes:
      carry = _repeat(pass_fn, carry, passes - truncate - 1)
      carry = jax.lax.stop_gradient(carry)
      carry = _repeat(pass_fn, carry, truncate)
    else:
      carry = _repeat(pass_fn, carry, passes - 1)
    return carry[1], jnp.full((B,), passes, jnp.int32)

  def adaptive(h, S):
    def step(c, _):
      def run(c):
        h, S, done_B, n_B = c
        h2, S2 = pass_fn(h, S)
        d_B = _state_sq_B(jax.tree.map(jnp.subtract, S2, S))
        rel_B = jnp.sqrt(d_B / jnp.maximum(_state_sq_B(S2), 1e-30))
        h, S = _where_B(done_B, (h, S), (h2, S2))
        return h, S, done_B | (rel_B < tol), n_B + (~done_B).astype(jnp.int32)

      return jax.lax.cond(jnp.all(c[2]), lambda c: c, run, c), None

    init = (h, S, ~active_B, ones_B)
    _, S, _, n_B = jax.lax.scan(step, init, None, length=passes - 1)[0]
    return S, n_B

  body = adaptive if tol > 0 else fixed
  skip = lambda h, S: (S, ones_B)
  S_N, n_B = jax.lax.cond(jnp.any(active_B), body, skip, h1_BLD, S1)
  _, S_out = _where_B(active_B, (h1_BLD, S_N), (h1_BLD, S1))
  return S_out, jnp.where(active_B, n_B, 1)


def make_pass(graphdef, positions_BL, ctx_valid, chunk_len: int, sliding: bool):
  """A rematerialised pure pass: (params state, h, S, ctx) -> (h, S, kv)."""

  def one_pass(state, h, S, ctx):
    model = nnx.merge(graphdef, state)
    return model.run_pass(h, S, positions_BL, ctx=ctx if sliding else None, ctx_valid=ctx_valid,
                          chunk_len=chunk_len)

  return jax.checkpoint(one_pass, policy=jax.checkpoint_policies.nothing_saveable)


def sleep_forward(model: nnx.Module, inputs_BT: jax.Array, target_mask_BT: jax.Array, cfg: Config, *,
                  return_passes: bool = False, adaptive: bool | None = None) -> Any:
  """Algorithm 1: logits [B, T, V] float32 (and passes used [B, n_chunks] if return_passes).

  adaptive: None uses adaptive depth iff cfg.sleep.adaptive_tol > 0; False forces N passes.
  """
  mc, sc = cfg.model, cfg.sleep
  sliding = check_eviction(mc.eviction)
  L, N = sc.chunk_len, sc.passes
  tol = sc.adaptive_tol if (adaptive is None or adaptive) else 0.0
  B, T = inputs_BT.shape
  C = -(-T // L)
  pad = C * L - T
  # Padded targets are masked (0): a padded tail chunk with no real target consolidates,
  # which is harmless -- the state after the last chunk is never read.
  to_chunks = lambda x: jnp.moveaxis(jnp.pad(x, ((0, 0), (0, pad))).reshape(B, C, L), 1, 0)
  tokens_CBL, mask_CBL = to_chunks(inputs_BT), to_chunks(target_mask_BT)
  graphdef, state = nnx.split(model)
  dtype = jnp.dtype(mc.compute_dtype)

  def chunk(carry, xs):
    S, ctx = carry
    tokens_BL, mask_BL, c = xs
    positions_BL = jnp.broadcast_to(c * L + jnp.arange(L, dtype=jnp.int32), (B, L))
    one_pass = make_pass(graphdef, positions_BL, c > 0, L, sliding)
    m = nnx.merge(graphdef, state)
    h1, S1, kv1 = one_pass(state, m.embed_tokens(tokens_BL), S, ctx)
    logits_BLV = m.logits(h1)
    pass_fn = lambda h, S_: one_pass(state, h, S_, ctx)[:2]
    active_B = jnp.all(mask_BL == 0, axis=1)
    S_out, n_B = consolidate(pass_fn, h1, S1, active_B, passes=N, truncate=sc.truncate_passes, tol=tol)
    return (S_out, kv1 if sliding else ctx), (logits_BLV, n_B)

  model0 = nnx.merge(graphdef, state)
  ctx0 = ()
  if sliding:
    R, H, K = mc.pattern_repeats, mc.n_heads, mc.head_dim
    z = jnp.zeros((R, B, L, H, K), dtype)
    ctx0 = tuple((z, z) for _ in model0.attn_groups)
  xs = (tokens_CBL, mask_CBL, jnp.arange(C, dtype=jnp.int32))
  _, (logits_CBLV, n_CB) = jax.lax.scan(chunk, (model0.zero_state(B), ctx0), xs)
  logits_BTV = jnp.moveaxis(logits_CBLV, 0, 1).reshape(B, C * L, -1)[:, :T]
  if return_passes:
    return logits_BTV, n_CB.T
  return logits_BTV


def gdn_only_mask(params) -> Any:
  """bool pytree over a HybridLM param dict: True on every parameter of a GDN layer.

  A "GDN layer" is the whole layer at a GDN pattern position (mixer, its MLP and norms);
  embeddings, attention layers and the final norm are False. For the sliding-window recipe's
  warm-up (train only the recurrent layers under hard eviction), e.g.
  `optax.masked(tx, gdn_only_mask(params))` plus zero updates elsewhere
  (`optax.multi_transform({True: tx, False: optax.set_to_zero()}, gdn_only_mask)`).
  """
  def mark(tree, value: bool):
    return jax.tree.map(lambda _: value, tree)

  out = {k: mark(v, False) for k, v in params.items() if k != "groups"}
  out["groups"] = {i: mark(g, "gdn" in g) for i, g in params["groups"].items()}
  return out
