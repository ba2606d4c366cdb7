"""Pure, sharded train and eval steps.

The train state is a plain dict pytree {"step", "params", "opt_state", "rng"} (orbax saves it
as it is). `Trainer` builds the mesh, shardings and jitted steps once; `loop.py` drives them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from sleep_jax import freeze, losses, rng_streams
from sleep_jax import sharding as shd
from sleep_jax.config import Config
from sleep_jax.models import forward, model_factory, roles
from sleep_jax.xla_options import step_compiler_options


def make_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warmup + cosine; no weight decay on NoDecay parameters (models/roles.py);
  for a model with CMS levels, each level at its own update frequency."""
  t = cfg.train
  warmup = min(t.warmup_steps, max(t.steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.lr, warmup, max(t.steps, warmup + 1), end_value=t.lr * t.min_lr_ratio)
  param_roles = roles.roles_for(cfg)
  decay = roles.labels(param_roles, lambda r: r.decay)
  adamw = lambda sched: optax.adamw(sched, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay)
  if roles.cms_levels(param_roles):
    return optax.chain(optax.clip_by_global_norm(t.clip_norm), cms_frequencies(cfg, adamw, schedule, param_roles)), schedule
  return optax.chain(optax.clip_by_global_norm(t.clip_norm), adamw(schedule)), schedule


def cms_frequencies(cfg: Config, adamw, schedule, param_roles) -> optax.GradientTransformation:
  """CMS levels updated at their own frequencies: level l accumulates its gradients over
  update_every[l] steps (optax.MultiSteps) and applies one update, with the learning rate
  of the global step it lands on; in between its parameters stay bit-identical. Labels come
  from each parameter's role (its CMS level), so any architecture with CMS MLPs works."""
  txs = {"rest": adamw(schedule)}
  for level, k in enumerate(cfg.model.cms.update_every):
    inner = adamw(lambda count, k=k: schedule(count * k))
    txs[f"level{level}"] = inner if k == 1 else optax.MultiSteps(inner, every_k_schedule=k).gradient_transformation()
  return optax.multi_transform(txs, roles.labels(param_roles, lambda r: "rest" if r.cms_level is None
                                                 else f"level{r.cms_level}"))


def optax_state_shardings(tx, abstract_opt, param_shardings, rep):
  """Optimizer-state shardings: parameter-shaped leaves follow their parameter, the rest
  (counts, ...) is replicated; multi_transform's MaskedNode placeholders stay as they are."""
  masked = optax.transforms.MaskedNode if hasattr(optax, "transforms") else optax.MaskedNode
  return optax.tree_map_params(
      tx, lambda p, s: p if isinstance(p, masked) else s, abstract_opt, param_shardings,
      transform_non_params=lambda x: x if isinstance(x, masked) else rep,
      is_leaf=lambda x: isinstance(x, (NamedSharding, masked)))


def cast_params(params, dtype: str):
  """bf16 compute with f32 master weights: cast a copy for the forward pass only."""
  if dtype == "float32":
    return params
  return jax.tree.map(lambda p: p.astype(jnp.dtype(dtype)), params)


AUTO_CHUNK_VOCAB = 32768  # train.loss_chunk = -1 chunks the loss from this vocabulary size on


def loss_chunk_for(cfg: Config) -> int:
  """Positions per chunk of the loss (0: plain), train.loss_chunk resolved: -1 chunks large
  vocabularies with about 2^23 logits (32 MiB of float32) per chunk and row."""
  chunk, V = cfg.train.loss_chunk, cfg.model.vocab_size
  if chunk >= 0:
    return chunk
  return auto_loss_chunk(V)


def auto_loss_chunk(V: int) -> int:
  """train.loss_chunk = -1 at vocabulary V: 0 below AUTO_CHUNK_VOCAB, else a power of two of
  positions (>= 16) holding about 2^23 logits (32 at V = 151,936)."""
  if V < AUTO_CHUNK_VOCAB:
    return 0
  return max(16, 1 << ((1 << 23) // V).bit_length() - 1)


def split_batch(batch: dict[str, jax.Array]):
  return losses.next_token(batch["tokens"], batch["loss_mask"])


def segment_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """forward()'s positions_BT / segment_ids_BT for the inputs tokens[:, :-1] of packed text
  (empty for task data, which has one example per row), and a batch's own sleep schedule
  ("consolidate" [B, n_chunks of the inputs]) when it carries one."""
  out = {f"{k}_BT": batch[k][:, :-1] for k in ("positions", "segment_ids") if k in batch}
  if "consolidate" in batch:
    out["consolidate_BC"] = batch["consolidate"]
  return out


class Trainer:
  """Mesh, shardings and jitted steps for one config."""

  def __init__(self, cfg: Config, mesh=None):
    self.cfg = cfg
    self.mesh = mesh if mesh is not None else shd.make_mesh(cfg.mesh)
    self.make_model = model_factory(cfg)
    self.graphdef, abstract_params, logical = shd.abstract_model(self.make_model)
    self.param_shardings = shd.param_shardings(abstract_params, logical, self.mesh, cfg.logical_axis_rules)
    self.tx, self.schedule = make_optimizer(cfg)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    rep = shd.replicated(self.mesh)
    opt_shardings = optax_state_shardings(self.tx, abstract_opt, self.param_shardings, rep)
    self.state_shardings = {"step": rep, "params": self.param_shardings, "opt_state": opt_shardings, "rng": rep}
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params, "opt_state": abstract_opt,
         "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)},
        self.state_shardings)
    self.batch_sharding = shd.batch_sharding(self.mesh)
    opts = step_compiler_options()
    jit_step = lambda fn: jax.jit(fn, in_shardings=(self.state_shardings, self.batch_sharding),
                                  out_shardings=(self.state_shardings, rep), donate_argnums=(0,),
                                  compiler_options=opts)
    self.train_step = jit_step(functools.partial(self._train_step, cfg=cfg, tx=self.tx))
    # Sliding-window recipe (paper A): first train only the GDN layers under hard eviction.
    self.warmup_steps = cfg.sleep.warmup_gdn_steps if cfg.model.kind == "hybrid" else 0
    if self.warmup_steps:
      from sleep_jax.sleep import gdn_only_mask

      hard = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, eviction="hard"))
      # The same optimizer state throughout: freeze.masked keeps tx's state for every parameter.
      self.warmup_step = jit_step(functools.partial(
          self._train_step, cfg=hard, tx=freeze.masked(self.tx, gdn_only_mask(roles.roles_for(cfg)))))
    # Depth curriculum: the first single_pass_steps steps train at N = 1 (the fast weights
    # learn to store and be read before extra passes have anything to refine), then at N.
    self.single_pass_steps = cfg.sleep.single_pass_steps if cfg.model.kind == "hybrid" and cfg.sleep.passes > 1 else 0
    if self.single_pass_steps:
      one = dataclasses.replace(cfg, sleep=dataclasses.replace(cfg.sleep, passes=1))
      self.single_pass_step = jit_step(functools.partial(self._train_step, cfg=one, tx=self.tx))
    self.eval_step = jax.jit(self._eval_step, in_shardings=(self.param_shardings, self.batch_sharding),
                             out_shardings=rep, compiler_options=opts)

  # -- state -------------------------------------------------------------------------------
  def init_state(self) -> dict[str, Any]:
    seed = self.cfg.seed
    if self.cfg.model.init_from:  # a pretrained checkpoint: its tensors straight onto the mesh
      from sleep_jax.hf import load_params

      params = load_params(self.cfg.model.init_from, self.cfg, self.param_shardings)
      opt = self.state_shardings["opt_state"]
      rep = self.state_shardings["step"]
      return {"step": jax.device_put(jnp.zeros((), jnp.int32), rep), "params": params,
              "opt_state": jax.jit(self.tx.init, out_shardings=opt)(params),
              "rng": jax.device_put(rng_streams.raw_key(seed, "train/state"), rep)}

    def init():
      params = nnx.to_pure_dict(nnx.split(self.make_model(nnx.Rngs(seed)))[1])
      return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params),
              "rng": rng_streams.raw_key(seed, "train/state")}

    return jax.jit(init, out_shardings=self.state_shardings)()

  def model(self, params, cfg: Config | None = None) -> nnx.Module:
    """The decoder over `params`; a cfg whose model section differs (the GDN warm-up's hard
    eviction) gets its own graph definition over the same parameters."""
    graphdef = self.graphdef
    if cfg is not None and cfg.model != self.cfg.model:
      graphdef = shd.abstract_model(model_factory(cfg))[0]
    return nnx.merge(graphdef, cast_params(params, self.cfg.model.compute_dtype))

  # -- steps -------------------------------------------------------------------------------
  def step_fn(self, step: int):
    """The jitted train step to use at `step`: GDN warm-up, then single-pass, then main phase."""
    if step < self.warmup_steps:
      return self.warmup_step
    if step < self.single_pass_steps:
      return self.single_pass_step
    return self.train_step

  def _stats(self, params, batch, cfg: Config | None = None, training: bool = True):
    inputs, targets, mask = split_batch(batch)
    model, chunk = self.model(params, cfg), loss_chunk_for(cfg or self.cfg)
    out, passes_B = forward(model, inputs, mask, cfg or self.cfg, training=training, features=chunk > 0,
                            **segment_inputs(batch))
    # chunk > 0: `out` is the head's input and no [B, T, V] float32 logits exist (chunked_ce.py)
    stats = (losses.chunked_token_stats(model, out, targets, mask, chunk) if chunk > 0
             else losses.token_stats(out, targets, mask))
    if passes_B is not None:
      stats["passes_B"] = passes_B.astype(jnp.float32)
    return stats

  def _train_step(self, state, batch, *, cfg: Config, tx: optax.GradientTransformation):
    accum = cfg.train.grad_accum

    def loss_sum(params, micro):
      s = self._stats(params, micro, cfg)
      return s["loss_sum"], s

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
    if accum == 1:
      (_, stats), grads = grad_fn(state["params"], batch)
    else:
      # Micro-batches as a scan; sums (not means) are accumulated so the result is exactly the
      # token-weighted mean of the full batch.
      micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

      def body(carry, mb):
        (_, s), g = grad_fn(state["params"], mb)
        s = {k: v for k, v in s.items() if not k.endswith("_B")}
        return jax.tree.map(jnp.add, carry, (g, s)), None

      zero_g = jax.tree.map(jnp.zeros_like, state["params"])
      zero_s = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "tokens", "correct_tokens")}
      (grads, stats), _ = jax.lax.scan(body, (zero_g, zero_s), micro)
    n = jnp.maximum(stats["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / n, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": stats["loss_sum"] / n, "grad_norm": optax.tree.norm(grads),
               "lr": self.schedule(state["step"]), "answer_tokens": stats["tokens"],
               "token_accuracy": stats["correct_tokens"] / n}
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "rng": jax.random.fold_in(state["rng"], state["step"])}
    return new_state, metrics

  def _eval_step(self, params, batch):
    stats = self._stats(params, batch, training=False)
    out = {"loss_sum": stats["loss_sum"], "tokens": stats["tokens"], "exact_B": stats["exact_B"]}
    if "passes_B" in stats:  # sleep passes used (max over chunks): < N under adaptive depth
      out["passes_B"] = stats["passes_B"]
    return out
