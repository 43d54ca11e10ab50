"""`make quickstart`: train + evaluate the offline quickstart suite (eval/quickstart.yaml), print a before/after table.

Usage: hftoolkit quickstart --output-root runs/quickstart [--tasks qa translation]
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from hftoolkit.config import load_recipe
from hftoolkit.errors import UserError
from hftoolkit.recipes import recipes_root
from hftoolkit.tasks import TASKS


def load_suite() -> list[dict]:
    """The suite definition: eval/quickstart.yaml next to the recipes (source checkout or installed package)."""
    root = recipes_root()
    for candidate in (
        root.parent / "eval" / "quickstart.yaml",
        Path(__file__).resolve().parent / "eval_suites" / "quickstart.yaml",
    ):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text(encoding="utf-8"))["entries"]
    raise UserError("eval/quickstart.yaml not found next to the recipes (broken install?)")


def passed(entry: dict, baseline: float | None, final: float | None) -> bool:
    if baseline is None or final is None:
        return False
    if entry["higher_is_better"]:
        return final - baseline >= entry.get("min_gain", 0.0)
    return final > 0 and baseline / final >= entry.get("min_ratio", 1.0)


def run_quickstart(output_root: str, tasks: list[str] | None = None) -> str:
    from hftoolkit.train import train

    for t in tasks or []:
        if t not in TASKS:
            raise UserError(f"--tasks: unknown task '{t}' (choose from {', '.join(TASKS)})")
    rows = []
    for entry in load_suite():
        recipe_path = recipes_root() / f"{entry['recipe']}.yaml"
        recipe = load_recipe(recipe_path, ["train.overwrite_output_dir=true"])
        if tasks and recipe.task not in tasks:
            continue
        recipe.output_dir = str(Path(output_root) / recipe.task)
        start = time.perf_counter()
        results = train(recipe)
        rows.append((entry, recipe.task, results, time.perf_counter() - start, recipe.output_dir))
    return format_table(rows)


def format_table(rows) -> str:
    lines = [
        "",
        "| task | metric | before | after | bar | pass | stopped by itself | time | run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry, task, results, seconds, out in rows:
        metric = entry["metric"]
        base, final = results.get("baseline", {}).get(metric), results.get("final", {}).get(metric)
        bar = f"+{entry['min_gain']:g}" if entry["higher_is_better"] else f"÷{entry['min_ratio']:g}"
        stopped = results.get("final", {}).get("stopped_pct")
        lines.append(
            f"| {task} | {metric} | {_fmt(base)} | {_fmt(final)} | {bar} | {'yes' if passed(entry, base, final) else 'NO'} "
            f"| {'-' if stopped is None else f'{stopped:.0f}%'} | {seconds:.0f} s | {out} |"
        )
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"
