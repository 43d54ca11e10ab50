"""Read a finished run directory and summarise it: plots, report.md, and a side-by-side table of runs.

Usage: python -c "from hftoolkit.report import write_report; write_report('runs/example')"

A run directory is data written by our training code (hftoolkit.rundir; layout in docs/run-directory.md); a run
that stopped early or was eval-only lacks some of it, so every reader tolerates missing files and keys. The same
readers feed the model card (card.py).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import statistics
from pathlib import Path
from typing import Any

from hftoolkit.atomic import atomic_write_bytes, atomic_write_text
from hftoolkit.rundir import RunRecord, read_run
from hftoolkit.tasks import TASKS, lower_is_better
from hftoolkit.tasks.base import LOSS_METRICS

logger = logging.getLogger(__name__)

# Eval-line keys that are bookkeeping, not task metrics.
_NOT_METRICS = {"kind", "step", "epoch", "eval_loss", "perplexity", "num_examples"}
PLOT_NAMES = ("loss.png", "metric.png", "throughput.png")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any, signed: bool = False) -> str:
    """Two decimals for 0-100 scores, four below 1 (losses), one above 100 (perplexities); '-' if missing."""
    if not is_number(value):
        return "-"
    digits = 1 if abs(value) >= 100 else 2 if abs(value) >= 1 or value == 0 else 4
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def metric_names(*dicts: dict[str, Any], lower: tuple[str, ...] = LOSS_METRICS) -> list[str]:
    """Union of keys in first-seen order, task metrics first and the lower-is-better ones (losses) last."""
    names: list[str] = []
    for d in dicts:
        names += [k for k in d if k not in names]
    return [n for n in names if n not in lower] + [n for n in lower if n in names]


def results_table(
    baseline: dict[str, Any], final: dict[str, Any], lower: tuple[str, ...] = LOSS_METRICS
) -> list[str]:
    """Markdown table rows: metric | baseline | fine-tuned | delta (or metric | score for eval-only runs).
    `lower`: the task's lower-is-better score names (Task.lower_is_better)."""
    if not baseline:
        rows = ["| metric | score |", "|---|---:|"]
        return rows + [f"| {name} | {fmt(final.get(name))} |" for name in metric_names(final, lower=lower)]
    rows = ["| metric | baseline | fine-tuned | Δ |", "|---|---:|---:|---:|"]
    for name in metric_names(baseline, final, lower=lower):
        before, after = baseline.get(name), final.get(name)
        delta = after - before if is_number(before) and is_number(after) else None
        label = f"{name} (lower is better)" if name in lower else name
        rows.append(f"| {label} | {fmt(before)} | {fmt(after)} | {fmt(delta, signed=True)} |")
    return rows


def publication_note(results: dict) -> str | None:
    """Which step model/ holds and why (results.json "best" / "stopped_early"), in one sentence; None without
    periodic evaluations."""
    best, stopped = results.get("best"), results.get("stopped_early")
    if not best:
        return None
    metric = next(k for k in best if k not in ("step", "checkpoint", "published"))
    if best.get("published"):
        text = f"Published: the weights of step {best['step']}, the best periodic evaluation by {metric} ({fmt(best[metric])})"
    else:
        text = f"Published: the last step's weights (the best periodic evaluation was step {best['step']}, {metric} {fmt(best[metric])})"
    if stopped:
        text += f"; training stopped early at step {stopped['step']} ({stopped['reason']})"
    return text + "."


def throughput_summary(run: RunRecord) -> dict[str, float | int | None]:
    def mean(key: str) -> float | None:
        values = [line[key] for line in run.train if is_number(line.get(key))]
        return statistics.fmean(values) if values else None

    return {
        "steps": run.steps,
        "tokens_per_second": mean("tokens_per_second"),
        "target_tokens_per_second": mean("target_tokens_per_second"),
        "mfu": mean("mfu"),
    }


# ---------------------------------------------------------------------------------------------------------------
# Plots


def _series(lines: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [
        (line["step"], line[key])
        for line in lines
        if is_number(line.get("step")) and is_number(line.get(key))
    ]
    return [p[0] for p in points], [p[1] for p in points]


def headline_metrics(run: RunRecord) -> list[str]:
    """What metric.png shows: perplexity for generation, else the task metrics the eval lines carry."""
    task = TASKS.get(run.task)
    if task is not None and not task.generates:  # scored by the eval loss alone
        return ["perplexity"]
    names = metric_names(*run.evals)
    return [
        n
        for n in names
        if n not in _NOT_METRICS
        and "/" not in n  # data.eval_sets' "<set>/<metric>" keys: the plots show the primary set (plain keys)
        and not n.endswith(("_runtime", "_per_second"))
        and any(is_number(e.get(n)) for e in run.evals)
    ]


# Long on purpose: the three plots and their series are declared together, next to the one drawing helper.
def write_plots(run_dir: str | os.PathLike) -> list[Path]:
    """loss.png, metric.png, throughput.png in RUN_DIR/plots/; a plot without data is skipped."""
    # The object-oriented API with an explicit Agg canvas: no pyplot, no global backend switch, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run = read_run(run_dir)
    plots_dir = run.path / "plots"
    written: list[Path] = []

    def save(
        name: str,
        title: str,
        ylabel: str,
        series: list[tuple[str, list, list, dict]],
        mark: int | None = None,
    ) -> None:
        series = [s for s in series if s[1]]
        if not series:
            logger.info("no data for %s; skipping it", name)
            (plots_dir / name).unlink(missing_ok=True)  # a stale plot from an earlier run would mislead
            return
        fig = Figure(figsize=(6.4, 4.0), dpi=100)
        FigureCanvasAgg(fig)
        # Fixed margins: a tight/constrained layout draws every figure twice, which is most of the cost here.
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.92)
        ax = fig.add_subplot()
        for label, xs, ys, style in series:
            ax.plot(xs, ys, label=label, **style)
        if mark is not None:
            ax.axvline(mark, color="0.4", linestyle=":", label=f"published (step {mark})")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write_bytes(plots_dir / name, buf.getvalue())
        written.append(plots_dir / name)

    marker = {"marker": "o"}
    save(
        "loss.png",
        f"{run.path.name}: loss",
        "cross-entropy (nats/token)",
        [
            ("train loss", *_series(run.train, "loss"), {}),
            ("eval loss", *_series(run.evals, "eval_loss"), marker),
        ],
    )
    names = headline_metrics(run)
    save(
        "metric.png",
        f"{run.path.name}: {run.task} metrics",
        "perplexity" if names == ["perplexity"] else "score (0-100)",
        [(name, *_series(run.evals, name), marker) for name in names],
        mark=best["step"] if (best := (run.results or {}).get("best")) and best.get("published") else None,
    )
    save(
        "throughput.png",
        f"{run.path.name}: throughput",
        "tokens / second",
        [
            ("all tokens", *_series(run.train, "tokens_per_second"), {}),
            (
                "target (loss-bearing) tokens",
                *_series(run.train, "target_tokens_per_second"),
                {"linestyle": "--"},
            ),
        ],
    )
    return written


# ---------------------------------------------------------------------------------------------------------------
# report.md


def _config_lines(config: dict[str, Any]) -> list[str]:
    model = config.get("model") or {}
    data = config.get("data") or {}
    train = config.get("train") or {}
    if data.get("sources"):
        source = "mixture of " + ", ".join(describe_source(s) for s in data["sources"])
    elif data.get("dataset_name"):
        source = f"`{data['dataset_name']}`" + (
            f" ({data['dataset_config_name']})" if data.get("dataset_config_name") else ""
        )
    elif data.get("train_file") or data.get("validation_file"):
        source = f"train `{data.get('train_file') or '-'}`, validation `{data.get('validation_file') or '-'}`"
    else:
        source = "synthetic (hftoolkit.synthetic)"
    model_text = f"`{model.get('name_or_path') or '-'}`"
    if model.get("init"):
        model_text = f"from scratch, init `{json.dumps(model['init'])}`"
    keys = (
        "learning_rate",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "max_steps",
        "warmup_ratio",
    )
    hyper = ", ".join(f"{k}={train[k]}" for k in keys if k in train)
    return [
        f"- task: **{config.get('task', '-')}**, seed {config.get('seed', '-')}",
        f"- model: {model_text}",
        f"- data: {source}; max_seq_len {data.get('max_seq_len', '-')}, packing {data.get('packing', '-')}",
        f"- hyperparameters: {hyper or '-'}",
    ]


def describe_source(source: dict) -> str:
    """A data.sources entry of config.yaml in a few words: `id` (config) × weight."""
    name = source.get("dataset_name") or Path(str(source.get("train_file") or "-")).name
    config = f" ({source['dataset_config_name']})" if source.get("dataset_config_name") else ""
    return f"`{name}`{config} × {source.get('weight', 1)}"


def eval_set_tables(results: dict, lower: tuple[str, ...] = LOSS_METRICS) -> list[str]:
    """One scores table per data.eval_sets entry (results.json → eval_sets), each under its name and dataset."""
    lines: list[str] = []
    for name, scores in (results.get("eval_sets") or {}).items():
        ds = scores.get("dataset") or {}
        lines += [
            f"### {name}",
            "",
            f"`{ds.get('name', '-')}` (config {ds.get('config') or '-'}, split {ds.get('split') or '-'}, "
            f"{ds.get('num_examples', '-')} examples)",
            "",
            *results_table(scores.get("baseline") or {}, scores.get("final") or {}, lower),
            "",
        ]
    return lines


def _prediction_block(row: dict[str, Any]) -> list[str]:
    refs = row.get("references") or []
    return [
        f"- score **{fmt(row.get('score'))}**",
        f"  - prompt: {_one_line(row.get('prompt'))}",
        f"  - reference: {_one_line(refs[0] if refs else '')}",
        f"  - prediction: {_one_line(row.get('prediction'))}",
    ]


def _one_line(text: Any, limit: int = 300) -> str:
    text = " ⏎ ".join(str(text or "").splitlines())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return "`" + text.replace("`", "'") + "`"


def write_report(run_dir: str | os.PathLike) -> Path:
    """RUN_DIR/report.md, linking the plots that write_plots left in RUN_DIR/plots/ (call it first)."""
    run = read_run(run_dir)
    plots = [run.path / "plots" / name for name in PLOT_NAMES if (run.path / "plots" / name).is_file()]
    lines = [f"# Run report: {run.path.name}", "", "## Configuration", "", *_config_lines(run.config), ""]

    lines += ["## Results", ""]
    if run.results is None:
        lines += ["No results.json: the run did not finish its evaluation.", ""]
    else:
        lines += [*results_table(run.baseline(), run.final(), lower_is_better(run.task)), ""]
        if note := publication_note(run.results):
            lines += [note, ""]
        dataset = run.results.get("eval_dataset") or {}
        if dataset:
            lines += [
                f"Evaluated on `{dataset.get('name', '-')}` (config {dataset.get('config') or '-'}, split "
                f"{dataset.get('split', '-')}, {dataset.get('num_examples', '-')} examples). Scores are 0-100.",
                "",
            ]
        if sets := eval_set_tables(run.results, lower_is_better(run.task)):
            lines += [
                "## Eval sets",
                "",
                "data.eval_sets, each scored alone; the scores above are the first's.",
                "",
            ]
            lines += sets

    scored = [row for row in run.predictions if is_number(row.get("score"))]
    if scored:
        ranked = sorted(scored, key=lambda row: row["score"], reverse=True)
        k = min(3, len(ranked) // 2) or 1
        lines += ["## Predictions", "", f"Best {k} of {len(ranked)} by score:", ""]
        for row in ranked[:k]:
            lines += _prediction_block(row)
        lines += ["", f"Worst {k}:", ""]
        for row in ranked[-k:][::-1]:
            lines += _prediction_block(row)
        lines.append("")

    summary = throughput_summary(run)
    lines += ["## Throughput", ""]
    lines.append(f"- optimizer steps: {summary['steps'] if summary['steps'] is not None else '-'}")
    lines.append(f"- mean tokens/s: {fmt(summary['tokens_per_second'])}")
    if summary["target_tokens_per_second"] is not None:
        lines.append(
            f"- mean target (non-padding, unmasked) tokens/s: {fmt(summary['target_tokens_per_second'])}"
        )
    if summary["mfu"] is not None:
        lines.append(f"- mean MFU: {fmt(summary['mfu'])}")
    lines.append("")

    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
        lines.append("")

    path = run.path / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# ---------------------------------------------------------------------------------------------------------------
# compare runs


def compare_runs(run_dirs: list[str | os.PathLike]) -> str:
    """A markdown table, one row per run: final metrics with their delta vs baseline in parentheses."""
    runs = [read_run(d, require_results=True) for d in run_dirs]
    names = metric_names(*[r.final() for r in runs], *[r.baseline() for r in runs])
    header = ["run", "task", "model", "steps", "published", *names]
    rows = [header, ["---"] * 3 + ["---:"] * (len(header) - 3)]
    for run in runs:
        baseline, final = run.baseline(), run.final()
        cells = []
        for name in names:
            value, before = final.get(name), baseline.get(name)
            cell = fmt(value)
            if is_number(value) and is_number(before):
                cell += f" ({fmt(value - before, signed=True)})"
            cells.append(cell)
        steps = str(run.steps) if run.steps is not None else "-"
        best = (run.results or {}).get("best") or {}
        published = f"step {best['step']} (best)" if best.get("published") else "last step"
        rows.append([str(run.path), run.task, run.model_name, steps, published, *cells])
    table = ["| " + " | ".join(row) + " |" for row in rows]
    legend = (
        "Final scores (0-100; eval_loss and perplexity lower is better), delta vs baseline in parentheses."
    )
    return "\n".join([*table, "", legend, *suites_table(runs)])


def suites_table(runs) -> list[str]:
    """Evaluation-suite scores (results.json `suites`) beside the published reference scores of each suite."""
    rows = []
    for run in runs:
        for name, suite in sorted(((run.results or {}).get("suites") or {}).items()):
            ds = suite.get("dataset") or {}
            where = f"{ds.get('name')} ({ds.get('split')}, {ds.get('num_examples')} examples)"
            for metric in suite.get("report") or list(suite.get("metrics") or {}):
                refs = [
                    f"{fmt(r['scores'][metric])} {r.get('model', '')} [{r.get('source', '')}]"
                    for r in suite.get("references") or []
                    if metric in (r.get("scores") or {})
                ]
                value = (suite.get("metrics") or {}).get(metric)
                rows.append([str(run.path), name, where, metric, fmt(value), "; ".join(refs) or "-"])
    if not rows:
        return []
    header = ["run", "suite", "data", "metric", "score", "published (model) [source]"]
    lines = ["| " + " | ".join(r) + " |" for r in [header, ["---"] * 4 + ["---:", "---"], *rows]]
    note = "Published scores are for reading beside ours: eval/README.md says how each setting differs."
    return ["", "Evaluation suites:", "", *lines, "", note]
