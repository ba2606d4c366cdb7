"""Dream sampling, gradient-based selection, isolated LoRA copies and ReST-EM (pure jitted parts).

* Dreams: m continuations of `passage QUERY` from the jitted sampler; with novelty on, each
  dream is sampled with every CMS router also activating one random expert slot (a slot
  still at B = 0 changes nothing; slots filled on earlier days perturb the writer).
* Importance: the L2 norm of the gradient of a dream's closed-book SFT loss with respect to
  all model parameters (a dream the model already "knows" has a small gradient). Keep the
  top k plus b others drawn at random (deterministic per rng).
* Isolated copies: each kept dream trains its own LoRA adapter for `copy_steps` Adam steps
  on the frozen base; all copies at once with jax.vmap over adapters (SEAL trains one copy
  at a time). Adapters stay unmerged (models/adapters.py): the copies share the base
  weights, so vmapped with the base unbatched, x W is one matmul over every copy's rows and
  only the rank-r products are per copy; gradients are taken w.r.t. the adapter alone.
  Reward 1 iff the copy's closed-book accuracy on the day's probes beats the base model's
  (the task evaluation tau).
* ReST-EM: the generator (the model plus its own LoRA adapter: fresh every day with
  `dreaming.generator=per_day`, kept across days with `carried`) is fine-tuned on
  `passage QUERY dream` for the rewarded dreams only.

Every pass of the model over a row here is `models.forward` with the run's config, the
forward the base model was trained with (Trainer): for a model that sleeps (GDN layers and
eviction, e.g. a cms-MLP hybrid) a row longer than sleep.chunk_len, such as a passage then a
dream, is read chunk by chunk with the sleep passes and the KV cache evicted between chunks
(sleep.py); dream sampling sleeps on every chunk as it reads (generate.py). For a model that
does not sleep it is one plain causal pass, as before.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sleep_jax import losses
from sleep_jax.data.facts import BOS
from sleep_jax.dreaming import lora as lora_lib
from sleep_jax.generate import sample_tokens
from sleep_jax.models import forward, roles


def force_experts(params: dict, param_roles: dict, slots_L: jax.Array) -> dict:
  """Every CMS level l also activates expert slots_L[l] (novelty while dreaming)."""
  def force(r, x):
    if not r.is_flag:
      return x
    return jnp.where(slots_L[r.cms_level] == r.expert_slot, jnp.ones_like(x), x)

  return roles.edit(params, param_roles, force)


def sample_dreams(graphdef, params, prompt_T: jax.Array, rng: jax.Array, *, cfg, m: int, length: int,
                  temperature: float, novelty: bool) -> jax.Array:
  """Dreams [m, length]: the prompt's last token (QUERY) + length - 1 sampled tokens."""
  param_roles = roles.roles_for(cfg)
  n_levels, n_slots = roles.cms_levels(param_roles), roles.expert_slots(param_roles)

  def one(key):
    k_slot, k_tok = jax.random.split(key)
    p = params
    if novelty:
      p = force_experts(params, param_roles, jax.random.randint(k_slot, (n_levels,), 0, n_slots))
    out = sample_tokens(graphdef, p, prompt_T[None], k_tok, cfg, steps=length - 1, temperature=temperature)
    return out[0, prompt_T.shape[0] - 1:]

  return jax.vmap(one)(jax.random.split(rng, m))


def closed_book(dreams_MN: jax.Array, attr_mask_N: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Dreams as closed-book training text: BOS + dream, loss on the attribute positions."""
  tokens = jnp.concatenate([jnp.full((dreams_MN.shape[0], 1), BOS, dreams_MN.dtype), dreams_MN], axis=1)
  mask = jnp.concatenate([jnp.zeros((1,), jnp.int32), attr_mask_N.astype(jnp.int32)])
  return tokens, jnp.broadcast_to(mask, tokens.shape)


def rotations(tokens_BT: jax.Array, stmt_len: int) -> jax.Array:
  """Every cyclic rotation of the statements after BOS: [n_stmts * B, T], rotation-major.

  A closed-book probe asks a fact as the first statement after BOS, but a dream states it
  wherever it happened to sample it; these small models do not carry a fact written at one
  position to another, so a write sees every statement at every position. The loss mask of
  a closed-book text is the same for every statement, so it rotates onto itself.
  """
  B, T = tokens_BT.shape
  body = tokens_BT[:, 1:].reshape(B, (T - 1) // stmt_len, stmt_len)
  return jnp.concatenate([jnp.concatenate([tokens_BT[:, :1], jnp.roll(body, k, axis=1).reshape(B, T - 1)], 1)
                          for k in range(body.shape[1])])


def logits(graphdef, params, inputs_BT: jax.Array, target_mask_BT: jax.Array, *, cfg, training: bool = True,
           adapters=None) -> jax.Array:
  """float32 [B, T, V] next-token logits of the inputs, the model's own forward
  (`models.forward`: with the sleep passes and eviction of cfg when the model sleeps; which
  chunks consolidate follows sleep.schedule on target_mask, aligned with the inputs, exactly
  as in training). adapters: unmerged (decoder form, lora.for_model) or None."""
  return forward(nnx.merge(graphdef, params), inputs_BT, target_mask_BT, cfg, training=training,
                 adapters=adapters)[0]


def greedy_targets(graphdef, params, tokens_BT: jax.Array, mask_BT: jax.Array, *, span: int, cfg) -> jax.Array:
  """tokens with every masked (target) position replaced by the model's own greedy choice.

  Generative replay samples closed-book texts at temperature 1 so that they cover what the
  model knows, but a sampled attribute is sometimes one the model does not believe: training
  on it would write a wrong fact over a right one. Replay targets are therefore the model's
  argmax beliefs given the sampled entity and relation. `span` passes (the number of masked
  positions per row) reach the fixed point: pass i settles the i-th target, conditioned on
  the relabelled ones before it, as greedy decoding would have written them.
  """
  target = mask_BT[:, 1:].astype(bool)
  for _ in range(span):
    out = logits(graphdef, params, tokens_BT[:, :-1], mask_BT[:, 1:], cfg=cfg, training=False)
    pred_BT = jnp.argmax(out, axis=-1).astype(tokens_BT.dtype)
    tokens_BT = tokens_BT.at[:, 1:].set(jnp.where(target, pred_BT, tokens_BT[:, 1:]))
  return tokens_BT


def sft_loss(graphdef, params, tokens_BT, mask_BT, adapters=None, *, cfg) -> jax.Array:
  """Masked next-token cross-entropy; adapters: unmerged (decoder form, lora.for_model)."""
  inputs, targets, mask = losses.next_token(tokens_BT, mask_BT)
  return losses.masked_ce(logits(graphdef, params, inputs, mask, cfg=cfg, adapters=adapters), targets, mask)


def importance(graphdef, params, tokens_MT, mask_MT, *, cfg) -> jax.Array:
  """Per-dream SFT gradient norm [M]."""
  g = lambda t, m: optax.global_norm(jax.grad(functools.partial(sft_loss, cfg=cfg), argnums=1)(
      graphdef, params, t[None], m[None]))
  return jax.vmap(g)(tokens_MT, mask_MT)


def select(scores_M: np.ndarray, k: int, b: int, rng: np.random.Generator) -> np.ndarray:
  """Indices of the top-k scores plus b drawn uniformly from the rest (sorted)."""
  order = np.argsort(-np.asarray(scores_M), kind="stable")
  top, rest = order[:k], order[k:]
  extra = rng.choice(rest, min(b, len(rest)), replace=False) if len(rest) else np.array([], int)
  return np.sort(np.concatenate([top, extra]).astype(int))


def probe_scores(graphdef, params, probes_FT, mask_FT, adapters=None, *, cfg) -> tuple[jax.Array, jax.Array]:
  """(exact-match accuracy, loss) of probes under teacher forcing; exact match of every
  answer token given the true prefix equals greedy-decoding exact match. Closed-book probes,
  or in-context ones (a passage, then QA): the same forward reads the passage."""
  m = mask_FT[:, 1:]
  out = logits(graphdef, params, probes_FT[:, :-1], m, cfg=cfg, training=False, adapters=adapters)
  ok = (jnp.argmax(out, -1) == probes_FT[:, 1:]) | (m == 0)
  return jnp.mean(jnp.all(ok, -1).astype(jnp.float32)), losses.masked_ce(out, probes_FT[:, 1:], m)


def statement_accuracy(graphdef, params, rows_FT, mask_FT, *, start: int, stmt_len: int, cfg) -> jax.Array:
  """Share of the QA statements after position `start` (in-context reading: rows of
  DayWorld.reading_probes) whose masked tokens all come out right under teacher forcing,
  through the model's own forward: for a model that sleeps the passage's chunks are slept on
  and evicted before the statements are read."""
  m = mask_FT[:, 1:]
  out = logits(graphdef, params, rows_FT[:, :-1], m, cfg=cfg, training=False)
  ok = (jnp.argmax(out, -1) == rows_FT[:, 1:]) | (m == 0)
  ok = jnp.concatenate([jnp.ones_like(ok[:, :1]), ok], 1)[:, start:]  # aligned with the tokens
  return jnp.mean(jnp.all(ok.reshape(ok.shape[0], -1, stmt_len), -1).astype(jnp.float32))


def train_copy(graphdef, params, adapter, tokens_T, mask_T, *, steps: int, lr: float, alpha: float, cfg):
  """One isolated copy: `steps` Adam steps of LoRA SFT on one dream [T] (or a batch [B, T]).
  Returns the adapter. It stays unmerged and is the only argument differentiated."""
  tx = optax.adam(lr)
  t, m = (tokens_T, mask_T) if tokens_T.ndim == 2 else (tokens_T[None], mask_T[None])
  loss = lambda ad: sft_loss(graphdef, params, t, m, lora_lib.for_model(ad, alpha=alpha), cfg=cfg)

  def body(carry, _):
    ad, opt = carry
    g = jax.grad(loss)(ad)
    upd, opt = tx.update(g, opt, ad)
    return (optax.apply_updates(ad, upd), opt), None

  (adapter, _), _ = jax.lax.scan(body, (adapter, tx.init(adapter)), None, length=steps)
  return adapter


def copy_rewards(graphdef, params, adapters, probes_FT, mask_FT, *, alpha: float, cfg) -> tuple[jax.Array, jax.Array]:
  """(reward [K], accuracy [K]) of trained copies against the base model on tau."""
  base_acc, _ = probe_scores(graphdef, params, probes_FT, mask_FT, cfg=cfg)
  acc = jax.vmap(lambda ad: probe_scores(graphdef, params, probes_FT, mask_FT, lora_lib.for_model(ad, alpha=alpha),
                                         cfg=cfg)[0])(adapters)
  return (acc > base_acc).astype(jnp.float32), acc


def rest_em_loss(graphdef, params, gen_adapter, prompt_T, dreams_MN, weights_M, *, alpha: float, cfg):
  """ReST-EM's M-step objective: -log p(dream | passage QUERY) on rewarded dreams only."""
  seq = jnp.concatenate([jnp.broadcast_to(prompt_T[:-1], (dreams_MN.shape[0], prompt_T.shape[0] - 1)), dreams_MN], 1)
  P = prompt_T.shape[0]
  mask = (jnp.arange(seq.shape[1]) >= P)[None].astype(jnp.float32) * weights_M[:, None]
  return sft_loss(graphdef, params, seq, mask, lora_lib.for_model(gen_adapter, alpha=alpha), cfg=cfg)
