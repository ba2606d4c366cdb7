"""The one decoder: every sleep_jax model, and every imported Hugging Face model, is this
module configured by a per-layer list of mixers and an MLP kind.

Layer i is `pattern[i % P]`, repeated R times (P = len(pattern); a model with irregular
layers is one pattern of all its layers, R = 1). A mixer is `gdn` (Gated DeltaNet) or
attention: `attn` (evicted as model.eviction says), `attn:none`, `attn:hard` or
`attn:sliding` (its own eviction, e.g. full-attention layers beside sliding ones). Every
layer is pre-norm mixer + pre-norm MLP (SwiGLU, or the chain of CMS levels with their
experts: `mlp_kind`, model.mlp, by default cms for model.kind = cms, on any layer list). Parameters are stacked per pattern position: `groups[p]` holds
the R layers of kind pattern[p] on a leading "layers" axis, and a run over full repeats is
a `lax.scan` (optionally rematerialised per repeat), so compile time and activation memory
do not grow with depth.

One call, one API:

  model(inputs, positions_BT, segment_ids_BT, state) -> (outputs, state)

inputs are token ids [B, T] (embedded) or features [B, T, D]; outputs are float32 logits
[B, T, V] (or features, when the call stops before the last layer). The state holds the
fast weights S, the conv caches and the KV caches (see `init_state`); decoding is the same
call at length 1; a segment id change (a document boundary) resets everything that carries
over. State None: a fresh stream with no KV cache (attention within the call), what
training and `models.logits` use. Only S, conv and KV caches cross calls; which of them a
sleep chunk keeps is the sleep driver's business (sleep.py, generate.py).

Stream index: the call's tokens are stream positions state.t .. state.t + T - 1. Eviction
(attention visibility, conv taps) is a function of stream indices, RoPE of `positions_BT`
(which restart per document in packed data; default: the stream index).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.models.attention import Attention, empty_cache
from sleep_jax.models.cms import CMSLevel
from sleep_jax.models.gdn import GatedDeltaNet, gdn_dims
from sleep_jax.models.layers import MLP, RMSNorm, param, short_conv
from sleep_jax.models.adapters import sub
from sleep_jax.models.roles import tag
from sleep_jax.ops.chunked_ce import project

MIXERS = ("attn", "attn:none", "attn:hard", "attn:sliding", "gdn")


def layer_plan(mc) -> tuple[tuple[str, ...], int]:
  """(pattern, repeats) of a ModelConfig: transformer and cms stack n_layers attention layers."""
  if mc.kind in ("transformer", "cms"):
    return ("attn",), mc.n_layers
  return tuple(mc.layer_pattern), mc.pattern_repeats


def mlp_kind(mc) -> str:
  """Every layer's MLP: "cms" (the CMS levels of model.cms) or "swiglu". model.mlp, or by
  kind when it is "": cms for model.kind = cms, else swiglu."""
  return mc.mlp or ("cms" if mc.kind == "cms" else "swiglu")


def layer_kinds(mc) -> list[str]:
  pattern, R = layer_plan(mc)
  return [pattern[i % len(pattern)] for i in range(len(pattern) * R)]


def attn_eviction(kind: str, mc) -> str:
  return mc.eviction if kind == "attn" else kind.split(":", 1)[1]


def kv_slots(eviction: str, chunk_len: int, max_len: int, *, decode: bool) -> int:
  """Cache slots an attention layer needs: a sleep chunk (decode=False) carries only what
  the next chunk can see; decoding keeps the current chunk too (sleep reruns it)."""
  if eviction == "none":
    return max_len
  if eviction == "hard":
    return chunk_len if decode else 0
  return 2 * chunk_len if decode else chunk_len


class Layer(nnx.Module):
  """Pre-norm mixer (`attn` or `gdn` attribute, by kind) + pre-norm MLP (or CMS levels)."""

  def __init__(self, cfg, kind: str, *, rngs: nnx.Rngs):
    if kind not in MIXERS:
      raise ValueError(f"unknown layer kind {kind!r} (expected one of {MIXERS})")
    self.kind = kind
    norm = lambda: RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps, offset=cfg.norm_offset)
    self.mixer_norm = norm()
    # model.attn_conv: a short conv before attention's q/k/v (layers.ShortConv). It is drawn
    # where each model kind drew it before the kinds became one decoder, so that a seed still
    # gives the same initial model (and committed results their numbers).
    conv_at = {"hybrid": "first", "cms": "after_attn"}.get(cfg.kind, "last") if kind != "gdn" else None
    if kind == "gdn":
      self.gdn = GatedDeltaNet(cfg, rngs=rngs)
    else:
      if conv_at == "first":
        self.conv = short_conv(cfg, rngs)
      self.attn = Attention(cfg, rngs=rngs)
      if conv_at == "after_attn":
        self.conv = short_conv(cfg, rngs)
    if mlp_kind(cfg) == "cms":
      self.levels = nnx.List([CMSLevel(cfg.d_model, f, cfg.cms, rngs=rngs, std=cfg.init_std, level=lvl)
                              for lvl, f in enumerate(cfg.cms.d_ff)])
    else:
      self.mlp_norm = norm()
      self.mlp = MLP(cfg.d_model, cfg.d_ff, rngs=rngs, std=cfg.init_std)
    if conv_at == "last":
      self.conv = short_conv(cfg, rngs)
    tag(self, layer_kind=kind)

  def mlp_residual(self, h, ad=None):
    if hasattr(self, "levels"):
      for i, level in enumerate(self.levels):
        h = h + level(h, sub(ad, "levels", i))
      return h
    return h + self.mlp(self.mlp_norm(h), sub(ad, "mlp"))

  def __call__(self, h_BTD, st: dict, ctx: dict, ad: dict | None = None):
    """One layer. st: this layer's state slice (no leading R); ad: its adapters (no leading
    R; models/adapters.py) or None. Returns (h, new st)."""
    x = self.mixer_norm(h_BTD)
    if self.kind == "gdn":
      y, S, conv = self.gdn(x, st["S"], valid=ctx["taps"][self.gdn.conv_q.shape[0]], new_seg_BT=ctx["new_seg"],
                            conv_cache=st.get("conv"), ad=sub(ad, "gdn"))
      st = {**st, "S": S, **({"conv": conv} if "conv" in st else {})}  # no cache in, none out
    else:
      if self.conv is not None:
        x, conv = self.conv(x, ctx["taps"][self.conv.w.shape[0]], st.get("conv"))
        if "conv" in st:
          st = {**st, "conv": conv}
      y, kv = self.attn(x, ctx["positions"], ctx["idx"], ctx["seg"], st.get("kv"), eviction=ctx["eviction"][self.kind],
                        chunk_len=ctx["chunk_len"], segmented=ctx["segmented"], row=ctx.get("row"),
                        ad=sub(ad, "attn"))
      if kv is not None:
        st = {**st, "kv": kv}
    return self.mlp_residual(h_BTD + y, ad), st


def stacked(make, n: int, rngs: nnx.Rngs):
  """n copies of a module with parameters stacked on a leading "layers" axis."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r):
    return make(r)

  layers = create(rngs)
  tag(layers, stacked=True)
  return layers


def _taps_valid(W: int, idx_T, seg_start_BT, chunk_len: int, evicts: bool):
  """bool [W, T] or [B, W, T]: conv tap i of call token t reads a visible input."""
  src_WT = idx_T[None, :] - jnp.arange(W)[:, None]
  valid = src_WT >= 0
  if evicts:
    valid &= (src_WT // chunk_len) == (idx_T[None, :] // chunk_len)
  if seg_start_BT is not None:
    valid = valid[None] & (src_WT[None] >= seg_start_BT[:, None, :])
  return valid


def group_adapters(adapters: dict | None, P: int) -> list:
  """Per pattern position, its layers' adapter subtree (leading R) or None. Only stacked
  layer weights take adapters: one elsewhere (the embedding, the head) would be silently
  ignored, so it is an error."""
  if adapters is None:
    return [None] * P
  if set(adapters) - {"groups"}:
    raise ValueError(f"adapters outside the stacked layers are not supported: {sorted(set(adapters) - {'groups'})}")
  return [sub(adapters, "groups", p) for p in range(P)]


class Decoder(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs, chunk_len: int | None = None):
    """cfg: a ModelConfig; chunk_len: sleep.chunk_len, the eviction period (needed iff
    some layer evicts)."""
    self.cfg = cfg
    self.pattern, self.repeats = layer_plan(cfg)
    evicting = any(k != "gdn" and attn_eviction(k, cfg) != "none" for k in self.pattern) or cfg.eviction != "none"
    if evicting and not chunk_len:
      raise ValueError("a model with eviction needs chunk_len (sleep.chunk_len)")
    self.chunk_len = int(chunk_len or 1)
    if not self.pattern or self.repeats < 1:
      raise ValueError("the decoder needs a non-empty model.layer_pattern and pattern_repeats >= 1")
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 1.0, fan_in=())  # a table
    self.groups = nnx.List([stacked(lambda r, k=kind: Layer(cfg, k, rngs=r), self.repeats, rngs)
                            for kind in self.pattern])
    self.final_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps, offset=cfg.norm_offset)
    self.unembed = None if cfg.tie_embeddings else param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                                         cfg.init_std)

  # -- shapes ------------------------------------------------------------------------------
  @property
  def n_layers(self) -> int:
    return len(self.pattern) * self.repeats

  @property
  def has_gdn(self) -> bool:
    return "gdn" in self.pattern

  def init_state(self, batch: int, *, max_len: int, decode: bool) -> dict:
    """An empty stream: t = 0, S = 0, zero conv caches, empty KV caches sized by `kv_slots`."""
    c, R = self.cfg, self.repeats
    dtype = jnp.dtype(c.compute_dtype)
    Hk, Hv, dk, dv = gdn_dims(c)
    layers = []
    for kind in self.pattern:
      if kind == "gdn":
        C = 2 * Hk * dk + Hv * dv
        layers.append({"S": jnp.zeros((R, batch, Hv, dv, dk), jnp.float32),
                       "conv": jnp.zeros((R, batch, c.gdn_conv - 1, C), dtype)})
      else:
        slots = kv_slots(attn_eviction(kind, c), self.chunk_len, max_len, decode=decode)
        st = {"kv": empty_cache(R, batch, c.n_kv_heads or c.n_heads, slots, c.head_dim, dtype)}
        if c.attn_conv:
          st["conv"] = jnp.zeros((R, batch, c.attn_conv - 1, c.d_model), dtype)
        layers.append(st)
    return {"t": jnp.zeros((), jnp.int32), "seg": jnp.zeros((batch,), jnp.int32), "layers": tuple(layers)}

  def fresh_layers(self, batch: int) -> tuple:
    """Per-group state of a stateless call: S = 0, no conv or KV cache."""
    Hk, Hv, dk, dv = gdn_dims(self.cfg)
    return tuple({"S": jnp.zeros((self.repeats, batch, Hv, dv, dk), jnp.float32)} if k == "gdn" else {}
                 for k in self.pattern)

  # -- ends of the stack ---------------------------------------------------------------------
  def embed_tokens(self, tokens_BT: jax.Array) -> jax.Array:
    return jnp.take(self.embed[...], tokens_BT, axis=0).astype(jnp.dtype(self.cfg.compute_dtype))

  def head(self, h_BTD: jax.Array) -> jax.Array:
    return project(self.final_norm(h_BTD), *self.head_weight())

  def head_weight(self) -> tuple[jax.Array, bool]:
    """(W, tied): what the head multiplies the final-normed features by -- the tied
    embedding [V, D] or the unembedding [D, V]. The chunked losses (ops/chunked_ce.py) take
    it with `model(..., features=True)` instead of the logits."""
    if self.unembed is None:
      return self.embed[...], True
    return self.unembed[...], False

  # -- the stack -------------------------------------------------------------------------------
  def context(self, T: int, B: int, positions_BT, segment_ids_BT, state) -> dict:
    """What every layer of one call shares: stream indices, segments, conv tap masks."""
    c = self.cfg
    t0 = state["t"] if state is not None else jnp.zeros((), jnp.int32)
    idx_T = t0 + jnp.arange(T, dtype=jnp.int32)
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(idx_T, (B, T))
    segmented = segment_ids_BT is not None
    seg_BT = segment_ids_BT.astype(jnp.int32) if segmented else jnp.zeros((B, T), jnp.int32)
    new_seg = seg_start = None
    if segmented:
      prev_B1 = state["seg"][:, None] if state is not None else seg_BT[:, :1]
      new_seg = seg_BT != jnp.concatenate([prev_B1, seg_BT[:, :-1]], axis=1)
      new_seg = new_seg | (idx_T[None, :] == 0)
      seg_start = jax.lax.cummax(jnp.where(new_seg, idx_T[None, :], -1), axis=1)
    evicts, chunk_len = c.eviction != "none", self.chunk_len
    widths = {c.gdn_conv} | ({c.attn_conv} if c.attn_conv else set())
    return {"positions": positions_BT.astype(jnp.int32), "idx": idx_T, "seg": seg_BT, "segmented": segmented,
            "new_seg": new_seg, "chunk_len": chunk_len,
            "taps": {W: _taps_valid(W, idx_T, seg_start, chunk_len, evicts) for W in widths},
            "eviction": {k: attn_eviction(k, c) for k in MIXERS if k != "gdn"}}

  def run_layers(self, h_BTD, layers: tuple, ctx: dict, lo: int = 0, hi: int | None = None,
                 adapters: dict | None = None):
    """Layers [lo, hi) over h with per-group states `layers` (leading axis R).
    Returns (h, layers) with only the rows of layers in [lo, hi) changed. adapters: the
    adapter tree of the whole model (models/adapters.py: keys as in the parameter dict) or
    None; its "groups" rows ride through the scan beside the parameters."""
    P, R = len(self.pattern), self.repeats
    hi = self.n_layers if hi is None else hi
    if not lo < hi:
      return h_BTD, layers
    layers = list(layers)
    splits = [nnx.split(g) for g in self.groups]
    ads = group_adapters(adapters, P)

    def run_repeat(h, params_p, states_p, ps, row=None):
      """Pattern positions ps of one repeat (params, states and adapters without the R axis;
      params_p[p] is the pair (params, adapters))."""
      states_p = list(states_p)
      c = ctx if row is None else {**ctx, "row": row}
      for p in ps:
        params, ad = params_p[p]
        layer = nnx.merge(splits[p][0], params)
        h, states_p[p] = layer(h, states_p[p], c, ad)
      return h, tuple(states_p)

    def run_one(h, r, ps):
      decoding = h.shape[1] == 1
      at_r = lambda tree: jax.tree.map(lambda a: a[r], tree)  # noqa: E731
      # Decoding hands attention its whole group KV cache (written in place at row r).
      take = lambda st: {k: (v if decoding and k == "kv" else at_r(v)) for k, v in st.items()}  # noqa: E731
      params_p = [at_r((splits[p][1], ads[p])) if p in ps else None for p in range(P)]
      states_p = [take(layers[p]) if p in ps else None for p in range(P)]
      fn = run_repeat
      if self.cfg.remat and not decoding:  # (decoding is never differentiated)
        fn = jax.checkpoint(run_repeat, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=(3,))
      h, new = fn(h, params_p, states_p, tuple(ps), r if decoding else None)
      for p in ps:
        row = dict(new[p])
        whole = {"kv": row.pop("kv")} if decoding and "kv" in row else {}
        layers[p] = {**layers[p], **whole, **jax.tree.map(lambda full, x: full.at[r].set(x.astype(full.dtype)),
                                                           {k: layers[p][k] for k in row}, row)}
      return h

    full: list[int] = []  # a run of consecutive whole repeats, scanned together

    def flush(h):
      if full:
        h = self._scan_repeats(h, layers, splits, ads, ctx, full[0], full[-1] + 1, run_repeat)
        full.clear()
      return h

    # A decoded token runs its layers unrolled: a scan would carry the KV caches as xs -> ys,
    # a fresh copy of every cache per token; unrolled, each row is updated in place.
    decoding = h_BTD.shape[1] == 1
    for r in range(lo // P, (hi - 1) // P + 1):
      start, end = max(lo, r * P), min(hi, (r + 1) * P)
      if end - start == P and not decoding:
        full.append(r)
      else:  # a partial repeat at either end of the range
        h_BTD = run_one(flush(h_BTD), r, list(range(start - r * P, end - r * P)))
    h_BTD = flush(h_BTD)
    return h_BTD, tuple(layers)

  def _scan_repeats(self, h, layers: list, splits, ads, ctx, r0: int, r1: int, run_repeat):
    """Full repeats r0 .. r1 - 1 as one lax.scan (or unrolled), writing their state rows."""
    P = len(self.pattern)
    every = tuple(range(P))
    whole = r0 == 0 and r1 == self.repeats
    rows = lambda tree: tree if whole else jax.tree.map(lambda a: a[r0:r1], tree)
    xs = (tuple(rows((s[1], ad)) for s, ad in zip(splits, ads)), tuple(rows(layers[p]) for p in range(P)))

    def body(h, x):
      params_p, states_p = x
      return run_repeat(h, params_p, states_p, every)

    if self.cfg.remat:
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    if self.cfg.scan_layers:
      h, new = jax.lax.scan(body, h, xs)
    else:
      outs = []
      for r in range(r1 - r0):
        h, y = body(h, jax.tree.map(lambda a: a[r], xs))
        outs.append(y)
      new = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    for p in range(P):
      if whole:
        layers[p] = jax.tree.map(lambda full, n: n.astype(full.dtype), layers[p], new[p])
      else:
        layers[p] = jax.tree.map(lambda full, n: full.at[r0:r1].set(n.astype(full.dtype)), layers[p], new[p])
    return h

  def __call__(self, inputs, positions_BT=None, segment_ids_BT=None, state=None, *,
               layers: tuple[int, int] | None = None, features: bool = False, adapters: dict | None = None):
    """(outputs, state): see the module docstring. layers = (lo, hi) runs only that range
    (features in and out unless it starts at 0 / ends at the last layer). features: a call
    that ends at the last layer returns the head's input, final_norm(h) [B, T, D], instead
    of the logits (see `head_weight`). adapters: unmerged low-rank adapters
    (models/adapters.py), keyed like the parameter dict, or None."""
    lo, hi = layers if layers is not None else (0, self.n_layers)
    h = self.embed_tokens(inputs) if jnp.issubdtype(inputs.dtype, jnp.integer) else inputs
    B, T = h.shape[:2]
    ctx = self.context(T, B, positions_BT, segment_ids_BT, state)
    per_layer = state["layers"] if state is not None else self.fresh_layers(B)
    h, per_layer = self.run_layers(h, per_layer, ctx, lo, hi, adapters)
    new_state = {"t": ctx["idx"][-1] + 1, "seg": ctx["seg"][:, -1], "layers": per_layer}
    if hi == self.n_layers:
      h = self.final_norm(h) if features else self.head(h)
    return h, new_state
