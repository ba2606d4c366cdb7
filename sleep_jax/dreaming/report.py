"""results.json, a markdown table and a per-day plot for the continual-learning methods."""

from __future__ import annotations

import json
import os

from sleep_jax import results_table

COLUMNS = ("method", "new_accuracy", "old_accuracy", "backward_transfer", "forgetting", "wall_s")


def markdown(rows: list[dict], speed: dict | None = None, reading: dict | None = None) -> str:
  """The results table; with several dreaming seeds a cell reads `mean ± std`."""
  lines = results_table.table(rows, COLUMNS, "dreaming seeds (one base model)")
  if speed:
    lines += ["", f"Isolated copies: vmapped vs a sequential loop, speed-up {speed['speedup']:.2f}x "
                  f"({speed['copies']} copies; {speed['vmapped_s']:.3f} s vs {speed['sequential_s']:.3f} s)."]
  if reading:
    how = (f"across eviction: chunks of {reading['chunk_len']}, {reading['passes']} sleep passes"
           if reading["sleeps"] else "one causal pass")
    lines += ["", f"Base model, in-context reading ({how}; passage of {reading['passage_len']} tokens): "
                  f"{reading['reading_days']:.3f} of the days' restated facts, {reading['reading_fresh']:.3f} on "
                  f"fresh passages (sleep.passes=1: {reading['reading_days_passes1']:.3f} / "
                  f"{reading['reading_fresh_passes1']:.3f}); old facts closed-book {reading['old_closed_book']:.3f}."]
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
  for r in rows:
    days = range(1, len(r["per_day_new"]) + 1)
    a.plot(days, r["per_day_new"], marker="o", label=r["method"])
    b.plot(days, r["per_day_old"], marker="o", label=r["method"])
  seeds = max(r.get("seeds", 1) for r in rows)
  over = f", mean of {seeds} seeds" if seeds > 1 else ""
  a.set_title(f"new facts (that day's{over})")
  b.set_title(f"old facts (pre-training{over})")
  for ax in (a, b):
    ax.set_xlabel("day")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(list(range(1, len(rows[0]["per_day_new"]) + 1)))
  a.set_ylabel("closed-book exact match")
  b.legend(fontsize=8, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(run_dir: str, rows: list[dict], speed: dict | None = None, reading: dict | None = None) -> None:
  with open(os.path.join(run_dir, "results.json"), "w") as f:  # the speed-up stays in vmap_speedup.json
    json.dump(rows, f, indent=2)
  with open(os.path.join(run_dir, "results.md"), "w") as f:
    f.write(markdown(rows, speed, reading))
  plot(rows, os.path.join(run_dir, "results.png"))
