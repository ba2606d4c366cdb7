"""Sweep results: a point's rows, and the markdown table and plot of all points' rows.

A row is one (point, evaluation, difficulty): task, difficulty, passes, accuracy,
eval_examples, train_tokens, wall_s, point, label, plus the value of every key the sweep
varies. The table's rows are task/difficulty (and any other varied key that splits the
unlabelled points), its columns N = passes, then one column per labelled (baseline) point.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Optional

STYLES = ("--", ":", "-.")  # baselines: one dash style per label
JSON, MD, PLOT = "results.json", "results.md", "accuracy_vs_passes.png"
RECORD = "point.json"  # in each point's run dir; `done: true` marks the point finished


def read_record(run_dir: str) -> Optional[dict]:
  try:
    with open(os.path.join(run_dir, RECORD)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_json(path: str, obj: Any) -> None:
  # Write-then-rename: a killed process never leaves a torn file that looks finished.
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(path + ".tmp", path)


def varied_values(cfg, ecfg, varied: list[str], eval_varied: list[str]) -> dict[str, Any]:
  """The resolved value of each varied key: baselines get the base value of a grid key, so
  they share table rows with the grid points."""
  from omegaconf import OmegaConf

  train_conf, eval_conf = OmegaConf.structured(cfg), OmegaConf.structured(ecfg)
  out = {k: OmegaConf.select(train_conf, k) for k in varied}
  for k in eval_varied:  # the value the evaluation ran with; renamed only on a clash
    out["eval:" + k if k in out else k] = OmegaConf.select(eval_conf, k)
  return out


def point_rows(*, point: str, label: Optional[str], cfg, ecfg, result: dict, batches: Optional[int],
               wall_s: float, varied: dict[str, Any]) -> list[dict]:
  """Rows of one evaluation (`result`, from evaluate) of a point trained with `cfg`."""
  per_d = {int(k[len("eval/accuracy_d"):]): v for k, v in result.items() if k.startswith("eval/accuracy_d")}
  counts = _counts(ecfg, batches, result, list(per_d))
  if not per_d:  # no difficulty levels (text data): one row for the whole split
    per_d, counts = {None: result["eval/accuracy"]}, {None: result["eval/examples"]}
  common = {"point": point, "label": label, "task": cfg.data.task if cfg.data.source == "task" else "text"}
  # Tokens the model was trained on; the loop counts seq_len - 1 input tokens per example.
  train_tokens = cfg.train.steps * cfg.train.batch_size * (cfg.data.seq_len - 1)
  return [{**common, "difficulty": d, "passes": ecfg.sleep.passes, "accuracy": acc, "eval_examples": counts.get(d),
           "train_tokens": train_tokens, "wall_s": round(wall_s, 2), **varied} for d, acc in per_d.items()]


def _counts(ecfg, batches: Optional[int], result: dict, levels: list[int]) -> dict:
  """Eval examples per difficulty: from the result if it says, else counted in the split."""
  if all(f"eval/examples_d{d}" in result for d in levels):
    return {d: result[f"eval/examples_d{d}"] for d in levels}
  if len(levels) <= 1:
    return {d: result["eval/examples"] for d in levels}
  from sleep_jax import data as data_lib

  src = data_lib.data_sources(ecfg.data)["eval"]
  n = len(src) if batches is None else min(len(src), batches * ecfg.train.batch_size)
  return dict(Counter(int(src[i]["difficulty"]) for i in range(n)))


# ---------------------------------------------------------------------------------------
# Layout shared by the table and the plot


def _key(v: Any) -> str:
  return json.dumps(v, sort_keys=True, default=str)


def show(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:g}"
  if isinstance(v, (list, tuple)):
    return "+".join(show(x) for x in v)
  return "-" if v is None else str(v)


def _order(v: Any):
  # Numbers before strings, numbers by value: difficulty 16 comes after 2.
  return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, _key(v))


def row_keys(rows: list[dict], varied: list[str]) -> list[str]:
  """task, difficulty, then the varied keys that split the unlabelled points other than
  those repeating passes or difficulty (sleep.passes, data.eval_task_options.steps)."""
  base = [r for r in rows if r.get("label") is None] or rows
  out = ["task", "difficulty"]
  for k in varied:
    if len({_key(r.get(k)) for r in base}) <= 1:
      continue
    if all(r.get(k) == r["passes"] for r in base) or all(r.get(k) == r["difficulty"] for r in base):
      continue
    out.append(k)
  return out


def column(row: dict) -> str:
  return str(row["label"]) if row.get("label") is not None else f"N={row['passes']}"


def layout(rows: list[dict], varied: list[str]):
  """(row-key names, sorted row-key tuples, columns, {(row key, column): row})."""
  keys = row_keys(rows, varied)
  cells: dict = {}
  for r in rows:  # a later row for the same cell wins (it cannot happen without a bad sweep)
    cells[(tuple(_key(r.get(k)) for k in keys), column(r))] = r
  groups = sorted({rk for rk, _ in cells}, key=lambda rk: tuple(_order(json.loads(v)) for v in rk))
  ns = sorted({r["passes"] for r in rows if r.get("label") is None})
  labels = list(dict.fromkeys(str(r["label"]) for r in rows if r.get("label") is not None))
  return keys, groups, [f"N={n}" for n in ns] + labels, cells


def write(rows: list[dict], varied: list[str], root: str, *, name: str) -> None:
  """ROOT/results.json (the rows), results.md (the table) and accuracy_vs_passes.png."""
  os.makedirs(root, exist_ok=True)
  write_json(os.path.join(root, JSON), rows)
  with open(os.path.join(root, MD), "w") as f:
    f.write(markdown_table(rows, varied, title=f"Sweep `{name}`: exact-match accuracy (%)"))
  if rows:
    plot_accuracy(rows, varied, os.path.join(root, PLOT), title=f"sweep {name}")


def markdown_table(rows: list[dict], varied: list[str], *, title: str) -> str:
  if not rows:
    return f"# {title}\n\n(no finished points yet)\n"
  keys, groups, cols, cells = layout(rows, varied)
  names = [k.split(".")[-1] for k in keys]
  lines = [f"# {title}", "", "| " + " | ".join(names + cols + ["eval examples"]) + " |",
           "|" + "---|" * len(names) + "---:|" * (len(cols) + 1)]
  for g in groups:
    found = [cells.get((g, c)) for c in cols]
    n = [r["eval_examples"] for r in found if r is not None and r.get("eval_examples") is not None]
    lines.append("| " + " | ".join([show(json.loads(v)) for v in g]
                                   + [f"{100 * r['accuracy']:.1f}" if r else "" for r in found]
                                   + [show(min(n)) if n else ""]) + " |")
  lines += ["", "N = sleep passes; labelled columns are baselines; eval examples = the fewest behind any cell "
            "of the row."]
  return "\n".join(lines) + "\n"


def plot_accuracy(rows: list[dict], varied: list[str], path: str, *, title: str) -> None:
  """Accuracy against N, one line per table row; baselines as dashed horizontal lines."""
  from matplotlib.figure import Figure  # no pyplot: no global backend, nothing to close
  from matplotlib.lines import Line2D

  keys, groups, _, cells = layout(rows, varied)
  labels = list(dict.fromkeys(str(r["label"]) for r in rows if r.get("label") is not None))
  fig = Figure(figsize=(6.4, 4.2), layout="constrained")
  ax = fig.add_subplot()
  shown = [i for i, k in enumerate(keys) if len({g[i] for g in groups}) > 1 or k == "difficulty"]
  ns = set()
  for i, g in enumerate(groups):
    color = f"C{i % 10}"
    name = " ".join(f"{keys[j].split('.')[-1]}={show(json.loads(g[j]))}" for j in shown)
    pts = sorted((r["passes"], r["accuracy"]) for (rk, _), r in cells.items() if rk == g and r.get("label") is None)
    ns.update(n for n, _ in pts)
    if pts:
      ax.plot(*zip(*pts), marker="o", color=color, label=name)
      name = None
    for (rk, col), r in cells.items():
      if rk == g and r.get("label") is not None:
        ax.axhline(r["accuracy"], color=color, linewidth=1, linestyle=STYLES[labels.index(col) % len(STYLES)],
                   label=name)
        name = None  # a row of baselines only is named once in the legend
  handles, names = ax.get_legend_handles_labels()
  handles += [Line2D([], [], color="grey", linestyle=STYLES[i % len(STYLES)]) for i in range(len(labels))]
  ax.legend(handles, names + labels, fontsize="small")
  if ns:
    ax.set_xticks(sorted(ns))
  ax.set_xlabel("sleep passes N")
  ax.set_ylabel("exact-match accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.set_title(title)
  fig.savefig(path, dpi=120)
