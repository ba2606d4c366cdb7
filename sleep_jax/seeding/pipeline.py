"""`sleep-jax seed CONFIG`: teacher -> expand -> consolidate -> evaluate, each stage resumable.

RUN_DIR/
  config.yaml                 the resolved config (a differing one is refused on resume)
  teacher/pretrain/           CMS teacher learns the old facts (all levels, at their frequencies)
  teacher/fast/               one fast-level expert learns the new facts (the pending fast update)
  student_init/               the grown student: teacher expanded onto the student mesh, fast
                              experts reset, one new slow-level expert (B = 0)
  teacher_samples.npz         D: the teacher's samples for prompts over the known (or new) facts
  methods/<method>/           consolidation (checkpoints, metrics.jsonl, TensorBoard, eval.json)
  results.json / .md / .png   one row per method: accuracy (all, new, old facts),
                              divergence_to_teacher, wall_s
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sleep_jax import engine, losses, rng_streams
from sleep_jax import sharding as shd
from sleep_jax.config import Config
from sleep_jax.data.facts import PROMPT_LEN, FactWorld
from sleep_jax.generate import sample_tokens
from sleep_jax.models import model_factory, roles
from sleep_jax.seeding import distill, expand, steps
from sleep_jax.train import Trainer, optax_state_shardings

log = logging.getLogger("sleep_jax")
FAST, SLOW = 0, -1  # CMS levels: the fastest consolidates into the slowest


class ModelOnMesh:
  """graphdef, logical axes and shardings of one model config on one mesh."""

  def __init__(self, cfg: Config, mesh):
    self.cfg, self.mesh = cfg, mesh
    self.make = model_factory(cfg)
    self.graphdef, self.abstract, self.logical = shd.abstract_model(self.make)
    self.roles = roles.roles_for(cfg)
    self.shardings = self.on(mesh)
    self.rep = shd.replicated(mesh)
    self.samplers: dict = {}

  def on(self, mesh):
    return shd.param_shardings(self.abstract, self.logical, mesh, self.cfg.logical_axis_rules)

  def init(self, seed: int):
    return shd.init_params(self.make, seed, self.shardings)

  def train_state(self, tx, rng):
    """(shardings, abstract state, make(params) -> state) of a stage training params with tx;
    rng: the state's uint32[2] key (rng_streams.raw_key)."""
    abstract_opt = jax.eval_shape(tx.init, self.abstract)
    shardings = {"step": self.rep, "params": self.shardings, "rng": self.rep,
                 "opt_state": optax_state_shardings(tx, abstract_opt, self.shardings, self.rep)}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": self.abstract,
                             "opt_state": abstract_opt, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}, shardings)
    make = lambda params: jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p),
                                             "rng": rng}, out_shardings=shardings)(params)
    return shardings, abstract, make


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """The same global numpy batch on every process -> this process's rows as global arrays."""
  start, stop = shd.local_batch_rows(mesh, len(next(iter(batch.values()))))
  return shd.global_batch({k: v[start:stop] for k, v in batch.items()}, mesh)


def stage(cfg: Config, *where: str, abstract_state, init, step, batch, steps: int, desc: str,
          **options) -> engine.Stage:
  """A pipeline stage on the training engine, in RUN_DIR/<where>: `step(state, batch)` jitted,
  `batch(i)` a pure function of the step (so a resumed stage needs nothing but the step),
  checkpoints and logging as cfg.checkpoint and cfg.train.log_every say."""
  return engine.Stage(dir=os.path.join(cfg.run_dir, *where), steps=steps, abstract_state=abstract_state, init=init,
                      step_fn=lambda i: step, data=engine.step_batches(batch), every=cfg.checkpoint.every,
                      keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                      log_every=cfg.train.log_every, desc=desc, **options)


# -- evaluation ----------------------------------------------------------------------------
def greedy_answers(m: ModelOnMesh, params, prompts: np.ndarray, steps_: int) -> np.ndarray:
  if steps_ not in m.samplers:  # one compiled greedy sampler per model and answer length
    m.samplers[steps_] = jax.jit(lambda p, x: sample_tokens(m.graphdef, p, x, jax.random.key(0), m.cfg, steps=steps_))
  # Replicated weights: no collective inside the decoding loop (see steps.ks_step).
  return np.asarray(m.samplers[steps_](jax.device_put(params, m.rep), jnp.asarray(prompts)))


def accuracy(m: ModelOnMesh, params, world: FactWorld, which: str) -> float:
  tokens, _ = world.statements(world.facts(which))
  out = greedy_answers(m, params, tokens[:, :PROMPT_LEN], world.attr_len)
  return float(np.mean(np.all(out[:, PROMPT_LEN:] == tokens[:, PROMPT_LEN:], axis=1)))


def divergence_to_teacher(t: ModelOnMesh, t_params, s: ModelOnMesh, s_params, world: FactWorld) -> float:
  """Forward KL(T||S) per answer token on the teacher's greedy answers to every known fact."""
  seq = jnp.asarray(greedy_answers(t, t_params, world.prompts(world.facts("all")), world.attr_len))
  t_logits = nnx.merge(t.graphdef, t_params)(seq[:, :-1])[0]
  s_logits = nnx.merge(s.graphdef, s_params)(seq[:, :-1])[0]
  mask = (jnp.arange(seq.shape[1] - 1) >= PROMPT_LEN - 1)[None].repeat(seq.shape[0], 0)
  return float(losses.masked_mean(distill.token_divergence(t_logits, s_logits, "fkl"), mask))


def scores(m: ModelOnMesh, params, world: FactWorld) -> dict:
  new, old = accuracy(m, params, world, "new"), accuracy(m, params, world, "old")
  n_new, n_old = len(world.facts("new")), len(world.facts("old"))
  return {"accuracy": (new * n_new + old * n_old) / (n_new + n_old), "new_accuracy": new, "old_accuracy": old}


# -- stages --------------------------------------------------------------------------------
def train_teacher(cfg: Config, world: FactWorld, t: ModelOnMesh) -> dict:
  """Pretrain on the old facts, then teach one fast-level expert the new facts."""
  trainer = Trainer(cfg, mesh=t.mesh)
  B = cfg.train.batch_size
  old = rng_streams.seed(cfg.seed, "seeding/teacher/old_facts")
  old_batch = lambda i: to_global(dict(zip(("tokens", "loss_mask"), world.batch("old", old, i, B))), t.mesh)
  state = engine.run(stage(cfg, "teacher", "pretrain", abstract_state=trainer.abstract_state, init=trainer.init_state,
                            step=trainer.train_step, batch=old_batch, steps=cfg.train.steps, desc="teacher: old facts"))
  slot = expand.next_free_slot(jax.device_get(state["params"]), t.roles, FAST)
  params = expand.set_expert(state["params"], t.roles, FAST, slot, active=True)
  sc = cfg.seeding
  tx = steps.masked_optimizer(steps.trainable(t.roles, level=FAST, slot=slot), sc.fast_lr, sc.fast_steps)
  shardings, abstract, make = t.train_state(tx, rng_streams.raw_key(cfg.seed, "seeding/fast_expert"))

  new, replay = (rng_streams.seed(cfg.seed, f"seeding/fast_expert/{n}") for n in ("new_facts", "replay"))

  def mixed(i):  # new facts, with old ones replayed so the expert does not disturb them
    new_t, new_m = world.batch("new", new, i, B - B // 2)
    old_t, old_m = world.batch("old", replay, i, B // 2)
    return to_global({"tokens": np.concatenate([new_t, old_t]), "loss_mask": np.concatenate([new_m, old_m])}, t.mesh)

  step = jax.jit(functools.partial(steps.sft_step, t.graphdef, tx), in_shardings=(shardings, shd.batch_sharding(t.mesh)),
                 out_shardings=(shardings, t.rep), donate_argnums=(0,))
  state = engine.run(stage(cfg, "teacher", "fast", abstract_state=abstract, init=lambda: make(params), step=step,
                            batch=mixed, steps=sc.fast_steps, desc="teacher: new facts -> fast expert"))
  return state["params"]


def expand_student(cfg: Config, t: ModelOnMesh, s: ModelOnMesh, teacher_params) -> tuple[dict, float]:
  """Grown student on its own mesh (teacher restored onto it), fast experts reset, new slow
  expert active. Returns (params, max |logits diff| right after growth and activation)."""
  on_student_mesh = jax.device_put(teacher_params, t.on(s.mesh))
  grow = jax.jit(functools.partial(expand.grow_params, small_roles=t.roles, width=cfg.seeding.grow_width),
                 out_shardings=s.shardings)
  grown = grow(on_student_mesh, big_init=s.init(rng_streams.seed(cfg.seed, "seeding/student_init")))
  slow = len(cfg.model.cms.d_ff) - 1
  grown = expand.set_expert(grown, s.roles, slow, expand.next_free_slot(jax.device_get(grown), s.roles, slow), active=True)
  probe = jnp.asarray(_probe_tokens(cfg))
  diff = float(jnp.max(jnp.abs(nnx.merge(s.graphdef, grown)(probe)[0] - nnx.merge(t.graphdef, teacher_params)(probe)[0])))
  return expand.reset_level(grown, s.roles, FAST), diff


def _probe_tokens(cfg: Config) -> np.ndarray:
  world = FactWorld(**cfg.seeding.facts)
  return world.statements(world.facts("all"))[0][:, :-1]


def teacher_samples(cfg: Config, world: FactWorld, t: ModelOnMesh, teacher_params) -> dict[str, np.ndarray]:
  """D: prompts over the facts of `seeding.sample_facts` (every known fact, or only the new
  ones), answers sampled from the teacher (cached on disk)."""
  path = os.path.join(cfg.run_dir, "teacher_samples.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  sc = cfg.seeding
  facts = world.facts(sc.sample_facts)
  prompts = world.prompts(facts[rng_streams.numpy(cfg.seed, "seeding/teacher_samples/prompts").integers(
      0, len(facts), sc.samples)])
  key = rng_streams.key(cfg.seed, "seeding/teacher_samples/answers")
  fn = jax.jit(lambda p, x: sample_tokens(t.graphdef, p, x, key, cfg, steps=world.attr_len,
                                          temperature=sc.sample_temperature))
  tokens = np.asarray(fn(jax.device_put(teacher_params, t.rep), jnp.asarray(prompts))).astype(np.int32)
  mask = np.zeros_like(tokens)
  mask[:, PROMPT_LEN:] = 1
  if jax.process_index() == 0:
    np.savez(path + ".tmp.npz", tokens=tokens, loss_mask=mask)
    os.replace(path + ".tmp.npz", path)
  return {"tokens": tokens, "loss_mask": mask}
