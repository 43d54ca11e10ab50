"""`make quickstart`: train + evaluate the four offline quickstart recipes, then print a before/after table.

Usage: hftoolkit quickstart --output-root runs/quickstart [--tasks qa translation]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hftoolkit.config import load_recipe
from hftoolkit.errors import UserError
from hftoolkit.recipes import recipes_root
from hftoolkit.tasks import TASKS

HEADLINES = {"generation": ["perplexity"], "summarization": ["rougeL", "rouge1"], "translation": ["bleu", "chrf"], "qa": ["exact_match", "f1"]}  # fmt: skip


def run_quickstart(output_root: str, tasks: list[str] | None = None) -> str:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from hftoolkit.train import train

    tasks = tasks or list(TASKS)
    for t in tasks:
        if t not in TASKS:
            raise UserError(f"--tasks: unknown task '{t}' (choose from {', '.join(TASKS)})")
    rows = []
    for task in tasks:
        out = Path(output_root) / task
        recipe = load_recipe(
            recipes_root() / "quickstart" / f"{task}.yaml", [f"output_dir={out}", "train.overwrite_output_dir=true"]
        )
        start = time.perf_counter()
        results = train(recipe)
        rows.append((task, results, time.perf_counter() - start, out))
        # Each recipe gets a fresh accelerator (the state is a process-wide singleton).
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    return format_table(rows)


def format_table(rows) -> str:
    lines = ["", "| task | metric | before | after | stopped by itself | time | run |", "|---|---|---|---|---|---|---|"]
    for task, results, seconds, out in rows:
        base, final = results.get("baseline", {}), results.get("final", {})
        for metric in HEADLINES[task]:
            stopped = f"{final['stopped_pct']:.0f}%" if "stopped_pct" in final else "-"
            lines.append(
                f"| {task} | {metric} | {base.get(metric, float('nan')):.2f} | {final.get(metric, float('nan')):.2f} "
                f"| {stopped} | {seconds:.0f} s | {out} |"
            )
    summary = {task: {"seconds": round(s, 1)} for task, _, s, _ in rows}
    return "\n".join(lines) + "\n\n" + json.dumps(summary)
