"""The markdown results table of `sleep-jax seed` and `sleep-jax dream`: one row per method;
with several seeds a metric cell reads `mean ± std` (the row's `<metric>_std`)."""

from __future__ import annotations


def cell(row: dict, column: str) -> str:
  v = row.get(column, "")
  if not isinstance(v, float):
    return str(v)
  std = row.get(f"{column}_std")
  return f"{v:.3f} ± {std:.3f}" if std is not None and row.get("seeds", 1) > 1 else f"{v:.3f}"


def table(rows: list[dict], columns: tuple[str, ...], over: str) -> list[str]:
  """Markdown lines; `over` names what the seeds vary, e.g. "dreaming seeds (one base model)"."""
  seeds = max(r.get("seeds", 1) for r in rows)
  lines = [f"Mean ± standard deviation over {seeds} {over}.", ""] if seeds > 1 else []
  lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  return lines + ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
