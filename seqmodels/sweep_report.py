"""A sweep's results: one row per run in results.csv and results.md, and plots of the learning curves.

Everything is read back from the runs' workdirs (config.json, metrics.jsonl, sweep_status.json,
eval/<step>.json), so a report can be made at any time, also while runs are missing or failed.
Plots need matplotlib (`pip install .[plot]`); without it the tables are still written.
"""

import csv
import json
import math
import os
import statistics

from seqmodels import checkpoint, lm
from seqmodels.sweep import Run, format_value, read_status

# Columns of results.csv, in order; the evaluation metrics found in the runs follow them.
COLUMNS = ("run", "status", "error", "overrides", "params", "non_embedding_params", "steps", "tokens",
           "final_val_loss", "best_val_loss", "final_val_ppl", "final_val_accuracy", "tokens_per_sec",
           "peak_memory_gb", "wall_s")
# Columns of results.md's main table (the csv has them all).
SUMMARY_COLUMNS = ("run", "status", "non_embedding_params", "tokens", "final_val_loss", "best_val_loss",
                   "final_val_ppl", "final_val_accuracy", "tokens_per_sec", "peak_memory_gb", "wall_s")


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  records = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        records[record["step"]] = record  # A resumed run may log a step twice; the last one counts.
  return [records[s] for s in sorted(records)]


def non_embedding_params(config) -> tuple[int, int]:
  """(all parameters, parameters outside the token and position embeddings and an untied head)."""
  model = lm.abstract(config.model)
  total = lm.count_params(model)
  embedding = model.embed.embedding.size
  if model.positions is not None:
    embedding += model.positions.embedding.size
  if model.head is not None:
    embedding += model.head.kernel.size
  return total, total - int(embedding)


def training_curve(records: list[dict], tokens_per_step: int) -> list[dict]:
  """Per logged step: tokens seen, training seconds so far (from each interval's tokens/s) and losses."""
  curve, seconds, previous = [], 0.0, 0
  for record in records:
    tokens = (record["step"] - previous) * tokens_per_step
    if record.get("tokens_per_sec"):
      seconds += tokens / record["tokens_per_sec"]
    previous = record["step"]
    curve.append({"step": record["step"], "tokens": record["step"] * tokens_per_step, "seconds": seconds,
                  "loss": record.get("loss"), "val_loss": record.get("val_loss")})
  return curve


def _steady_tokens_per_sec(records: list[dict]):
  """The median over logged intervals, leaving out the first (it holds the compilation)."""
  rates = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][1:]
  return statistics.median(rates) if rates else None


def _eval_columns(workdir: str, step: int | None) -> dict:
  """Metrics of eval.py at the run's last step: <task>_<metric> and text_ppl, text_bits_per_byte."""
  path = os.path.join(workdir, "eval", f"{step}.json")
  if step is None or not os.path.isfile(path):
    return {}
  with open(path) as f:
    result = json.load(f)
  columns = {}
  for task, scores in result.get("tasks", {}).items():
    columns.update({f"{task}_{k}": v for k, v in scores.items() if k != "n"})
  text = result.get("text", {}).get("all")
  if text:
    columns.update(text_ppl=text["ppl"], text_bits_per_byte=text["bits_per_byte"])
  return columns


def collect(run: Run) -> dict:
  """The results row of one run."""
  status = read_status(run.workdir)
  # A run that logged steps but never recorded an end was stopped before the sweep could record it.
  unrecorded = "interrupted" if os.path.isfile(os.path.join(run.workdir, "metrics.jsonl")) else "not started"
  row = {"run": run.name, "status": status.get("status", unrecorded), "error": status.get("error", ""),
         "overrides": " ".join(f"{k}={format_value(v)}" for k, v in run.overrides.items()),
         "wall_s": status.get("wall_s")}
  if not os.path.isfile(checkpoint.config_path(run.workdir)):
    return row
  config = checkpoint.read_config(run.workdir)
  row["params"], row["non_embedding_params"] = non_embedding_params(config)
  records = read_metrics(run.workdir)
  validated = [r for r in records if "val_loss" in r]
  if records:
    row["steps"] = records[-1]["step"]
    row["tokens"] = records[-1]["step"] * config.batch_size * config.seq_len
    row["tokens_per_sec"] = _steady_tokens_per_sec(records)
    peaks = [r["peak_memory_gb"] for r in records if "peak_memory_gb" in r]
    row["peak_memory_gb"] = max(peaks) if peaks else None
  if validated:
    row["final_val_loss"] = validated[-1]["val_loss"]
    row["best_val_loss"] = min(r["val_loss"] for r in validated)
    row["final_val_ppl"] = math.exp(min(validated[-1]["val_loss"], 700.0))
    row["final_val_accuracy"] = validated[-1].get("val_accuracy")
  for key, value in (records[-1] if records else {}).items():
    if key.startswith("eval/"):
      row[key[len("eval/"):].replace("/", "_")] = value
  row.update(_eval_columns(run.workdir, row.get("steps")))
  return row


def _format(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    if value != value:
      return "nan"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
  if isinstance(value, int):
    return f"{value:,}"
  return str(value).replace("|", "\\|")


def _markdown_table(rows: list[dict], columns) -> list[str]:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_format(row.get(c)) for c in columns) + " |" for row in rows]
  return lines


def seed_groups(runs: list[Run], rows: list[dict]) -> list[dict]:
  """Runs that differ only in their seed, with the mean and the range of their metrics."""
  groups = {}
  for run, row in zip(runs, rows):
    if "seed" not in run.overrides or row["status"] != "done":
      continue
    key = " ".join([run.config_spec, *(f"{k}={format_value(v)}" for k, v in run.overrides.items() if k != "seed")])
    groups.setdefault(key, []).append(row)
  summary = []
  for key, members in groups.items():
    if len(members) < 2:
      continue
    entry = {"runs": " ".join(m["run"] for m in members), "seeds": len(members)}
    for metric in ("final_val_loss", "final_val_ppl", "text_bits_per_byte", "tokens_per_sec"):
      values = [m[metric] for m in members if m.get(metric) is not None]
      if values:
        entry[f"{metric} mean"] = statistics.fmean(values)
        entry[f"{metric} range"] = max(values) - min(values)
    summary.append(entry)
  return summary


def write_report(sweep_dir: str, runs: list[Run], *, plots: bool = True, log=print) -> list[dict]:
  """Writes results.csv, results.md and (with matplotlib) the plots into `sweep_dir`; returns the rows."""
  rows = [collect(run) for run in runs]
  extra = sorted({k for row in rows for k in row} - set(COLUMNS))
  os.makedirs(sweep_dir, exist_ok=True)
  with open(os.path.join(sweep_dir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *extra])
    writer.writeheader()
    writer.writerows(rows)
  lines = [f"# Sweep results: {os.path.basename(os.path.normpath(sweep_dir))}", "",
           *_markdown_table(rows, SUMMARY_COLUMNS)]
  if extra:
    lines += ["", "## Evaluation", "", *_markdown_table(rows, ("run", *extra))]
  groups = seed_groups(runs, rows)
  if groups:
    columns = ["runs", "seeds", *sorted({k for g in groups for k in g} - {"runs", "seeds"})]
    lines += ["", "## Across seeds (mean and max - min)", "", *_markdown_table(groups, columns)]
  failed = [row for row in rows if row["status"] == "failed"]
  if failed:
    lines += ["", "## Failures", ""] + [f"- `{row['run']}`: {row['error']}" for row in failed]
  with open(os.path.join(sweep_dir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  log(f"wrote {os.path.join(sweep_dir, 'results.csv')} and results.md ({len(rows)} runs)")
  if plots:
    write_plots(sweep_dir, runs, rows, log=log)
  return rows


def write_plots(sweep_dir: str, runs: list[Run], rows: list[dict], log=print) -> None:
  """loss_vs_tokens.png, loss_vs_time.png and loss_vs_params.png, or a one-line note without matplotlib."""
  try:
    import matplotlib
  except ImportError:
    log("plots skipped: matplotlib is not installed (pip install '.[plot]')")
    return
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  # One panel per training objective (causal LM, MLM, classification): their losses are not comparable.
  panels = {}
  for run in runs:
    if os.path.isfile(checkpoint.config_path(run.workdir)):
      config = checkpoint.read_config(run.workdir)
      curve = training_curve(read_metrics(run.workdir), config.batch_size * config.seq_len)
      panels.setdefault(config.get("objective", "causal_lm"), {})[run.name] = curve
  colours = plt.get_cmap("tab20").colors
  for x_key, x_label, filename in (("tokens", "training tokens", "loss_vs_tokens.png"),
                                   ("seconds", "training wall-clock (s)", "loss_vs_time.png")):
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 5), squeeze=False)
    for ax, (objective, curves) in zip(axes[0], panels.items()):
      for index, (name, curve) in enumerate(curves.items()):
        # The training loss as a line, the (sparser) validation losses as dots of the same colour.
        colour = colours[index % len(colours)]
        ax.plot([p[x_key] for p in curve], [p["loss"] for p in curve], linewidth=1, label=name, color=colour)
        points = [(p[x_key], p["val_loss"]) for p in curve if p["val_loss"] is not None]
        if points:
          ax.plot(*zip(*points), "o", markersize=4, color=colour)
      ax.set_title(objective)
      ax.set_xlabel(x_label)
      ax.set_ylabel("loss (nats/token): training (line), validation (dots)")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(sweep_dir, filename), dpi=120)
    plt.close(fig)
  fig, ax = plt.subplots(figsize=(8, 5))
  for row in rows:
    if row.get("final_val_loss") is not None and row.get("non_embedding_params"):
      ax.scatter(row["non_embedding_params"] / 1e6, row["final_val_loss"])
      ax.annotate(row["run"], (row["non_embedding_params"] / 1e6, row["final_val_loss"]), fontsize=7)
  ax.set_xlabel("non-embedding parameters (M)")
  ax.set_ylabel("final validation loss (nats/token)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(sweep_dir, "loss_vs_params.png"), dpi=120)
  plt.close(fig)
  log(f"wrote loss_vs_tokens.png, loss_vs_time.png and loss_vs_params.png in {sweep_dir}")
