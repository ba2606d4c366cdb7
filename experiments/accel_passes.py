"""Sleep passes at an accelerator's budget: one (config, N) point, no TFDS/grain needed.

The CPU sweeps (experiments/results/sleep_passes*) train ~160k examples per point. On a GPU
the same tiny hybrid runs far more steps, so this trains one point of a sweep for a wall-time
budget with the project's own Trainer, on batches drawn from a pool of `tasks.generate`
examples (the task's own train/eval split by hash), and evaluates exact match on held-out
examples. It imports no data pipeline (the accelerator image has JAX, flax, optax and orbax,
not TFDS or grain), so only omegaconf must travel with it.

  python experiments/accel_passes.py experiments/khop_cpu.yaml --passes 3 --minutes 6 \
      --batch 256 --out runs/accel/khop_n3.json [key=value ...]
  python experiments/accel_passes.py --collect runs/accel experiments/results/sleep_passes_accel

--collect turns the points' json files into the sweep's rows (task, difficulty, passes,
accuracy, eval_examples, train_tokens, wall_s; transformers as labelled baselines) and
writes PREFIX.json, PREFIX.md and PREFIX.png with the sweep's own table and plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# sleep_jax.data's __init__ imports the TFDS builders; the task generators need only numpy.
_data = types.ModuleType("sleep_jax.data")
_data.__path__ = [os.path.join(REPO, "sleep_jax", "data")]
sys.modules.setdefault("sleep_jax.data", _data)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sleep_jax import sharding as shd  # noqa: E402
from sleep_jax.config import load_config  # noqa: E402
from sleep_jax.data import tasks  # noqa: E402
from sleep_jax.train import Trainer  # noqa: E402


def pool(cfg, split: str, n: int, options: dict) -> dict[str, np.ndarray]:
  exs = [tasks.generate(cfg.data.task, split, i, cfg.data.seed, options) for i in range(n)]
  T = cfg.data.seq_len
  tokens = np.zeros((n, T), np.int32)
  mask = np.zeros((n, T), np.int32)
  for i, ex in enumerate(exs):
    tokens[i, :len(ex["tokens"])] = ex["tokens"]
    mask[i, :len(ex["loss_mask"])] = ex["loss_mask"]
  return {"tokens": tokens, "loss_mask": mask}


def collect(src: str, prefix: str, at_step: int = 5000) -> list[dict]:
  """Final rows (equal wall time) -> PREFIX.*, and rows at `at_step` from the eval curves
  (equal training examples) -> PREFIX_at<step>.json, its table appended to PREFIX.md."""
  from sleep_jax import sweep_results

  rows, early = [], []
  for name in sorted(os.listdir(src)):
    if not name.endswith(".json"):
      continue
    with open(os.path.join(src, name)) as f:
      r = json.load(f)
    cfg = load_config(r["config"], r["overrides"] + [f"sleep.passes={r['passes']}"])
    hybrid = cfg.model.kind == "hybrid"
    rows.append({
        "point": name[:-5], "task": cfg.data.task,
        "label": None if hybrid else {"none": "full-attention", "hard": "hard-eviction"}[cfg.model.eviction],
        "difficulty": int(cfg.data.task_options["hops"]), "passes": r["passes"] if hybrid else 1,
        "accuracy": r["accuracy"], "eval_examples": r["eval_examples"], "seed": cfg.seed, "steps": r["steps"],
        "train_tokens": r["steps"] * r["batch"] * (cfg.data.seq_len - 1), "wall_s": r["train_wall_s"],
        "device": r["device"]})
    at = [c for c in r["curve"] if c["step"] == at_step]
    if at:
      early.append({**rows[-1], "accuracy": at[0]["eval_acc"], "steps": at_step, "wall_s": at[0]["wall_s"],
                    "train_tokens": at_step * r["batch"] * (cfg.data.seq_len - 1)})
  sweep_results.write_json(prefix + ".json", rows)
  sweep_results.write_json(f"{prefix}_at{at_step}.json", early)
  title = "Sleep passes on an H100 at the CPU-scale k-hop setting: exact-match accuracy (%)"
  with open(prefix + ".md", "w") as f:
    f.write(sweep_results.markdown_table(rows, ["seed"], title=title + ", after an equal wall time"))
    f.write("\n" + sweep_results.markdown_table(early, ["seed"], title=title + f", after {at_step} steps each"))
  sweep_results.plot_accuracy(rows, ["seed"], prefix + ".png", title="k-hop (8 nodes, 2 evicted chunks), H100 budget")
  return rows


def main(argv=None):
  if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--collect":
    collect(sys.argv[2], sys.argv[3])
    return
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("config")
  p.add_argument("overrides", nargs="*")
  p.add_argument("--passes", type=int, required=True)
  p.add_argument("--minutes", type=float, default=5.0, help="training wall-time budget")
  p.add_argument("--max_steps", type=int, default=10**9)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--train_pool", type=int, default=200_000)
  p.add_argument("--eval_examples", type=int, default=2048)
  p.add_argument("--eval_every", type=int, default=2000)
  p.add_argument("--out", required=True)
  a = p.parse_intermixed_args(argv)  # key=value overrides may come after options

  cfg = load_config(a.config, a.overrides + [f"sleep.passes={a.passes}", f"train.batch_size={a.batch}",
                                              f"train.steps={a.max_steps if a.max_steps < 10**9 else 10**6}",
                                              "mesh.data=1"])
  t0 = time.time()
  train = pool(cfg, "train", a.train_pool, dict(cfg.data.task_options))
  ev = pool(cfg, "eval", a.eval_examples, {**dict(cfg.data.task_options), **dict(cfg.data.eval_task_options)})
  print(f"pools: {a.train_pool} train, {a.eval_examples} eval in {time.time() - t0:.0f}s", flush=True)
  trainer = Trainer(cfg)
  state = trainer.init_state()
  rng = np.random.default_rng(cfg.seed)

  def evaluate(params) -> float:
    hits = []
    for i in range(0, a.eval_examples, a.batch):
      b = shd.global_batch({k: v[i:i + a.batch] for k, v in ev.items()}, trainer.mesh)
      hits.append(np.asarray(trainer.eval_step(params, b)["exact_B"]))
    return float(np.concatenate(hits).mean())

  curve, step, t_train = [], 0, time.time()
  while step < a.max_steps and time.time() - t_train < 60 * a.minutes:
    idx = rng.integers(0, a.train_pool, a.batch)
    state, metrics = trainer.step_fn(step)(state, shd.global_batch({k: v[idx] for k, v in train.items()}, trainer.mesh))
    step += 1
    if step % a.eval_every == 0:
      acc = evaluate(state["params"])
      curve.append({"step": step, "loss": float(metrics["loss"]), "eval_acc": acc, "wall_s": round(time.time() - t_train)})
      print(json.dumps(curve[-1]), flush=True)
  acc = evaluate(state["params"])
  out = {"config": a.config, "overrides": a.overrides, "passes": a.passes, "steps": step, "batch": a.batch,
         "train_examples_seen": step * a.batch, "train_pool": a.train_pool, "eval_examples": a.eval_examples,
         "accuracy": acc, "train_wall_s": round(time.time() - t_train), "device": str(jax.devices()[0]),
         "curve": curve}
  print(json.dumps({k: v for k, v in out.items() if k != "curve"}), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
