"""The knowledge-seeding methods compared in experiments/results/knowledge_seeding.json.

Every method starts from the same grown student (fast experts reset, so it has lost the new
facts) and trains for `seeding.steps` steps on the same teacher-sampled data D. "New
expert(s)": the `seeding.experts` slow-level slots the student activates (B = 0, so exact):

  teacher       the teacher itself (old facts in its weights, new facts in its fast expert)
  expanded      the grown student before consolidation (no training)
  sft           cross-entropy on the teacher's samples D (off-policy, hard labels), new expert(s)
  opd           on-policy distillation alone: lambda = 1, alpha = 1, new expert
  ks            Knowledge Seeding: lambda = seeding.lam (ramped over seeding.lam_warmup steps),
                alpha = seeding.alpha (imitation RL on), new expert(s)
  no_imitation  ablation: ks with alpha = 1 (no Learning-to-Imitate term)
  no_expansion  ablation: ks objective, no new expert: the slow level's existing MLP trains
"""

from __future__ import annotations

from sleep_jax.config import ConfigError, SeedingConfig

METHODS = ("teacher", "expanded", "sft", "opd", "ks", "no_imitation", "no_expansion")


def method_spec(name: str, sc: SeedingConfig) -> dict:
  """kind (none | sft | ks), lam, alpha, and what trains (expert | slow_mlp | nothing)."""
  specs = {
      "teacher": dict(kind="none", train="nothing"),
      "expanded": dict(kind="none", train="nothing"),
      "sft": dict(kind="sft", lam=0.0, alpha=1.0, train="expert"),
      "opd": dict(kind="ks", lam=1.0, alpha=1.0, train="expert"),
      "ks": dict(kind="ks", lam=sc.lam, alpha=sc.alpha, lam_warmup=sc.lam_warmup, train="expert"),
      "no_imitation": dict(kind="ks", lam=sc.lam, alpha=1.0, lam_warmup=sc.lam_warmup, train="expert"),
      "no_expansion": dict(kind="ks", lam=sc.lam, alpha=sc.alpha, lam_warmup=sc.lam_warmup, train="slow_mlp"),
  }
  if name not in specs:
    raise ConfigError(f"bad value for config key 'seeding.methods': unknown method {name!r} (known: {', '.join(METHODS)})")
  return specs[name]


def check_methods(sc: SeedingConfig) -> None:
  for name in sc.methods:
    method_spec(name, sc)
  if not 0.0 <= sc.lam <= 1.0 or not 0.0 <= sc.alpha <= 1.0 or not 0.0 <= sc.gamma <= 1.0:
    raise ConfigError("bad value for config key 'seeding.lam': lam, alpha and gamma must lie in [0, 1]")
  if sc.seeds < 1:
    raise ConfigError("bad value for config key 'seeding.seeds': need at least 1")
  if sc.lam_warmup < 0:
    raise ConfigError("bad value for config key 'seeding.lam_warmup': must be >= 0 (steps)")
  if sc.expert_init not in ("random", "mlp"):
    raise ConfigError(f"bad value for config key 'seeding.expert_init': {sc.expert_init!r} (use random or mlp)")
  if sc.sample_facts not in ("all", "new"):
    raise ConfigError(f"bad value for config key 'seeding.sample_facts': {sc.sample_facts!r} (use all or new)")
  if sc.experts < 1:
    raise ConfigError("bad value for config key 'seeding.experts': need at least 1")
  if sc.group_size < 2 or sc.batch_size % sc.group_size:
    raise ConfigError("bad value for config key 'seeding.group_size': >= 2 and must divide seeding.batch_size")
