"""The model card (README.md) of a run: metadata with model-index scores, and a body a reader can act on.

Usage: python -c "from hftoolkit.card import build_model_card; print(build_model_card('runs/example'))"

Built from the run directory alone (config.yaml, results.json, metrics.jsonl, predictions.jsonl, model/): every
training run writes it as RUN_DIR/README.md, and `hftoolkit push` uploads it as the repo's README.md.
"""

from __future__ import annotations

import json
import os
import re
import string
import struct
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from hftoolkit.report import (
    describe_source,
    eval_set_tables,
    fmt,
    is_number,
    publication_note,
    results_table,
    throughput_summary,
)
from hftoolkit.rundir import ModelInfo, read_json_object, read_run
from hftoolkit.tasks import TASKS, lower_is_better

CARD_SAMPLE_PREDICTIONS = 3
DEFAULT_LICENSE = "apache-2.0"


def build_model_card(run_dir: str | os.PathLike, repo_id: str | None = None) -> ModelCard:
    """The README.md of the pushed repo: metadata (with model-index = final scores) and a body.

    `repo_id` goes into the usage snippet; without it the snippet says REPO_ID.
    """
    run = read_run(run_dir)
    cfg = run.config
    model_cfg = cfg.get("model") or {}
    data_cfg = cfg.get("data") or {}
    hub_cfg = cfg.get("hub") or {}
    model_dir = run.path / "model"
    model_config = read_json_object(model_dir / "config.json", "fix it or re-save the model")
    info = ModelInfo.read(model_dir) or ModelInfo(task=run.task, num_beams=None)
    task = TASKS.get(info.task)
    task_type, task_pretty = task.hub_task if task else ("text-generation", info.task)
    model_name = repo_id.split("/")[-1] if repo_id else run.path.name
    dataset = _eval_dataset(run.results or {}, data_cfg)
    entries = model_index_entries(run, {"type": task_type, "name": task_pretty}, dataset)
    eval_results = to_eval_results([*entries, *suite_entries(run.results or {})])
    base_model = hub_id(model_cfg.get("name_or_path")) if not model_cfg.get("init") else None
    sources = data_cfg.get("sources") or [data_cfg]
    dataset_ids = list(dict.fromkeys(i for s in sources if (i := hub_id(s.get("dataset_name")))))
    tags = ["hftoolkit", info.task, str(model_config.get("model_type") or "gpt2"), "text-generation"]
    card_data = ModelCardData(
        base_model=base_model,
        datasets=dataset_ids or None,
        license=str(hub_cfg.get("license") or DEFAULT_LICENSE),
        language=task.languages({**info.data, **data_cfg}) if task else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    body = _card_body(run, model_name, repo_id, base_model, info, model_config, dataset)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def model_index_entries(run, task: dict, dataset: dict) -> list[dict]:
    """The model-index results, one entry per evaluated dataset: {"dataset": {"name", "type", "config", "split"},
    "task": {"type", "name"}, "metrics": {name: value}, "metric_config": {...}}. Each of data.eval_sets is one entry
    (its final scores); without them the run's eval split (`dataset`) is."""
    results = run.results or {}
    metric_config = results.get("metric_config") or {}
    sets = results.get("eval_sets") or {}
    if not sets:
        ref = {"name": dataset["name"], "type": dataset["name"], "config": dataset.get("config"),
               "split": dataset.get("split")}  # fmt: skip
        final = run.final()
        return [
            {
                "dataset": ref,
                "task": task,
                "metrics": final,
                "metric_config": score_settings(final, metric_config),
            }
        ]
    entries = []
    for name, scores in sets.items():
        ds = scores.get("dataset") or {}
        source = str(ds.get("name") or name)
        ref = {"name": name, "type": hub_id(source) or Path(source).name, "config": ds.get("config"),
               "split": ds.get("split")}  # fmt: skip
        entries.append(
            {
                "dataset": ref,
                "task": task,
                "metrics": scores.get("final") or {},
                "metric_config": score_settings(scores.get("final") or {}, metric_config),
            }
        )
    return entries


def to_eval_results(entries: list[dict]) -> list[EvalResult]:
    """model-index results from evaluation entries, one per (dataset, metric): the run's final evaluation,
    evaluation suites, named eval sets. Each entry:
    {"dataset": {"name", "type", "config", "split"}, "task": {"type", "name"}, "metrics": {score: value},
     "metric_config": {score: {settings...}} (optional: the settings the score was computed with)}."""
    results = []
    for entry in entries:
        ds, task = entry["dataset"], entry["task"]
        configs = entry.get("metric_config") or {}
        for name, value in entry["metrics"].items():
            if not is_number(value):
                continue
            results.append(
                EvalResult(
                    task_type=task["type"],
                    task_name=task["name"],
                    dataset_type=str(ds.get("type") or ds["name"]),
                    dataset_name=str(ds["name"]) + (f" ({ds['config']})" if ds.get("config") else ""),
                    dataset_config=ds.get("config"),
                    dataset_split=ds.get("split"),
                    metric_type=name,
                    metric_name=name,
                    metric_value=round(float(value), 4),
                    metric_args=configs.get(name) or None,
                )
            )
    return results


def suite_entries(results: dict) -> list[dict]:
    """results.json's `suites` as model_index_entries input: each suite's scored metrics (the ones its report
    names, else all but stopped_pct), with the metric module's settings (e.g. sacreBLEU's signature)."""
    entries = []
    for name, suite in sorted((results.get("suites") or {}).items()):
        task = TASKS.get(suite.get("task"))
        task_type, task_pretty = task.hub_task if task else ("text-generation", str(suite.get("task")))
        ds = suite.get("dataset") or {}
        wanted = suite.get("report") or [k for k in suite.get("metrics", {}) if k != "stopped_pct"]
        metrics = {k: v for k, v in (suite.get("metrics") or {}).items() if k in wanted}
        modules = suite.get("metric_config") or {}
        entries.append({
            "dataset": {"name": ds.get("name") or name, "type": ds.get("name") or name,
                        "config": ds.get("config"), "split": ds.get("split")},
            "task": {"type": task_type, "name": task_pretty},
            "metrics": metrics,
            "metric_config": score_settings(metrics, modules),
        })  # fmt: skip
    return entries


def score_settings(scores: dict, modules: dict) -> dict:
    """{score: the settings of the metric module that produced it}, from results.json's metric_config (per module)."""
    return {k: _module_settings(k, modules) for k in scores}


def _module_settings(score: str, modules: dict) -> dict | None:
    """The settings of the metric module that produced `score` (rouge1 → rouge, bleu → sacrebleu, ...)."""
    if score in modules:
        return modules[score]
    owner = {"bleu": "sacrebleu", "chrf": "chrf"}.get(score) or (
        "rouge" if score.startswith("rouge") else None
    )
    if owner is None:
        owner = next((m for m in ("squad_v2", "squad", "exact_match") if m in modules), None)
    return modules.get(owner) if owner else None


def _card_body(run, model_name, repo_id, base_model, info: ModelInfo, model_config, dataset) -> str:
    lines = _intro(run, model_name, base_model, info, model_config)
    if run.results:
        lines += _evaluation_section(run, dataset, lower_is_better(info.task))
    lines += _prompt_section(run.config, repo_id, info)
    lines += _training_section(run)
    lines += _samples_section(run.predictions[:CARD_SAMPLE_PREDICTIONS])
    context = model_config.get("n_positions") or model_config.get("max_position_embeddings")
    lines += _limitations_section(run.config.get("data") or {}, context)
    return "\n".join(lines)


def _intro(run, model_name, base_model, info: ModelInfo, model_config) -> list[str]:
    model_cfg = run.config.get("model") or {}
    data_cfg = run.config.get("data") or {}
    task = info.task
    n_params = _count_parameters(run.path / "model")
    arch = ", ".join(
        f"{model_config[k]} {label}"
        for k, label in (
            ("n_layer", "layers"),
            ("n_embd", "wide"),
            ("n_head", "heads"),
            ("vocab_size", "tokens vocab"),
        )
        if k in model_config
    )
    if base_model:
        origin = f"fine-tuned from [{base_model}](https://huggingface.co/{base_model})"
    elif model_cfg.get("init"):
        origin = f"trained from scratch (`model.init: {json.dumps(model_cfg['init'])}`)"
    else:
        origin = f"fine-tuned from `{model_cfg.get('name_or_path') or 'a local checkpoint'}`"
    size = f"{_human_count(n_params)}-parameter " if n_params else ""
    lines = [
        f"# {model_name}",
        "",
        f"A {size}GPT-2-architecture decoder-only model ({arch or 'see config.json'}), {origin}, for **{task}** "
        f"on {_data_description(data_cfg)}. Trained and evaluated with "
        "hftoolkit (`hftoolkit train`); the resolved recipe is in `hftoolkit/config.yaml`.",
        "",
    ]
    return lines


def _evaluation_section(run, dataset, lower) -> list[str]:
    # Both baseline and fine-tuned here; model-index (metadata) carries the fine-tuned scores only.
    lines = ["## Evaluation", ""]
    lines += results_table(run.baseline(), run.final(), lower)
    if note := publication_note(run.results):
        lines += ["", note]
    if sets := eval_set_tables(run.results, lower):
        lines += ["", "Each of the run's eval sets (the table above is the first's):", "", *sets]
    lines += [
        "",
        f"On `{dataset['name']}`"
        + (f" ({dataset['config']})" if dataset.get("config") else "")
        + (f", split `{dataset['split']}`" if dataset.get("split") else "")
        + (f", {dataset['num_examples']} examples" if dataset.get("num_examples") else "")
        + ". Scores are on a 0-100 scale"
        + (f"; {' and '.join(lower)} are lower-is-better." if any(k in lower for k in run.final()) else ".")
        + (" *baseline* is the model before fine-tuning, scored the same way." if run.baseline() else ""),
        "",
    ]
    return lines


def _prompt_section(cfg: dict, repo_id, info: ModelInfo) -> list[str]:
    lines: list[str] = []
    template = info.prompt_template
    stops = list(info.stop_strings)
    max_new_tokens = info.max_new_tokens or (cfg.get("eval") or {}).get("max_new_tokens") or 64
    num_beams = info.num_beams or (cfg.get("eval") or {}).get("num_beams") or 1
    if template:
        lines += [
            "## Prompt format",
            "",
            "Every prompt (training, evaluation, and yours) is rendered from this template; the model writes the "
            "completion after it:",
            "",
            *_fenced(template, "text"),
            "",
            f"Decoding: {'greedy' if num_beams == 1 else f'beam search with {num_beams} beams'}, at most "
            f"{max_new_tokens} new tokens, stopping at EOS"
            + (" or at " + ", ".join(f"`{json.dumps(s)}`" for s in stops) if stops else "")
            + ".",
            "",
        ]
    lines += [
        "## Usage",
        "",
        *_fenced(_usage_snippet(repo_id, template, stops, max_new_tokens, num_beams), "python"),
        "",
    ]
    return lines


def _training_section(run) -> list[str]:
    lines = ["## Training", "", "| hyperparameter | value |", "|---|---|"]
    for key, value in _hyperparameters(run.config):
        lines.append(f"| {key} | `{value}` |")
    summary = throughput_summary(run)
    compute = []
    if summary["steps"] is not None:
        epochs = [line["epoch"] for line in run.train if isinstance(line.get("epoch"), (int, float))]
        compute.append(
            f"{summary['steps']} optimizer steps" + (f" ({max(epochs):.2f} epochs)" if epochs else "")
        )
    if summary["tokens_per_second"] is not None:
        compute.append(f"{fmt(summary['tokens_per_second'])} tokens/s on average")
    losses = [line["loss"] for line in run.train if is_number(line.get("loss"))]
    if losses:
        compute.append(f"final training loss {fmt(losses[-1])}")
    if compute:
        lines += ["", "Compute: " + "; ".join(compute) + ". Curves are in `hftoolkit/plots/` when present."]
    lines.append("")
    return lines


def _samples_section(samples: list[dict]) -> list[str]:
    lines: list[str] = []
    if samples:
        lines += [
            "## Sample predictions",
            "",
            f"The first {len(samples)} evaluation examples (more in `hftoolkit/predictions_sample.jsonl`):",
            "",
        ]
        for i, row in enumerate(samples, 1):
            refs = row.get("references") or []
            score = f" (score {fmt(row.get('score'))})" if is_number(row.get("score")) else ""
            lines += [
                f"**Example {i}**{score}",
                "",
                "Prompt:",
                "",
                *_fenced(str(row.get("prompt", "")), "text"),
            ]
            lines += ["", "Reference:", "", *_fenced(str(refs[0] if refs else ""), "text")]
            lines += ["", "Prediction:", "", *_fenced(str(row.get("prediction", "")), "text"), ""]
    return lines


def _limitations_section(data_cfg: dict, context) -> list[str]:
    lines = ["## Limitations", ""]
    if context:
        max_seq_len = data_cfg.get("max_seq_len")
        lines.append(
            f"- Context window: {context} tokens (prompt plus generated tokens)."
            + (f" Training examples were cut to {max_seq_len} tokens." if max_seq_len else "")
        )
    lines.append(
        f"- Data: the model only knows what {_data_description(data_cfg)} and its base model taught it; "
        "expect errors and made-up facts outside that distribution."
    )
    if not data_cfg.get("dataset_name") and not data_cfg.get("train_file") and not data_cfg.get("sources"):
        lines.append("- The training data was synthetic: this model demonstrates the pipeline, nothing more.")
    lines.append(
        "- A small GPT-2-class model: not evaluated for safety, bias or factuality; not for production decisions."
    )
    lines += ["", "## Reproduce", "", *_fenced("hftoolkit train hftoolkit/config.yaml", "bash"), ""]
    return lines


def _usage_snippet(repo_id, template, stops, max_new_tokens, num_beams) -> str:
    fields = _template_fields(template) if template else []
    lines = [
        "from transformers import pipeline",
        "",
        f'generator = pipeline("text-generation", model="{repo_id or "REPO_ID"}")',
    ]
    if template:
        lines.append(f"PROMPT_TEMPLATE = {template!r}")
    lines.append(f"STOP_STRINGS = {stops!r}")
    lines.append("")
    if template and fields:
        args = ", ".join(f'{name}="Your {name.replace("_", " ")} here."' for name in fields)
        lines.append(f"prompt = PROMPT_TEMPLATE.format({args})")
    elif template:
        lines.append('prompt = PROMPT_TEMPLATE + "Your text here."')
    else:
        lines.append('prompt = "Your text here."')
    lines += [
        "out = generator(",
        "    prompt,",
        f"    max_new_tokens={int(max_new_tokens)},",
        f"    num_beams={int(num_beams)},",
        "    do_sample=False,",
        "    return_full_text=False,",
        "    stop_sequence=STOP_STRINGS or None,",
        ")",
        'completion = out[0]["generated_text"]',
        "for stop in STOP_STRINGS:  # generation halts after a stop string; cut it off",
        "    completion = completion.split(stop)[0]",
        "print(completion.strip())",
    ]
    return "\n".join(lines)


def _template_fields(template: str) -> list[str]:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError:  # stray braces: not a str.format template
        return []
    return list(dict.fromkeys(names))


def _fenced(text: str, lang: str) -> list[str]:
    """A code fence longer than any backtick run inside `text` (predictions can contain ```)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{lang}", text, fence]


def _hyperparameters(cfg: dict) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in (cfg.get("train") or {}).items():
        if value is None or isinstance(value, (dict, list)):
            continue
        rows.append((key, value))
    data_cfg = cfg.get("data") or {}
    for key in ("max_seq_len", "packing"):
        if key in data_cfg:
            rows.append((f"data.{key}", data_cfg[key]))
    if "seed" in cfg:
        rows.append(("seed", cfg["seed"]))
    return rows


def _data_description(data_cfg: dict) -> str:
    if data_cfg.get("sources"):
        return "a mixture of " + ", ".join(describe_source(s) for s in data_cfg["sources"])
    if data_cfg.get("dataset_name"):
        name = data_cfg["dataset_name"]
        config = f" ({data_cfg['dataset_config_name']})" if data_cfg.get("dataset_config_name") else ""
        return f"[{name}](https://huggingface.co/datasets/{name}){config}"
    if data_cfg.get("train_file"):
        return f"local data (`{Path(str(data_cfg['train_file'])).name}`)"
    return "synthetic data (`hftoolkit.synthetic`)"


def _eval_dataset(results: dict, data_cfg: dict) -> dict[str, Any]:
    """model-index wants a dataset name and type: results.json's eval_dataset, else what the recipe says."""
    recorded = dict(results.get("eval_dataset") or {})
    if not recorded.get("name"):
        if data_cfg.get("dataset_name"):
            recorded.update(name=data_cfg["dataset_name"], config=data_cfg.get("dataset_config_name"))
        elif data_cfg.get("validation_file"):
            recorded.update(name=Path(str(data_cfg["validation_file"])).name)
        else:
            recorded.update(name="synthetic")
    recorded["name"] = str(recorded["name"])
    return recorded


def hub_id(name: Any) -> str | None:
    """`name` if it can be a Hub id (metadata must not point at a local folder), else None."""
    if not isinstance(name, str) or not name or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _count_parameters(model_dir: Path) -> int:
    """Sum of tensor sizes from the safetensors headers (8-byte length + JSON), without loading weights."""
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info.get("shape", []):
                    count *= dim
                total += count
    return total


def _human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
