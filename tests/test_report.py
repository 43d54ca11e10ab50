"""report.py: plots, report.md and the comparison table, on fake run directories.

Usage: pytest tests/test_report.py
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from hftoolkit.errors import UserError
from hftoolkit.report import compare_runs, write_plots, write_report
from tests.conftest import FAKE_RUN_BASELINE, FAKE_RUN_FINAL

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_write_plots_writes_three_valid_pngs(fake_run_dir):
    """If this fails, runs get no curves (or broken image files) in plots/, the report and the Hub repo."""
    paths = write_plots(fake_run_dir)
    assert [p.name for p in paths] == ["loss.png", "metric.png", "throughput.png"]
    for path in paths:
        assert path.parent == fake_run_dir / "plots"
        width, height = png_size(path)
        assert (width, height) == (640, 400)
        assert path.stat().st_size > 10_000  # axes, labels, lines: not an empty canvas
    assert sorted(p.name for p in (fake_run_dir / "plots").iterdir()) == [
        "loss.png",
        "metric.png",
        "throughput.png",
    ]


def test_write_plots_skips_what_has_no_data(fake_run_dir):
    """If this fails, a run without throughput logging (or an eval-only run without metrics.jsonl) crashes the
    report, or gets an empty plot."""
    lines = [json.loads(x) for x in (fake_run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("tokens_per_second", None)
        line.pop("target_tokens_per_second", None)
    (fake_run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert [p.name for p in write_plots(fake_run_dir)] == ["loss.png", "metric.png"]

    (fake_run_dir / "metrics.jsonl").unlink()
    assert write_plots(fake_run_dir) == []


def test_generation_metric_plot_is_perplexity(fake_run_dir):
    """If this fails, generation runs (whose only metric is perplexity) get no metric plot."""
    import yaml

    cfg = yaml.safe_load((fake_run_dir / "config.yaml").read_text())
    cfg["task"] = "generation"
    (fake_run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    from hftoolkit.report import headline_metrics, read_run

    assert headline_metrics(read_run(fake_run_dir)) == ["perplexity"]


def test_report_has_config_results_predictions_throughput_and_plots(fake_run_dir):
    """If this fails, report.md misstates the run: wrong baseline/final/delta numbers, missing best/worst
    examples, wrong throughput, or dead plot links."""
    write_plots(fake_run_dir)
    path = write_report(fake_run_dir)
    assert path == fake_run_dir / "report.md"
    text = path.read_text()

    assert "- task: **summarization**" in text
    assert "`openai-community/gpt2`" in text
    assert "learning_rate=0.0005" in text and "gradient_accumulation_steps=2" in text
    assert "| metric | baseline | fine-tuned | Δ |" in text
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        before, after = FAKE_RUN_BASELINE[name], FAKE_RUN_FINAL[name]
        assert f"| {name} | {before:.2f} | {after:.2f} | {after - before:+.2f} |" in text
    assert "| eval_loss (lower is better) | 5.50 | 2.25 | -3.25 |" in text
    assert "| perplexity (lower is better) | 244.7 | 9.49 | -235.2 |" in text

    best, worst = text.split("Best 3 of 60 by score:")[1].split("Worst 3:")
    assert "score **99.00**" in best and "`prediction 27`" in best  # (27 * 37) % 100 == 99
    assert "score **0.00**" in worst and "`prediction 0`" in worst

    assert "- optimizer steps: 10" in text
    assert "- mean tokens/s: 1055.0" in text  # mean of 1000 + 10 * step, steps 1..10
    for name in ("loss", "metric", "throughput"):
        assert f"![{name}](plots/{name}.png)" in text
        assert (fake_run_dir / "plots" / f"{name}.png").is_file()
    assert not [p for p in fake_run_dir.rglob("*.tmp")]  # atomic writes leave no temp files


def test_report_for_eval_only_run_without_scores(fake_run_dir):
    """If this fails, an eval-only run (final scores only, unscored predictions) breaks `hftoolkit report`."""
    (fake_run_dir / "results.json").write_text(json.dumps({"final": {"rougeL": 12.0}}))
    rows = [json.loads(x) for x in (fake_run_dir / "predictions.jsonl").read_text().splitlines()]
    (fake_run_dir / "predictions.jsonl").write_text(
        "".join(json.dumps({**r, "score": None}) + "\n" for r in rows)
    )
    text = write_report(fake_run_dir).read_text()
    assert "| metric | score |" in text and "| rougeL | 12.00 |" in text
    assert "## Predictions" not in text
    assert "## Plots" not in text  # none written: no dead links


def test_compare_runs_shows_both_runs_and_the_union_of_metrics(fake_run_dir, tmp_path):
    """If this fails, `hftoolkit report A B` drops a run, a metric column, or shows wrong deltas."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(fake_run_dir, other)
    (other / "results.json").write_text(
        json.dumps({"baseline": {"bleu": 1.0}, "final": {"bleu": 20.5, "chrf": 44.0}})
    )

    table = compare_runs([fake_run_dir, other])
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["run", "task", "model", "steps", "published"]  # which step model/ holds
    assert set(header[5:]) == set(FAKE_RUN_FINAL) | {"bleu", "chrf"}
    rows = {row.split("|")[1].strip(): [c.strip() for c in row.strip("|").split("|")] for row in lines[2:]}
    assert set(rows) == {str(fake_run_dir), str(other)}

    first = dict(zip(header, rows[str(fake_run_dir)], strict=True))
    assert first["rougeL"] == "28.00 (+23.50)"
    assert first["bleu"] == "-" and first["steps"] == "10" and first["model"] == "openai-community/gpt2"
    second = dict(zip(header, rows[str(other)], strict=True))
    assert second["bleu"] == "20.50 (+19.50)"
    assert second["chrf"] == "44.00"  # no baseline: no delta
    assert second["rougeL"] == "-"
    assert first["published"] == second["published"] == "last step"  # no periodic evaluation chose a best


def test_compare_runs_without_results_is_a_user_error(fake_run_dir, tmp_path):
    """If this fails, comparing an unfinished run (or a typo'd path) gives a traceback instead of naming it."""
    (fake_run_dir / "results.json").unlink()
    with pytest.raises(UserError, match=str(fake_run_dir)):
        compare_runs([fake_run_dir])
    missing = tmp_path / "no_such_run"
    with pytest.raises(UserError, match="no_such_run"):
        compare_runs([missing])
