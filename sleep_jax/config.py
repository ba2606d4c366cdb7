"""Typed configs: dataclasses validated by OmegaConf, a YAML file plus dotted overrides.

`load_config("experiments/tiny.yaml", ["train.steps=10"])` returns a `Config` whose fields
are plain Python values. Every error (unknown key, wrong type, malformed YAML, missing file)
is a `ConfigError` carrying one line that names the key; the CLI prints it without a
traceback.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf import errors as oc_errors


class ConfigError(ValueError):
  """A bad config: the message is one line and names the offending key."""


@dataclass
class CMSConfig:
  """Continuum Memory System MLPs (model.kind=cms, paper B): a chain of MLP levels, fast to
  slow, each a base SwiGLU MLP plus a sparse mixture of pre-allocated low-rank experts."""
  d_ff: list[int] = field(default_factory=lambda: [128, 128])  # base MLP width per level (0 = fastest)
  update_every: list[int] = field(default_factory=lambda: [1, 4])  # level l updates every k steps
  experts: int = 4  # pre-allocated expert slots per level (masked until activated)
  rank: int = 8  # r: expert l is A [d, r], B [r, d]
  top_k: int = 0  # experts per token among the active ones (0: every active expert)


@dataclass
class ModelConfig:
  kind: str = "transformer"  # transformer | hybrid | cms
  vocab_size: int = 256
  d_model: int = 128
  n_heads: int = 4
  head_dim: int = 32
  d_ff: int = 512
  n_layers: int = 2  # transformer / cms depth; hybrid depth = len(layer_pattern) * pattern_repeats
  # hybrid: layer i is layer_pattern[i % P]: gdn, attn (evicted as model.eviction says) or
  # attn:none / attn:hard / attn:sliding (an attention layer with its own eviction)
  layer_pattern: list[str] = field(default_factory=lambda: ["attn", "gdn"])
  pattern_repeats: int = 1
  max_len: int = 2048  # RoPE table length
  rope_base: float = 10000.0
  # Attention eviction: none (full causal), hard (KV cache cleared every `sleep.chunk_len`
  # tokens), sliding (the last chunk_len - 1 tokens stay visible).
  eviction: str = "none"
  gdn_conv: int = 4  # short causal convolution width in GDN blocks
  attn_conv: int = 0  # width of a short causal conv before attention's q/k/v (0: none)
  gdn_chunk: int = 64  # chunk size of the chunkwise gated delta rule
  compute_dtype: str = "float32"  # float32 | bfloat16 (params stay float32: master weights)
  remat: bool = True  # rematerialise each layer (and each sleep chunk); sleep passes always are
  scan_layers: bool = True  # stacked parameters + lax.scan over layers
  init_std: float = 0.02
  cms: CMSConfig = field(default_factory=CMSConfig)
  # Every layer's MLP: "swiglu", or "cms" (the chain of CMS levels `cms`, with expert slots),
  # on any layer list (kind hybrid + mlp cms: a GDN/attention hybrid with CMS levels).
  # "": by kind (cms for kind cms, else swiglu).
  mlp: str = ""
  # -- architecture options of real (Hugging Face) models; the defaults are sleep_jax's own --
  n_kv_heads: int = 0  # grouped-query attention: key/value heads (0: n_heads)
  qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3)
  qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2.5)
  attn_out_gate: bool = False  # attention output * sigmoid(x W_gate), per head (Qwen3-Next / Qwen3.5)
  rope_fraction: float = 1.0  # share of head_dim that is rotated (partial rotary, Qwen3.5: 0.25)
  rope_scaling: dict[str, Any] = field(default_factory=dict)  # {} or Llama 3's {"rope_type": "llama3", ...}
  tie_embeddings: bool = False  # logits from the embedding table (no separate unembed)
  norm_eps: float = 1e-6
  norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + w): 1.0 for Qwen3.5's zero-centred norms
  gdn_k_heads: int = 0  # GDN query/key heads (0: n_heads)
  gdn_v_heads: int = 0  # GDN value heads, a multiple of gdn_k_heads (0: gdn_k_heads)
  gdn_k_dim: int = 0  # GDN query/key head size (0: head_dim)
  gdn_v_dim: int = 0  # GDN value head size (0: head_dim)
  gdn_q_scale: bool = False  # queries scaled by gdn_k_dim^-0.5 after the L2 norm (FLA / transformers)
  init_from: Optional[str] = None  # a Hugging Face checkpoint directory to start from (sleep_jax.hf.load)
  hf_arch: str = ""  # the registry architecture an imported model came from (export writes it back)


@dataclass
class SleepConfig:
  passes: int = 1  # N: passes of the whole stack over each consolidation chunk
  chunk_len: int = 32  # L: chunk length (and KV-cache bound)
  truncate_passes: int = 0  # >0: back-propagate through the last K passes only
  adaptive_tol: float = 0.0  # >0 (inference): stop sleeping once |dS|/|S| < tol
  warmup_gdn_steps: int = 0  # sliding-window recipe: train only GDN layers, hard eviction
  single_pass_steps: int = 0  # depth curriculum: the first steps train at N = 1, then at `passes`
  # [start, end): the passes loop only these layers (paper A's Jet-Nemotron recipe); the layers
  # before run once, the layers after once on the last pass's features. []: the whole stack.
  layers: list[int] = field(default_factory=list)
  # Which chunks consolidate (run passes 2..N before eviction): "masked" = a chunk whose
  # targets are all masked (the task layouts: read chunks, then a prediction chunk);
  # "every_chunk" = every chunk (text: each chunk is predicted in pass 1, then slept on).
  # A batch may also carry the schedule as data: a "consolidate" key [B, n_chunks].
  schedule: str = "masked"


@dataclass
class CorpusConfig:
  """One text source of data.source=corpus (see sleep_jax/data/corpus.py)."""
  path: str = ""  # a file or directory (text, jsonl), a prepared TFDS dataset dir (tfds), a stdlib subdir or ""
  format: str = "text"  # text | jsonl | tfds | stdlib (the Python standard library's own .py sources)
  field: str = "text"  # jsonl / tfds: the feature holding each document's text
  weight: float = 1.0  # share of the train mixture (normalised over data.corpora)
  name: str = ""  # label in logs and dataset names ("": from the path)
  split: str = "train"  # tfds: the TFDS split read (train/eval are then split by document)
  separator: str = ""  # text: documents end at this string ("": one document per file)


@dataclass
class DataConfig:
  source: str = "task"  # task | text (byte windows of one file) | corpus (tokenized, packed, mixed)
  task: str = "rule110"
  task_options: dict[str, Any] = field(default_factory=dict)
  seed: int = 0  # seed that generates the task dataset (the top-level seed only reshuffles it)
  eval_task_options: dict[str, Any] = field(default_factory=dict)  # overrides for eval split
  text_path: Optional[str] = None  # plain-text corpus for source=text
  seq_len: int = 128  # tokens per example (examples are padded/cropped to this)
  data_dir: str = "~/.cache/sleep_jax/datasets"
  train_examples: int = 20000
  eval_examples: int = 1000
  prefetch: int = 2  # batches prepared ahead by grain worker threads
  # -- source=corpus: documents tokenized in grain workers, packed into seq_len windows with
  # positions / segment ids, cached as array_record, mixed by weight --
  corpora: list[CorpusConfig] = field(default_factory=list)
  tokenizer: str = "bytes"  # bytes (vocab 256) | tokenizer.json | SentencePiece .model | a tokenizer dir
  train_tokenizer_vocab: int = 0  # >0: train a byte-level BPE of this size on the train documents if absent
  eval_fraction: float = 0.02  # share of documents (by hash) held out for eval
  pack: bool = True  # concat-then-split documents into windows (False: each window holds one document)
  tokenize_threads: int = 2  # grain worker threads that read and tokenize documents on the first pass


@dataclass
class TrainConfig:
  steps: int = 100
  batch_size: int = 32  # global batch (examples per optimizer step)
  grad_accum: int = 1  # micro-batches per step
  lr: float = 3e-3
  warmup_steps: int = 10
  min_lr_ratio: float = 0.1  # cosine decay floor
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.95
  clip_norm: float = 1.0
  log_every: int = 1
  eval_every: int = 0  # 0: only at the end
  eval_batches: int = 4
  # Chunked loss (ops/chunked_ce.py): positions per chunk of the head's logits, so no float32
  # [B, T, V] is ever materialised; 0: the plain loss; -1: chunked iff vocab_size >= 32768,
  # with chunks of about 2^23 / vocab_size positions (train.loss_chunk_for).
  loss_chunk: int = -1
  # [start, stop]: a jax.profiler trace of steps start..stop into run_dir/profile ([]: off).
  profile_steps: list[int] = field(default_factory=list)
  # Peak FLOP/s of one device for the logged MFU; 0: a table of known accelerators by
  # device kind, or on CPU a jnp.dot timed once at the start (loop_stats.py).
  peak_flops_per_device: float = 0.0


@dataclass
class MeshConfig:
  data: int = -1  # -1 fills the remaining devices
  fsdp: int = 1
  tensor: int = 1


@dataclass
class CheckpointConfig:
  every: int = 50
  keep: int = 3
  async_save: bool = True


@dataclass
class SeedingConfig:
  """Knowledge seeding (`sleep-jax seed`, paper B): teacher -> expand -> consolidate -> evaluate.

  The teacher (the `model` section, trained with `train.*` on the old facts) learns the new
  facts in one fast-level expert; the student is the teacher grown (width x grow_width,
  + grow_layers layers) onto `student_mesh`, with the fast experts reset and one new
  slow-level expert; consolidation trains only that expert (L_KS) from the teacher."""
  facts: dict[str, Any] = field(default_factory=dict)  # FactWorld options (data/facts.py)
  fast_steps: int = 300  # the teacher's fast expert learns the new facts
  fast_lr: float = 1.0e-2
  grow_width: int = 2  # student d_model, n_heads, d_ff = teacher's x this
  grow_layers: int = 1  # identity layers appended to the student
  student_mesh: MeshConfig = field(default_factory=lambda: MeshConfig(data=1, fsdp=-1, tensor=1))
  methods: list[str] = field(default_factory=lambda: ["teacher", "ks"])  # see seeding/methods.py
  steps: int = 300  # consolidation steps per method
  lr: float = 3.0e-3
  batch_size: int = 32  # prompts per consolidation step
  samples: int = 2048  # teacher-sampled dataset D
  # which facts D's prompts ask about: all (every fact the teacher knows, old ones rehearsed)
  # or new (only the pending fast-level update's facts: consolidation then sees nothing old,
  # which is what parameter expansion protects)
  sample_facts: str = "all"
  sample_temperature: float = 1.0
  lam: float = 0.5  # lambda: share of the distillation loss on student-generated sequences
  # lambda ramps linearly from 0 to `lam` over this many steps (ks, no_imitation, no_expansion):
  # a student that knows none of the new facts samples wrong answers, so its own samples
  # carry little signal until off-policy distillation has taught it something. 0: constant.
  lam_warmup: int = 0
  experts: int = 1  # slow-level expert slots the student activates and trains (capacity; B = 0 each)
  # random: the experts' input projections A as initialised; mlp: A copies gate columns of the
  # level's own MLP (keys the layer already computes; exact, B = 0): see expand.init_experts_from_mlp
  expert_init: str = "random"
  # the trained experts' router bias at the start of consolidation: gate sigmoid(router_bias)
  # on every token (0: half open). Exact for any value (B = 0); see expand.set_router_bias
  router_bias: float = 0.0
  alpha: float = 0.5  # L_KS weight of the divergence (1 - alpha: imitation reward)
  divergence: str = "fkl"  # fkl | rkl | jsd (jsd saturates when teacher and student disagree)
  jsd_beta: float = 0.5
  temperature: float = 1.0  # distillation softmax temperature
  gamma: float = 0.5  # reward = gamma * r_sem + (1 - gamma) * r_abs
  z0: int = 2  # r_abs = 0 beyond this Levenshtein distance
  judge_margin: float = 0.5  # r_sem: teacher log-prob per token within this of the dream's
  group_size: int = 4  # GRPO completions per prefix
  clip_eps: float = 0.2
  kl_coef: float = 0.02  # GRPO KL to the reference (the student before consolidation)
  eval_every: int = 100
  # The whole pipeline (teacher, growth, samples, every method) once per seed: seed s runs
  # with `seed` + s in RUN_DIR/seed<s>/, and results report each method's mean and spread.
  seeds: int = 1


@dataclass
class DreamingConfig:
  """Dreaming and continual learning (`sleep-jax dream`, paper B). A CMS base model (the
  `model` section, `train.*`) learns closed-book QA on old facts and reading (restating a
  passage's facts as QA); then each day's passage is read and evicted, and every method in
  `methods` updates its own copy of the model (see dreaming/harness.py)."""
  world: dict[str, Any] = field(default_factory=dict)  # DayWorld options (data/days.py)
  methods: list[str] = field(default_factory=lambda: ["base", "finetune", "dream", "sleep"])
  dreams: int = 16  # m dreams sampled per day (and per round)
  dream_temperature: float = 1.0
  novelty_expert: bool = True  # each router also activates one random expert while dreaming
  top_k: int = 6  # keep the k dreams with the largest SFT-gradient norm ...
  random_extra: int = 2  # ... plus b random others
  lora_rank: int = 8
  lora_alpha: float = 16.0
  copy_steps: int = 20  # LoRA SFT steps of each isolated copy
  copy_lr: float = 1.0e-2
  rounds: int = 2  # ReST-EM rounds
  # The generator's LoRA (what ReST-EM trains) and its Adam state: "per_day" starts both
  # fresh every day (the same init as day 0), so a night's ReST-EM rounds train it on that
  # day's passage only; "carried" keeps them across days (trained on earlier days' passages
  # too, it dreams worse on later days: search log, session 7).
  generator: str = "per_day"
  rest_steps: int = 20  # generator fine-tuning steps per round, on rewarded dreams
  rest_lr: float = 3.0e-3
  write_steps: int = 100  # steps of the day's knowledge write (finetune, dream, sleep)
  write_lr: float = 3.0e-3
  write_batch: int = 0  # texts per write step, drawn by loss weight (0: every text, every step)
  replay: int = 16  # closed-book texts the model writes unprompted, rehearsed during a write (0: off)
  reading_replay: bool = True  # a write also rehearses the night's dreams in context (keeps reading intact)
  # Dream memory (dream and sleep): after each night, up to `memory` of its closed-book
  # dreams with weight > 0 (sleep: rewarded) are kept in the method's per-day state (picked to
  # cover as many distinct entity-relation pairs as possible); every later write rehearses
  # them with the model's current greedy beliefs as targets, so what earlier nights taught
  # stays the target (the evicted passage is never kept). 0: off.
  memory: int = 16
  write_targets: str = "attributes"  # closed-book write targets: "attributes" or whole "statements"
  rotate: bool = True  # a write sees each text in every cyclic order of its statements (dreams.rotations)
  finetune_lr: float = 1.0e-3  # the finetune baseline trains every weight: a smaller step
  # Every method lives through the days once per dreaming seed (the base model is trained
  # once, with `seed`); results report the mean and spread over seeds. Seed s draws its
  # dreams, selections and replay from its own stream (rng_streams: "dreaming/seed<s>").
  seeds: int = 1


@dataclass
class DistributedConfig:
  # Multi-host: "auto" initialises jax.distributed when the environment names a cluster
  # (SLURM, TPU pod, or SLEEP_JAX_COORDINATOR); "off" never does.
  mode: str = "auto"
  coordinator: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None


def _default_rules() -> list[list[Any]]:
  # Logical parameter / activation axes -> mesh axes (MaxText style).
  return [
      ["batch", ["data", "fsdp"]],
      ["embed", "fsdp"],
      ["vocab", "tensor"],
      ["heads", "tensor"],
      ["mlp", "tensor"],
      ["kv", None],
      ["layers", None],
      ["seq", None],
  ]


@dataclass
class Config:
  run_dir: str = "runs/default"
  seed: int = 0
  model: ModelConfig = field(default_factory=ModelConfig)
  sleep: SleepConfig = field(default_factory=SleepConfig)
  data: DataConfig = field(default_factory=DataConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  mesh: MeshConfig = field(default_factory=MeshConfig)
  checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
  seeding: SeedingConfig = field(default_factory=SeedingConfig)
  dreaming: DreamingConfig = field(default_factory=DreamingConfig)
  distributed: DistributedConfig = field(default_factory=DistributedConfig)
  logical_axis_rules: list[Any] = field(default_factory=_default_rules)


_CHOICES = {
    "model.kind": ("transformer", "hybrid", "cms"),
    "seeding.divergence": ("fkl", "rkl", "jsd"),
    "model.eviction": ("none", "hard", "sliding"),
    "model.mlp": ("", "swiglu", "cms"),
    "sleep.schedule": ("masked", "every_chunk"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "data.source": ("task", "text", "corpus"),
    "distributed.mode": ("auto", "on", "off"),
}


def _one_line(err: Exception) -> str:
  if isinstance(err, oc_errors.OmegaConfBaseException):
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).strip().splitlines()[0]
    if isinstance(err, (oc_errors.ConfigAttributeError, oc_errors.ConfigKeyError)):
      return f"unknown config key '{key}'"
    return f"bad value for config key '{key}': {msg}"
  return str(err).splitlines()[0]


def _validate(cfg: Config) -> None:
  for key, allowed in _CHOICES.items():
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if value not in allowed:
      raise ConfigError(f"bad value for config key '{key}': {value!r} not in {allowed}")
  mixers = ("attn", "attn:none", "attn:hard", "attn:sliding", "gdn")
  for p in cfg.model.layer_pattern:
    if p not in mixers:
      raise ConfigError(f"bad value for config key 'model.layer_pattern': {p!r} not in {mixers}")
  if cfg.model.kind == "hybrid" and not cfg.model.layer_pattern:
    raise ConfigError("bad value for config key 'model.layer_pattern': a hybrid model needs at least one layer")
  mc = cfg.model
  if mc.kind == "cms" and mc.mlp == "swiglu":
    raise ConfigError("bad value for config key 'model.mlp': model.kind=cms has CMS MLPs (use kind transformer "
                      "for SwiGLU MLPs)")
  n_layers = mc.n_layers if mc.kind in ("transformer", "cms") else len(mc.layer_pattern) * mc.pattern_repeats
  if cfg.sleep.layers:
    lr = cfg.sleep.layers
    if len(lr) != 2 or not 0 <= lr[0] < lr[1] <= n_layers:
      raise ConfigError(f"bad value for config key 'sleep.layers': {list(lr)} must be [start, end) with "
                        f"0 <= start < end <= {n_layers} (the model's layers)")
  for key, value, divides in (("model.n_kv_heads", mc.n_kv_heads, mc.n_heads),
                              ("model.gdn_v_heads", mc.gdn_v_heads, None)):
    if value < 0 or (value and divides and divides % value):
      raise ConfigError(f"bad value for config key '{key}': {value} must be 0 or divide model.n_heads={divides}")
  hk = mc.gdn_k_heads or mc.n_heads
  if mc.gdn_v_heads and mc.gdn_v_heads % hk:
    raise ConfigError(f"bad value for config key 'model.gdn_v_heads': {mc.gdn_v_heads} must be a multiple of "
                      f"the GDN key heads ({hk})")
  if not 0.0 < mc.rope_fraction <= 1.0:
    raise ConfigError(f"bad value for config key 'model.rope_fraction': {mc.rope_fraction} must be in (0, 1]")
  positive = {"sleep.passes": cfg.sleep.passes, "sleep.chunk_len": cfg.sleep.chunk_len,
              "train.batch_size": cfg.train.batch_size, "train.grad_accum": cfg.train.grad_accum,
              "data.seq_len": cfg.data.seq_len, "checkpoint.every": cfg.checkpoint.every,
              "checkpoint.keep": cfg.checkpoint.keep, "model.d_model": cfg.model.d_model,
              "model.n_heads": cfg.model.n_heads, "model.head_dim": cfg.model.head_dim,
              "model.vocab_size": cfg.model.vocab_size}
  for key, value in positive.items():
    if value < 1:
      raise ConfigError(f"bad value for config key '{key}': {value} must be >= 1")
  if cfg.model.attn_conv < 0 or cfg.model.attn_conv > cfg.sleep.chunk_len:
    raise ConfigError(f"bad value for config key 'model.attn_conv': {cfg.model.attn_conv} must be in "
                      f"[0, sleep.chunk_len={cfg.sleep.chunk_len}]")
  cms = cfg.model.cms
  if len(cms.update_every) != len(cms.d_ff) or min(cms.update_every, default=1) < 1 or not cms.d_ff:
    raise ConfigError("bad value for config key 'model.cms.update_every': one positive entry per model.cms.d_ff level")
  if cfg.seeding.grow_width < 1 or cfg.seeding.grow_layers < 0:
    raise ConfigError("bad value for config key 'seeding.grow_width': width factor >= 1, grow_layers >= 0")
  if cfg.train.steps < 0:
    raise ConfigError(f"bad value for config key 'train.steps': {cfg.train.steps} must be >= 0")
  if cfg.train.batch_size % cfg.train.grad_accum:
    raise ConfigError("bad value for config key 'train.grad_accum': must divide train.batch_size")
  ps = cfg.train.profile_steps
  if ps and (len(ps) != 2 or not 1 <= ps[0] <= ps[1]):
    raise ConfigError(f"bad value for config key 'train.profile_steps': {list(ps)} must be [] or [start, stop] "
                      "with 1 <= start <= stop (steps as logged)")
  for key in ("data", "fsdp", "tensor"):
    v = getattr(cfg.mesh, key)
    if v == 0 or v < -1:
      raise ConfigError(f"bad value for config key 'mesh.{key}': {v} (use a positive size or -1)")
  _check_corpora(cfg.data)
  _check_ranges(cfg)


CORPUS_FORMATS = ("text", "jsonl", "tfds", "stdlib")


def _check_corpora(d: DataConfig) -> None:
  if d.source == "corpus" and not d.corpora:
    raise ConfigError("bad value for config key 'data.corpora': data.source=corpus needs at least one corpus")
  for i, c in enumerate(d.corpora):
    key = f"data.corpora[{i}]"
    if c.format not in CORPUS_FORMATS:
      raise ConfigError(f"bad value for config key '{key}.format': {c.format!r} not in {CORPUS_FORMATS}")
    if not c.weight > 0 or c.weight == float("inf"):
      raise ConfigError(f"bad value for config key '{key}.weight': {c.weight} (mixture weights must be positive)")
    if c.format != "stdlib" and not c.path:
      raise ConfigError(f"bad value for config key '{key}.path': not set (format {c.format} reads a path)")
  if not 0 < d.eval_fraction < 1:
    raise ConfigError(f"bad value for config key 'data.eval_fraction': {d.eval_fraction} must be in (0, 1)")


def _ranges(cfg: Config) -> list[tuple[str, Any, Optional[float], Optional[float], bool]]:
  """(key, value, low, high, high is exclusive): numeric options and the values that mean something."""
  m, t, sl, d, sd, dr = cfg.model, cfg.train, cfg.sleep, cfg.data, cfg.seeding, cfg.dreaming
  inf = None
  return [
      ("seed", cfg.seed, 0, inf, False), ("data.seed", d.seed, 0, inf, False),
      ("model.vocab_size", m.vocab_size, 2, inf, False), ("model.n_heads", m.n_heads, 1, inf, False),
      ("model.head_dim", m.head_dim, 1, inf, False), ("model.d_ff", m.d_ff, 1, inf, False),
      ("model.n_layers", m.n_layers, 1, inf, False), ("model.pattern_repeats", m.pattern_repeats, 1, inf, False),
      ("model.max_len", m.max_len, 1, inf, False), ("model.gdn_conv", m.gdn_conv, 1, inf, False),
      ("model.gdn_chunk", m.gdn_chunk, 1, inf, False), ("model.init_std", m.init_std, 0, inf, False),
      ("model.cms.experts", m.cms.experts, 0, inf, False), ("model.cms.rank", m.cms.rank, 1, inf, False),
      ("model.cms.top_k", m.cms.top_k, 0, inf, False),
      ("sleep.truncate_passes", sl.truncate_passes, 0, inf, False), ("sleep.adaptive_tol", sl.adaptive_tol, 0, inf, False),
      ("sleep.warmup_gdn_steps", sl.warmup_gdn_steps, 0, inf, False),
      ("sleep.single_pass_steps", sl.single_pass_steps, 0, inf, False),
      ("data.train_examples", d.train_examples, 1, inf, False), ("data.eval_examples", d.eval_examples, 1, inf, False),
      ("data.prefetch", d.prefetch, 0, inf, False),
      ("data.train_tokenizer_vocab", d.train_tokenizer_vocab, 0, inf, False),
      ("data.tokenize_threads", d.tokenize_threads, 0, inf, False),
      ("train.lr", t.lr, 0, inf, False), ("train.warmup_steps", t.warmup_steps, 0, inf, False),
      ("train.min_lr_ratio", t.min_lr_ratio, 0, 1, False), ("train.weight_decay", t.weight_decay, 0, inf, False),
      ("train.b1", t.b1, 0, 1, True), ("train.b2", t.b2, 0, 1, True), ("train.clip_norm", t.clip_norm, 0, inf, False),
      ("train.log_every", t.log_every, 1, inf, False), ("train.eval_every", t.eval_every, 0, inf, False),
      ("train.eval_batches", t.eval_batches, 1, inf, False), ("train.loss_chunk", t.loss_chunk, -1, inf, False),
      ("train.peak_flops_per_device", t.peak_flops_per_device, 0, inf, False),
      ("seeding.fast_steps", sd.fast_steps, 0, inf, False), ("seeding.fast_lr", sd.fast_lr, 0, inf, False),
      ("seeding.steps", sd.steps, 0, inf, False), ("seeding.lr", sd.lr, 0, inf, False),
      ("seeding.batch_size", sd.batch_size, 1, inf, False), ("seeding.samples", sd.samples, 1, inf, False),
      ("seeding.sample_temperature", sd.sample_temperature, 0, inf, False), ("seeding.lam", sd.lam, 0, 1, False),
      ("seeding.alpha", sd.alpha, 0, 1, False), ("seeding.jsd_beta", sd.jsd_beta, 0, 1, False),
      ("seeding.temperature", sd.temperature, 0, inf, False), ("seeding.gamma", sd.gamma, 0, 1, False),
      ("seeding.z0", sd.z0, 0, inf, False), ("seeding.group_size", sd.group_size, 1, inf, False),
      ("seeding.clip_eps", sd.clip_eps, 0, inf, False), ("seeding.kl_coef", sd.kl_coef, 0, inf, False),
      ("seeding.eval_every", sd.eval_every, 0, inf, False),
      ("dreaming.dreams", dr.dreams, 1, inf, False), ("dreaming.dream_temperature", dr.dream_temperature, 0, inf, False),
      ("dreaming.random_extra", dr.random_extra, 0, inf, False), ("dreaming.lora_rank", dr.lora_rank, 1, inf, False),
      ("dreaming.copy_steps", dr.copy_steps, 0, inf, False), ("dreaming.copy_lr", dr.copy_lr, 0, inf, False),
      ("dreaming.rounds", dr.rounds, 0, inf, False), ("dreaming.rest_steps", dr.rest_steps, 0, inf, False),
      ("dreaming.rest_lr", dr.rest_lr, 0, inf, False), ("dreaming.write_steps", dr.write_steps, 0, inf, False),
      ("dreaming.write_lr", dr.write_lr, 0, inf, False), ("dreaming.write_batch", dr.write_batch, 0, inf, False),
      ("dreaming.replay", dr.replay, 0, inf, False), ("dreaming.finetune_lr", dr.finetune_lr, 0, inf, False),
  ]


def _check_ranges(cfg: Config) -> None:
  if not cfg.model.layer_pattern:
    raise ConfigError("bad value for config key 'model.layer_pattern': needs at least one layer")
  if cfg.model.rope_base <= 0:
    raise ConfigError(f"bad value for config key 'model.rope_base': {cfg.model.rope_base} must be > 0")
  for p in ("num_processes", "process_id"):
    v = getattr(cfg.distributed, p)
    if v is not None and v < (1 if p == "num_processes" else 0):
      raise ConfigError(f"bad value for config key 'distributed.{p}': {v}")
  for key, value, low, high, open_high in _ranges(cfg):
    if value != value:  # NaN
      raise ConfigError(f"bad value for config key '{key}': nan")
    if low is not None and value < low:
      raise ConfigError(f"bad value for config key '{key}': {value} must be >= {low}")
    if high is not None and (value >= high if open_high else value > high):
      raise ConfigError(f"bad value for config key '{key}': {value} must be {'<' if open_high else '<='} {high}")


def read_yaml_mapping(path: str, what: str, error: type[ConfigError] = ConfigError) -> dict:
  """A YAML file whose top level is a mapping; `error` (one line) if missing or malformed."""
  if not os.path.exists(path):
    raise error(f"{what} file not found: {path}")
  if os.path.isdir(path):
    raise error(f"{what} {path} is a directory, not a YAML file")
  try:
    with open(path, encoding="utf-8") as f:
      raw = yaml.safe_load(f) or {}
  except UnicodeDecodeError:
    raise error(f"{what} file {path} is not UTF-8 text (a binary file?)") from None
  except OSError as e:
    raise error(f"cannot read {what} file {path}: {e.strerror or e}") from None
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1})" if mark is not None else ""
    raise error(f"malformed YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
  if not isinstance(raw, dict):
    raise error(f"malformed {what} {path}: top level must be a mapping")
  return raw


def _check_corpus_keys(raw: Any) -> None:
  # OmegaConf names an unknown key inside a list element without its path ('wieght');
  # a corpus list is where such typos happen, so name the whole key here.
  corpora = (raw.get("data") or {}).get("corpora") if isinstance(raw, dict) and isinstance(raw.get("data"), dict) else None
  known = {f.name for f in dataclasses.fields(CorpusConfig)}
  for i, c in enumerate(corpora if isinstance(corpora, list) else []):
    if not isinstance(c, dict):
      raise ConfigError(f"bad value for config key 'data.corpora[{i}]': expected a mapping like {{path: ..., format: ...}}")
    for k in c:
      if k not in known:
        raise ConfigError(f"unknown config key 'data.corpora[{i}].{k}'")


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
  """YAML file (optional) + `key=value` overrides -> validated `Config`."""
  schema = OmegaConf.structured(Config)
  try:
    merged = schema
    if path is not None:
      raw = read_yaml_mapping(path, "config")
      _check_corpus_keys(raw)
      merged = OmegaConf.merge(merged, OmegaConf.create(raw))
    for item in overrides:
      if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    if overrides:
      dots = OmegaConf.from_dotlist(list(overrides))
      _check_corpus_keys(OmegaConf.to_container(dots))
      merged = OmegaConf.merge(merged, dots)
    cfg = OmegaConf.to_object(merged)
    if cfg.model.init_from:  # the checkpoint decides the architecture; the run the rest
      from sleep_jax.hf.registry import resolve_init_from
      from sleep_jax.hf.safetensors_io import HFError

      try:
        cfg = dataclasses.replace(cfg, model=resolve_init_from(cfg.model))
      except HFError as e:
        raise ConfigError(f"bad value for config key 'model.init_from': {e}") from None
  except ConfigError:
    raise
  except (oc_errors.OmegaConfBaseException, yaml.YAMLError) as e:
    raise ConfigError(_one_line(e)) from None
  _validate(cfg)
  return cfg


def to_yaml(cfg: Config) -> str:
  return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
  return dataclasses.asdict(cfg)


def diff(a: Config, b: Config, prefix: str = "") -> list[str]:
  """Dotted keys whose values differ between two configs (run_dir excluded by callers)."""
  da, db = OmegaConf.to_container(OmegaConf.structured(a)), OmegaConf.to_container(OmegaConf.structured(b))
  out: list[str] = []

  def walk(x, y, p):
    if isinstance(x, dict) and isinstance(y, dict):
      for k in sorted(set(x) | set(y)):
        walk(x.get(k), y.get(k), f"{p}{k}.")
    elif x != y:
      out.append(f"{p[:-1]}: {x!r} -> {y!r}")

  walk(da, db, prefix)
  return out
