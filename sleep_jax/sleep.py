"""Algorithm 1 of Paper A: chunked forward with offline recurrence ("sleep") over fast weights.

The input is split into chunks of L = cfg.sleep.chunk_len positions (the last one padded).
S (the GDN states) starts at 0 and is carried by a `lax.scan` over chunks. Per chunk:

  h_1, S_1 = Blocks(embed(chunk), S)             pass 1: the chunk's logits come from h_1
  consolidation chunk:  h_n, S_n = Blocks(h_{n-1}, S_{n-1}) for n = 2..N ; carry S_N
  prediction chunk:     carry S_1

With sleep.layers = [lo, hi) the extra passes loop only those layers (paper A's Jet-Nemotron
recipe): the layers before lo run once, the layers from hi on run once more on the last
pass's features, from the S they had before the chunk. Every pass starts from the decoder
state the chunk found (models/decoder.py): its KV and conv caches, with S from the pass
before; only S changes between passes.

Logits always come from pass 1, because that is what wake inference computes (one forward
pass per token, `generate.py`); for a prediction chunk it is the only pass. Features and the
KV cache are dropped at chunk boundaries (hard eviction); with eviction == "sliding" the
attention also sees the previous chunk's keys/values within a window of L -- those of its
pass 1, i.e. the KV cache wake decoding built while reading that chunk (sleep never rewrites
the KV cache, it only updates S).

Consolidation is decided PER EXAMPLE and is data: chunk c of example b consolidates as
`consolidate_BC` says, by default as sleep.schedule says ("masked": iff all its targets are
masked, the task layouts; "every_chunk": always, text). The extra passes run (under a `lax.cond`) while any example in the batch needs
them; examples that do not keep S_1 (`jnp.where`), so an example's result never depends on
its batch mates. With the fixed task layouts every example agrees, and a batch of
prediction chunks pays for one pass only.

Memory: all N passes of a chunk are ONE `lax.scan` over a `jax.checkpoint`-ed pass (only its
inputs h, S are saved), and with cfg.model.remat each chunk is rematerialised too, so the
backward holds one pass's activations plus one chunk's per-pass carries: flat in N up to
N * (h + S) of a single chunk. `truncate_passes` = K lets gradients reach only the last K
passes; `adaptive_tol` > 0 stops each example once |S_n - S_{n-1}| / |S_n| < tol (at most N).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.config import Config

PassFn = Callable[[jax.Array, tuple], tuple[jax.Array, tuple, tuple]]  # (h, S) -> (h, S, rest of the state)


def _select_B(take_B, new, old, batch_axis: int):
  """Per-example select on a pytree whose batch axis is `batch_axis`."""
  def sel(a, b):
    shape = [1] * a.ndim
    shape[batch_axis] = a.shape[batch_axis]
    return jnp.where(take_B.reshape(shape), a, b)

  return jax.tree.map(sel, new, old)


def _state_sq_B(S) -> jax.Array:
  return sum(jnp.sum(jnp.square(s.astype(jnp.float32)), axis=(0, 2, 3, 4)) for s in S)


def run_passes(pass_fn: PassFn, h_BLD, S, active_B, *, passes: int, start: int = 0, truncate: int = 0,
               tol: float = 0.0, keep_kv: bool = False, remat: bool = True):
  """Passes start+1 .. N of one chunk as ONE `lax.scan`. Returns (S, passes_B, h_1, kv_1, h_N).

  pass_fn(h, S) -> (h, S, kv) is one (rematerialised) pass of the stack. start = 0: the scan
  begins with pass 1 from the embeddings (sleep_forward); start = 1: (h, S) are pass 1's
  outputs (wake decoding computed pass 1 token by token). h_1 and kv_1 are pass 1's features
  and the rest of its state, attention K/V and conv caches (start = 0 only; kv_1 only with
  keep_kv); h_N the features of each example's last pass.

  Pass 1 and the extra passes being one scan body means the program holds a single copy of
  the pass and of its backward, whatever N; h_1 and kv_1 are picked out with `jnp.where`,
  whose backward needs only the predicate, so they add nothing per pass to the residuals.

  After pass 1, examples with active_B False (prediction chunks) keep their state; once no
  example is active the remaining iterations skip the compute (`lax.cond`). truncate K in
  (0, N): gradients reach only the last K passes (stop_gradient on the carry entering pass
  N-K+1; pass 1's logits keep theirs). tol > 0: adaptive depth -- from pass 2 on, an example
  stops once |S_n - S_{n-1}| / |S_n| < tol (scan + cond rather than a while_loop, so it stays
  differentiable and still skips the compute; truncation is ignored: "the last K passes" is
  not known before the loop ends). remat=False skips the per-pass remat when there is a
  single pass to run (with several it is always on: it is what keeps memory flat in N).
  """
  B = h_BLD.shape[0]
  if not S:  # no GDN layer: nothing survives a chunk, extra passes could change nothing
    passes = max(start, 1)
  n_iter = max(passes - start, 0)
  if n_iter == 1 and start == 0 and not remat:
    # One pass (N = 1, or a model without GDN layers): nothing to scan, select or skip, and
    # no per-pass remat -- its only purpose is to keep memory flat over N passes, and for a
    # single pass it would just recompute the forward in the backward.
    h1, S, kv = pass_fn(h_BLD, S)
    return S, jnp.ones((B,), jnp.int32), h1, (kv if keep_kv else ()), h1
  h_shape, _, kv_shape = jax.eval_shape(pass_fn, h_BLD, S)
  zero_kv = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), kv_shape) if keep_kv else ()
  stop_at = passes - truncate if 0 < truncate < passes and tol <= 0 else -1  # 0-based pass index

  # The remat boundary is around the cond, not inside it: a cond would hand its branch's
  # residuals (the parameters among them) out per iteration, and the scan would stack them.
  # Here the scan saves only this step's inputs (h, S, flags); parameters and ctx are
  # loop-invariant closures.
  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  def step(h, S, done_B, p):
    def run(h, S):
      h2, S2, kv = pass_fn(h, S)
      return h2, S2, (kv if keep_kv else ())

    return jax.lax.cond((p == 0) | ~jnp.all(done_B), run, lambda h, S: (h, S, zero_kv()), h, S)

  def body(carry, p):  # p: 0-based index of this pass
    h, S, h1, kv1, done_B, n_B = carry
    if stop_at > 0:
      h, S = jax.tree.map(lambda a: jnp.where(p == stop_at, jax.lax.stop_gradient(a), a), (h, S))
    first = p == 0
    h2, S2, kv = step(h, S, done_B, p)
    take_B = first | ~done_B
    h_new = _select_B(take_B, h2, h, 0)
    S_new = _select_B(take_B, S2, S, 1)
    done_new = jnp.where(first, ~active_B, done_B)
    if tol > 0:
      rel_B = jnp.sqrt(_state_sq_B(jax.tree.map(jnp.subtract, S2, S)) / jnp.maximum(_state_sq_B(S2), 1e-30))
      done_new = done_new | ((p >= 1) & (rel_B < tol))
    h1 = jnp.where(first, h2, h1)
    kv1 = jax.tree.map(lambda a, b: jnp.where(first, a, b), kv, kv1)
    return (h_new, S_new, h1, kv1, done_new, n_B + take_B.astype(jnp.int32)), None

  done0 = ~active_B if start > 0 else jnp.zeros((B,), bool)
  init = (h_BLD, S, jnp.zeros(h_shape.shape, h_shape.dtype), zero_kv(), done0, jnp.full((B,), start, jnp.int32))
  (h_last, S, h1, kv1, _, n_B), _ = jax.lax.scan(body, init, jnp.arange(start, start + n_iter))
  return S, n_B, h1, kv1, h_last


def get_S(layers: tuple) -> tuple:
  """The fast weights of a decoder state's layer groups (the GDN groups, in pattern order)."""
  return tuple(g["S"] for g in layers if "S" in g)


def put_S(layers: tuple, S: tuple) -> tuple:
  it = iter(S)
  return tuple({**g, "S": next(it)} if "S" in g else g for g in layers)


def strip_S(layers: tuple) -> tuple:
  """The state without its fast weights (S kept as a None placeholder for `put_S`)."""
  return tuple({**g, "S": None} if "S" in g else g for g in layers)


def sleep_range(cfg: Config, n_layers: int) -> tuple[int, int]:
  """sleep.layers as (lo, hi); [] is the whole stack."""
  if not cfg.sleep.layers:
    return 0, n_layers
  lo, hi = cfg.sleep.layers
  return int(lo), int(hi)


def _rows_in(model, lo: int, hi: int) -> tuple:
  """Per GDN group, bool [R]: which of its stacked layers lie in [lo, hi)."""
  P = len(model.pattern)
  return tuple(jnp.asarray([lo <= r * P + p < hi for r in range(model.repeats)])
               for p, k in enumerate(model.pattern) if k == "gdn")


def _take_rows(rows: tuple, S_new: tuple, S_old: tuple) -> tuple:
  return tuple(jnp.where(m.reshape((-1,) + (1,) * (a.ndim - 1)), a, b) for m, a, b in zip(rows, S_new, S_old))


def sleep_chunk(model, state: dict, h_BLD, active_B, cfg: Config, *, positions_BL=None, segment_ids_BL=None,
                tol: float = 0.0, start: int = 0, S_start: tuple | None = None, features: bool = False,
                adapters: dict | None = None):
  """One chunk of Algorithm 1 from the decoder state before it.

  start = 0: h is the chunk's embeddings; pass 1 runs the whole stack (its logits are the
  chunk's), then passes 2..N over sleep.layers = [lo, hi) for the active examples. start = 1
  (wake decoding, which ran pass 1 token by token): h is pass 1's output of layer hi - 1,
  `state` holds the chunk's incoming caches with pass 1's S, and S_start the S the chunk
  began with. Every pass starts from the chunk's incoming KV and conv caches (sleep never
  rewrites the KV cache; only S changes); layers before lo keep their single run, layers
  after hi run once more, from their incoming S, on the last pass's features.
  adapters: unmerged low-rank adapters (models/adapters.py), in every pass, or None.
  Returns (logits or None, new state, passes_B, pass 1's output of layer hi - 1); with
  features, the head's input final_norm(h) [B, L, D] in place of the logits.
  """
  sc, mc = cfg.sleep, cfg.model
  n = model.n_layers
  lo, hi = sleep_range(cfg, n)
  L = h_BLD.shape[1]
  ctx = model.context(L, h_BLD.shape[0], positions_BL, segment_ids_BL, state)
  layers_in = state["layers"]

  def pass_fn(lo_, hi_):
    def one(h, S):
      h, layers = model.run_layers(h, put_S(layers_in, S), ctx, lo_, hi_, adapters)
      return h, get_S(layers), strip_S(layers)
    return one

  S_in = get_S(layers_in)
  head = model.final_norm if features else model.head
  logits = None
  if start == 0 and (lo, hi) == (0, n):
    S, n_B, h1, rest1, _ = run_passes(pass_fn(0, n), h_BLD, S_in, active_B, passes=sc.passes,
                                       truncate=sc.truncate_passes, tol=tol, keep_kv=True, remat=mc.remat)
    logits, h_mid = head(h1), h1
  else:
    if start == 0:  # pass 1, the whole stack, in three parts
      h_lo, layers = model.run_layers(h_BLD, layers_in, ctx, 0, lo, adapters)
      h_mid, layers = model.run_layers(h_lo, layers, ctx, lo, hi, adapters)
      h_out, layers = model.run_layers(h_mid, layers, ctx, hi, n, adapters)
      logits, rest1, S1 = head(h_out), strip_S(layers), get_S(layers)
      S_start = S_in
    else:  # wake decoding ran pass 1: h is its output of layer hi - 1, state its S
      h_mid, rest1, S1 = h_BLD, strip_S(layers_in), S_in
      S_start = S_in if S_start is None else S_start
    S, n_B, _, _, h_last = run_passes(pass_fn(lo, hi), h_mid, S1, active_B, passes=sc.passes, start=1,
                                      truncate=sc.truncate_passes, tol=tol, remat=True)
    if hi < n:  # the layers after the loop: once, from their incoming S, on the last features
      post = _rows_in(model, hi, n)
      _, layers = model.run_layers(h_last, put_S(layers_in, _take_rows(post, S_start, S)), ctx, hi, n, adapters)
      S = _take_rows(post, get_S(layers), S)
  new_state = {"t": state["t"] + L, "seg": ctx["seg"][:, -1], "layers": put_S(rest1, S)}
  return logits, new_state, n_B, h_mid


def consolidation_schedule(mask_CBL: jax.Array, schedule: str) -> jax.Array:
  """bool [C, B]: chunk c of example b consolidates. "masked": iff all its targets are
  masked (a chunk the model only reads); "every_chunk": always (text: every chunk is
  predicted in pass 1, then slept on before its cache is evicted)."""
  if schedule == "every_chunk":
    return jnp.ones(mask_CBL.shape[:2], bool)
  if schedule == "masked":
    return jnp.all(mask_CBL == 0, axis=2)
  raise ValueError(f"unknown sleep.schedule {schedule!r} (expected 'masked' or 'every_chunk')")


def sleep_forward(model: nnx.Module, inputs_BT: jax.Array, target_mask_BT: jax.Array, cfg: Config, *,
                  positions_BT: jax.Array | None = None, segment_ids_BT: jax.Array | None = None,
                  consolidate_BC: jax.Array | None = None, return_passes: bool = False,
                  adaptive: bool | None = None, features: bool = False, adapters: dict | None = None) -> Any:
  """Algorithm 1: logits [B, T, V] float32 (and passes used [B, n_chunks] if return_passes).
  features: pass 1's head input final_norm(h) [B, T, D] instead of its logits (for the
  chunked losses, ops/chunked_ce.py, with `model.head_weight()`).

  Which chunks consolidate is data: consolidate_BC (bool [B, n_chunks]) when given, else
  cfg.sleep.schedule: "masked" (a chunk whose targets are all masked) or "every_chunk".
  adaptive: None uses adaptive depth iff cfg.sleep.adaptive_tol > 0; False forces N passes.
  adapters: unmerged low-rank adapters (models/adapters.py) or None.
  """
  mc, sc = cfg.model, cfg.sleep
  L = sc.chunk_len
  tol = sc.adaptive_tol if (adaptive is None or adaptive) else 0.0
  B, T = inputs_BT.shape
  C = -(-T // L)
  pad = C * L - T
  # Padded targets are masked (0): a padded tail chunk with no real target consolidates,
  # which is harmless -- the state after the last chunk is never read.
  to_chunks = lambda x: jnp.moveaxis(jnp.pad(x, ((0, 0), (0, pad)), mode="edge").reshape(B, C, L), 1, 0)
  tokens_CBL = to_chunks(inputs_BT)
  mask_CBL = jnp.moveaxis(jnp.pad(target_mask_BT, ((0, 0), (0, pad))).reshape(B, C, L), 1, 0)
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  if consolidate_BC is None:
    consolidate_BC = consolidation_schedule(mask_CBL, sc.schedule).T
  elif consolidate_BC.shape != (B, C):
    raise ValueError(f"consolidate_BC has shape {consolidate_BC.shape}; this input has {C} chunks of "
                     f"{L} (expected {(B, C)})")
  xs = (tokens_CBL, consolidate_BC.T.astype(bool), to_chunks(positions_BT.astype(jnp.int32)),
        to_chunks(segment_ids_BT.astype(jnp.int32)) if segment_ids_BT is not None else None)
  graphdef, params = nnx.split(model)

  def chunk(params, adapters, state, xs):
    tokens_BL, active_B, pos_BL, seg_BL = xs
    m = nnx.merge(graphdef, params)
    logits, state, n_B, _ = sleep_chunk(m, state, m.embed_tokens(tokens_BL), active_B, cfg, positions_BL=pos_BL,
                                        segment_ids_BL=seg_BL, tol=tol, features=features, adapters=adapters)
    return state, (logits, n_B)

  if mc.remat:
    # Chunk-level remat on top of the per-pass one: the backward keeps only each chunk's
    # incoming state, and the per-pass carries of one chunk at a time, so memory grows
    # with N by one chunk's (h, S) per pass instead of every chunk's.
    chunk = jax.checkpoint(chunk, policy=jax.checkpoint_policies.nothing_saveable)
  state0 = nnx.merge(graphdef, params).init_state(B, max_len=C * L, decode=False)
  _, (logits_CBLV, n_CB) = jax.lax.scan(lambda st, x: chunk(params, adapters, st, x), state0, xs)
  logits_BTV = jnp.moveaxis(logits_CBLV, 0, 1).reshape(B, C * L, -1)[:, :T]
  if return_passes:
    return logits_BTV, n_CB.T
  return logits_BTV


def gdn_only_mask(param_roles) -> Any:
  """bool pytree over a decoder's parameters (from its Role tree, models/roles.py): True on
  every parameter of a GDN layer.

  A "GDN layer" is a whole decoder layer whose mixer is GDN (mixer, its MLP and norms);
  embeddings, attention layers and the final norm are False. For the sliding-window recipe's
  warm-up (train only the recurrent layers under hard eviction).
  """
  from sleep_jax.models import roles

  return roles.labels(param_roles, lambda r: r.layer_kind == "gdn")
