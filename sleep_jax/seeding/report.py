"""results.json, a markdown table and a bar chart of the knowledge-seeding methods."""

from __future__ import annotations

import json
import os

from sleep_jax import results_table

COLUMNS = ("method", "accuracy", "new_accuracy", "old_accuracy", "divergence_to_teacher", "wall_s")


def markdown(rows: list[dict]) -> str:
  """The results table; with several seeds a cell reads `mean ± std`."""
  lines = results_table.table(rows, COLUMNS, "seeds (each its own teacher, student and samples)")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = [r["method"] for r in rows]
  x = range(len(rows))
  fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.5))
  w = 0.38
  err = lambda k: [r.get(f"{k}_std", 0.0) for r in rows]
  ax.bar([i - w / 2 for i in x], [r["new_accuracy"] for r in rows], w, yerr=err("new_accuracy"), capsize=3,
         label="new facts (consolidated)")
  ax.bar([i + w / 2 for i in x], [r["old_accuracy"] for r in rows], w, yerr=err("old_accuracy"), capsize=3,
         label="old facts (kept)")
  ax.set_xticks(list(x), names)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("exact-match accuracy")
  ax.set_title("Knowledge seeding: teacher -> grown student")
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(run_dir: str, rows: list[dict]) -> None:
  with open(os.path.join(run_dir, "results.json"), "w") as f:
    json.dump(rows, f, indent=2)
  with open(os.path.join(run_dir, "results.md"), "w") as f:
    f.write(markdown(rows))
  plot(rows, os.path.join(run_dir, "results.png"))
