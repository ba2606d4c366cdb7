"""The jitted knowledge-seeding steps: masked SFT and the L_KS consolidation step.

Both are pure functions of explicit pytrees, jitted with the student's shardings and a
donated state {"step", "params", "opt_state", "rng"}. Only the trainable parameters move:
the optimizer is freeze.masked, so every other parameter stays bit-identical (tested).

L_KS step (maximises (1 - alpha) E[r] - alpha D(T||S)), all in ONE jitted step:
  1. off-policy: F(T||S) on the teacher-sampled batch from D (teacher logits in-step);
  2. on-policy (lambda > 0): the student samples completions of D's prompts (no gradient
     through sampling), the teacher scores them in the same step;
  3. imitation (alpha < 1): B/G dreams of the batch are cut at random points, the student
     completes each G times, rewards as in imitate.py, GRPO against the frozen reference
     (the student before consolidation).
  loss = alpha * ((1 - lambda) F_off + lambda F_on) + (1 - alpha) * L_GRPO
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sleep_jax import freeze, losses
from sleep_jax.config import Config
from sleep_jax.data.facts import PROMPT_LEN
from sleep_jax.generate import sample_tokens
from sleep_jax.models import roles
from sleep_jax.ops import chunked_ce
from sleep_jax.seeding import distill, imitate
from sleep_jax.train import loss_chunk_for


# With chunk > 0 (train.loss_chunk of the student) the distillation and log-prob terms read a
# decoder's head input and weight, (x_BTD, W, tied), and form the logits a chunk at a time
# (ops/chunked_ce.py); with chunk 0 they read plain float32 logits [B, T, V].
def _head_out(model, tokens_BT, chunk: int):
  if chunk:
    return (model(tokens_BT, features=True)[0], *model.head_weight())
  return model(tokens_BT)[0]


def _divergence(div, t_out, s_out, chunk: int):
  if chunk:
    return chunked_ce.chunked_divergence(div, t_out[0], t_out[1], s_out[0], s_out[1], tied_t=t_out[2],
                                         tied_s=s_out[2], chunk=chunk)
  return div(t_out, s_out)


def _target_logp(out, targets_BT, chunk: int):
  """log q(target_t | prefix) per position [B, T] (float32)."""
  if chunk:
    return -chunked_ce.chunked_cross_entropy(out[0], out[1], targets_BT, tied=out[2], chunk=chunk)[0]
  return distill.sequence_log_probs(out, targets_BT)


def trainable(param_roles: dict, *, level: int, slot: int | Sequence[int] | None) -> Any:
  """True for expert `slot` (or every slot in a sequence of them) of CMS `level` (slot None:
  that level's base MLP), else False (models/roles.py: chosen by each parameter's role, on
  any architecture)."""
  slots = None if slot is None else {slot} if isinstance(slot, int) else set(slot)

  def train(r):
    if r.cms_level != level or not r.trainable:
      return False
    if slots is None:
      return r.cms_part == "mlp"
    return r.cms_part == "expert" and r.expert_slot in slots

  return roles.labels(param_roles, train)


def masked_optimizer(trainable_tree, lr: float, steps: int, clip: float = 1.0) -> optax.GradientTransformation:
  """Clipped Adam with warm-up + cosine on the trainable parameters only (freeze.py)."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(10, max(steps - 1, 0)), max(steps, 11), lr * 0.1)
  return freeze.masked(optax.chain(optax.clip_by_global_norm(clip), optax.adam(schedule)), trainable_tree)


def _apply(tx, state, grads, metrics):
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
  return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}, metrics


def sft_step(graphdef, tx, state, batch):
  """Masked cross-entropy on statements (the fast stage, and the `sft` baseline on D)."""
  loss_fn = lambda params: losses.next_token_loss(nnx.merge(graphdef, params), batch["tokens"], batch["loss_mask"])
  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  return _apply(tx, state, grads, {"loss": loss})


def _teacher_lp(teacher, seq_BT, mask_BT, chunk: int):
  """Mean teacher log-prob per masked target token, per row [B]."""
  lp = _target_logp(_head_out(teacher, seq_BT[:, :-1], chunk), seq_BT[:, 1:], chunk)
  return losses.masked_row_mean(lp, mask_BT[:, 1:])


def ks_step(s_graphdef, t_graphdef, tx, cfg: Config, scfg: Config, hp: dict, state, teacher_params, ref_params,
            batch, *, gather=None):
  """One L_KS step. hp: lam, alpha, lam_warmup (the method's), from methods.py; lambda ramps
  linearly from 0 to lam over the first lam_warmup steps (0: constant). gather: a replicated
  sharding for the weights the samplers use, so no collective runs inside the decoding
  loops (XLA:CPU's in-process collectives inside while loops deadlocked on fake devices)."""
  sc = cfg.seeding
  lam, alpha = hp["lam"], hp["alpha"]
  tokens, mask = batch["tokens"], batch["loss_mask"]
  B, T = tokens.shape
  rng = jax.random.fold_in(state["rng"], state["step"])
  r_on, r_im, r_cut = jax.random.split(rng, 3)
  chunk = loss_chunk_for(scfg)
  teacher = functools.partial(_head_out, nnx.merge(t_graphdef, teacher_params), chunk=chunk)
  frozen = jax.lax.stop_gradient(state["params"])
  if gather is not None:
    frozen = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, gather), frozen)
  sample = functools.partial(sample_tokens, s_graphdef, frozen, cfg=scfg, temperature=1.0)
  div = functools.partial(distill.token_divergence, kind=sc.divergence, beta=sc.jsd_beta, temperature=sc.temperature)

  t_off = teacher(tokens[:, :-1])
  if lam > 0:
    y_on = sample(tokens[:, :PROMPT_LEN], r_on, steps=T - PROMPT_LEN)
    t_on = teacher(y_on[:, :-1])
  if alpha < 1:
    G = sc.group_size
    dreams = jnp.repeat(tokens[: B // G], G, axis=0)  # [B', T], B' = (B // G) * G
    cut = jnp.repeat(jax.random.randint(r_cut, (B // G,), PROMPT_LEN, T), G)  # prefix length, >= 1 to complete
    comp = sample(dreams, r_im, steps=0, prompt_len_B=cut)
    cmask = (jnp.arange(T)[None] >= cut[:, None]).astype(jnp.int32)
    t_model = nnx.merge(t_graphdef, teacher_params)
    r_sem = imitate.judge_same(_teacher_lp(t_model, comp, cmask, chunk), _teacher_lp(t_model, dreams, cmask, chunk),
                               sc.judge_margin)
    # Completed parts, left-aligned: position j of row b is token cut_b + j.
    idx = jnp.minimum(cut[:, None] + jnp.arange(T)[None], T - 1)
    rewards, r_abs = imitate.imitation_reward(jnp.take_along_axis(comp, idx, 1), jnp.take_along_axis(dreams, idx, 1),
                                              T - cut, z0=sc.z0, r_sem_B=r_sem, gamma=sc.gamma)
    adv = imitate.group_advantages(rewards.reshape(-1, G)).reshape(-1)
    ref = _head_out(nnx.merge(s_graphdef, ref_params), comp[:, :-1], chunk)
    lp_ref = jax.lax.stop_gradient(_target_logp(ref, comp[:, 1:], chunk))

  def loss_fn(params):
    student = functools.partial(_head_out, nnx.merge(s_graphdef, params), chunk=chunk)
    m = {"distill_off": losses.masked_mean(_divergence(div, t_off, student(tokens[:, :-1]), chunk), mask[:, 1:])}
    d = m["distill_off"]
    if lam > 0:
      m["distill_on"] = losses.masked_mean(_divergence(div, t_on, student(y_on[:, :-1]), chunk), mask[:, 1:])
      lam_t = lam
      if hp.get("lam_warmup", 0) > 0:
        lam_t = lam * jnp.minimum(1.0, (state["step"] + 1).astype(jnp.float32) / hp["lam_warmup"])
      m["lambda"] = jnp.asarray(lam_t, jnp.float32)
      d = (1.0 - lam_t) * d + lam_t * m["distill_on"]
    loss = d
    if alpha < 1:
      lp = _target_logp(student(comp[:, :-1]), comp[:, 1:], chunk)
      g, gs = imitate.grpo_loss(lp, jax.lax.stop_gradient(lp), lp_ref, adv, cmask[:, 1:], clip_eps=sc.clip_eps,
                                kl_coef=sc.kl_coef)
      m.update(grpo_loss=g, reward=rewards.mean(), r_abs=r_abs.mean(), r_sem=r_sem.mean(), **gs)
      loss = alpha * d + (1.0 - alpha) * g
    return loss, {**m, "divergence": d}

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  return _apply(tx, state, grads, {"loss": loss, **metrics})


def jit_step(fn: Callable, state_shardings, other_shardings: tuple, batch_sharding, rep):
  return jax.jit(fn, in_shardings=(state_shardings, *other_shardings, batch_sharding),
                 out_shardings=(state_shardings, rep), donate_argnums=(0,))
