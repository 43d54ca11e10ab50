"""Evaluation suites: a benchmark as data (eval/*.yaml), scored on any checkpoint the way training scores.

Usage: hftoolkit eval --suite eval/xsum.yaml MODEL_OR_RUN_DIR [--limit N] [key.sub=value ...]
       hftoolkit eval --suite all RUN_DIR            (every suite of the model's task)

A suite's `data:` and `eval:` sections are recipe keys, so the same Task objects, prompt templates, generation
batches and metric modules as `hftoolkit train` run; `metric_config:` pins the metrics' compute() settings and
`pinned:` what metrics.describe must report for them (sacreBLEU's signature without its version); `references:`
are published scores, kept as data for the report and the card, never as expected values. Results go to the
`suites` section of OUTPUT/results.json (a run directory's own results.json when one is given).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hftoolkit import rundir
from hftoolkit.errors import UserError

SUITE_KEYS = {
    "suite", "task", "description", "data", "eval", "join", "metric_config", "pinned", "report", "local_layout",
    "references", "entries",
}  # fmt: skip
LOCAL_FILE_KEYS = ("data.validation_file", "data.train_file")


@dataclass
class Suite:
    """One benchmark: what to load, how to prompt and decode, how to score, and what others published."""

    name: str
    task: str
    path: Path
    data: dict[str, Any]
    eval: dict[str, Any] = field(default_factory=dict)
    join: str | None = None  # generation: score the split as one text, its rows joined by this string
    metric_config: dict[str, dict] = field(default_factory=dict)
    pinned: dict[str, dict] = field(default_factory=dict)
    report: list[str] = field(default_factory=list)  # the scores `hftoolkit report` shows
    local_layout: str = ""  # what a local copy must look like (for the can't-load message)
    references: list[dict] = field(default_factory=list)


def suites_dir() -> Path:
    """eval/ next to the recipes: the source checkout's, else the installed package's copy (eval_suites)."""
    from hftoolkit.recipes import recipes_root

    for candidate in (recipes_root().parent / "eval", Path(__file__).resolve().parent / "eval_suites"):
        if candidate.is_dir():
            return candidate
    raise UserError("eval/: the evaluation suites are not next to the hftoolkit package (broken install?)")


def read_suite(path: str | Path) -> Suite:
    """A suite YAML (a path, or the name of a shipped one, e.g. xsum)."""
    p = Path(path)
    if not p.is_file() and not p.suffix:
        p = (suites_dir() / f"{path}.yaml").resolve()  # messages name eval/, not the package's link to it
    if not p.is_file():
        names = ", ".join(s.name for s in list_suites())
        raise UserError(f"--suite: {path}: no such suite file (shipped suites: {names}, or all)")
    raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict) or "entries" in raw or "data" not in raw:
        raise UserError(f"--suite: {p} is not an evaluation suite (it needs suite:, task: and data: keys)")
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise UserError(f"--suite: {p}: unknown key '{unknown[0]}' (valid: {', '.join(sorted(SUITE_KEYS))})")
    return Suite(
        name=str(raw.get("suite") or p.stem),
        task=str(raw.get("task") or "generation"),
        path=p,
        data=dict(raw["data"]),
        eval=dict(raw.get("eval") or {}),
        join=raw.get("join"),
        metric_config=dict(raw.get("metric_config") or {}),
        pinned=dict(raw.get("pinned") or {}),
        report=list(raw.get("report") or []),
        local_layout=str(raw.get("local_layout") or ""),
        references=list(raw.get("references") or []),
    )


def list_suites(task: str | None = None) -> list[Suite]:
    """The shipped suites (the quickstart suite is another kind: it trains recipes), optionally of one task."""
    out = []
    for path in sorted(suites_dir().glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if isinstance(raw, dict) and "data" in raw and (task is None or raw.get("task") == task):
            out.append(read_suite(path))
    return out


# ---------------------------------------------------------------------------------------------- target


@dataclass
class Target:
    """What is scored and where the results go."""

    model: str  # a model folder or Hub id
    out: Path
    run_dir: Path | None  # set when a run directory was given: its results.json and card get the suites
    task: str | None  # from model/hftoolkit.json (None: a plain checkpoint)


def resolve_target(model_or_run: str, output_dir: str | None) -> Target:
    path = Path(model_or_run).expanduser()
    if (path / rundir.MODEL_DIR).is_dir() and (path / rundir.CONFIG).is_file():
        info = rundir.ModelInfo.read(path / rundir.MODEL_DIR)
        task = info.task if info else rundir.read_run(path).task
        out = Path(output_dir) if output_dir else path
        return Target(str(path / rundir.MODEL_DIR), out, path if out == path else None, task)
    info = rundir.ModelInfo.read(path) if path.is_dir() else None
    name = path.name if path.is_dir() else model_or_run.replace("/", "--")
    out = Path(output_dir) if output_dir else Path("runs") / "suites" / name
    return Target(model_or_run, out, None, info.task if info else None)


def suites_for(spec: str, target: Target) -> list[Suite]:
    if spec != "all":
        return [read_suite(spec)]
    if target.task is None:
        raise UserError(
            f"--suite all: {target.model} does not say its task (no hftoolkit.json); name a suite instead, "
            f"e.g. --suite {suites_dir() / 'xsum.yaml'}"
        )
    found = list_suites(target.task)
    if not found:
        raise UserError(f"--suite all: no shipped suite for task {target.task}")
    return found


# ---------------------------------------------------------------------------------------------- recipe


def suite_recipe(suite: Suite, target: Target, limit: int | None, overrides: list[str]):
    """The suite as a recipe (data/eval keys as written), the user's overrides on top. A local-file override
    replaces the Hub dataset (a recipe has exactly one data source)."""
    from hftoolkit.config import recipe_from_dict

    data = copy.deepcopy(suite.data)
    if any(o.split("=", 1)[0].strip() in LOCAL_FILE_KEYS for o in overrides):
        data.pop("dataset_name", None)
        data.pop("dataset_config_name", None)
    if limit is not None:
        data["max_eval_samples"] = limit
    raw = {
        "task": suite.task,
        "output_dir": str(target.out),
        "model": {"name_or_path": target.model},
        "data": data,
        "eval": copy.deepcopy(suite.eval),
    }
    return recipe_from_dict(raw, overrides)


def load_eval_split(suite: Suite, recipe, task, out: Path):
    """(the suite's split as a Dataset, {reason: rows dropped}); only that split is read from the Hub."""
    from hftoolkit.data import check_columns, drop_bad_rows, load_raw_splits

    d = recipe.data
    if d.dataset_name is None and suite.join is None:
        splits, bad = load_raw_splits(recipe, out, task)
        return splits["validation"], bad.get("validation", {})
    from datasets import load_dataset

    if d.dataset_name is None:  # one text: blank rows are part of it, as in the Hub copy
        from hftoolkit.data import _load_files

        ds = _load_files(d)
        ds = ds["validation"] if "validation" in ds else ds["train"]
        return _limited(ds, d.max_eval_samples), {}
    try:
        ds = load_dataset(d.dataset_name, d.dataset_config_name, split=d.validation_split)
    except Exception as e:
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        config = f" ({d.dataset_config_name})" if d.dataset_config_name else ""
        raise UserError(
            f"suite {suite.name}: cannot load {d.dataset_name}{config} split {d.validation_split} ({reason}); "
            f"point it at a local copy with data.validation_file=FILE ({suite.local_layout or 'same columns'})"
        ) from None
    check_columns(task, d, ds, "validation")
    bad: dict = {}
    if suite.join is None:
        ds, bad = drop_bad_rows(task, d, ds, "validation", d.dataset_name)
    return _limited(ds, d.max_eval_samples), bad


def _limited(ds, limit: int | None):
    return ds if limit is None else ds.select(range(min(limit, len(ds))))


# ---------------------------------------------------------------------------------------------- scoring


def run_suites(spec: str, model_or_run: str, limit=None, overrides=(), output_dir=None) -> dict[str, dict]:
    """Score every suite of `spec` on the model; write results.json's `suites` (and the card of a run dir).
    One accelerator for all of them: under `accelerate launch` each process runs this with its share."""
    from hftoolkit.run import make_accelerator

    target = resolve_target(model_or_run, output_dir)
    suites = suites_for(spec, target)
    recipes = [suite_recipe(suite, target, limit, list(overrides)) for suite in suites]
    acc = make_accelerator(recipes[0])
    if acc.is_main_process:
        rundir.acquire_lock(target.out, acc.print)
    try:
        return {s.name: run_suite(s, r, target, acc, limit) for s, r in zip(suites, recipes, strict=True)}
    finally:
        acc.end_training()
        rundir.release_lock(target.out)


def run_suite(suite: Suite, recipe, target: Target, acc, limit: int | None = None) -> dict:
    from hftoolkit.modeling import context_length, load_model_and_tokenizer
    from hftoolkit.tasks import get_task

    task = get_task(recipe.task)
    task.resolve(recipe.data)
    with acc.main_process_first():
        rows, bad = load_eval_split(suite, recipe, task, target.out)
    model, tokenizer = load_model_and_tokenizer(recipe.model, None, seed=recipe.seed)
    ctx = context_length(model)
    if ctx is not None and recipe.data.max_seq_len > ctx:
        recipe.data.max_seq_len = ctx  # windows and prompts of the model's own context length
    model = acc.prepare(model)
    start = time.perf_counter()
    if task.generates:
        scores, metric_config, preds = _generate_and_score(
            suite, recipe, task, acc, model, tokenizer, ctx, rows
        )
    else:
        scores, preds = _perplexity(suite, recipe, task, acc, model, tokenizer, rows), None
        metric_config = {"perplexity": perplexity_config(suite, scores)}
    entry = _entry(suite, recipe, scores, metric_config, len(rows), bad, limit, time.perf_counter() - start)
    if acc.is_main_process:
        _write(target, suite, entry, preds)
        acc.print(f"suite {suite.name}: " + ", ".join(f"{k} {v:g}" for k, v in entry["metrics"].items()))
    acc.wait_for_everyone()
    return entry


def _generate_and_score(suite, recipe, task, acc, model, tokenizer, ctx, rows):
    from hftoolkit.evaluation import generate_predictions, prediction_rows, score_generations
    from hftoolkit.run import Run, build_generation_eval

    run = Run(recipe, acc, task, model, tokenizer, context=ctx)
    build_generation_eval(run, rows)
    preds = generate_predictions(
        acc, model, tokenizer, task, run.gen_set, run.gen_loaders["full"], run.decoding
    )
    names = recipe.eval.metrics or list(task.default_metrics(recipe.data))
    scores, metric_config = score_generations(
        task, recipe.data, names, run.gen_set, preds, suite.metric_config
    )
    check_pinned(suite, metric_config)
    return scores, metric_config, prediction_rows(task, recipe.data, run.gen_set, preds)


def _perplexity(suite, recipe, task, acc, model, tokenizer, rows) -> dict:
    """Sliding-window perplexity of the split: as one text joined by `join` (the guide's WikiText reading), else
    as the document stream training evaluates."""
    from hftoolkit.evaluation import document_stream, joined_stream, sliding_window_perplexity

    data = recipe.data
    if suite.join is not None:
        ids, scored = joined_stream([task.target(r, data) for r in rows.to_list()], suite.join, tokenizer)
    else:
        ids, scored = document_stream(task, tokenizer, rows.to_list(), data)
    window = data.max_seq_len
    stride = min(recipe.eval.perplexity_stride or window, window)
    e = recipe.eval
    return sliding_window_perplexity(acc, model, ids, scored, window, stride, e.per_device_eval_batch_size)


def perplexity_config(suite: Suite, scores: dict) -> dict:
    """How a suite's perplexity was computed (model-index metric settings)."""
    return {
        "name": "perplexity",
        "method": "sliding window (transformers: perplexity of fixed-length models)",
        "window": scores["ppl_window"],
        "stride": scores["ppl_stride"],
        "tokens": scores["ppl_tokens"],
        "join": suite.join,
    }


def check_pinned(suite: Suite, metric_config: dict) -> None:
    """The metric settings the suite pins must be the ones used (a sacreBLEU signature is compared without its
    version field, which follows the installed library)."""
    for name, expected in suite.pinned.items():
        got = metric_config.get(name) or {}
        for key, value in expected.items():
            have = got.get(key)
            if key == "signature":
                value, have = _unversioned(value), _unversioned(have or "")
            if have != value:
                raise UserError(
                    f"suite {suite.name}: metric {name} ran with {key}={have!r}, the suite pins {value!r}; "
                    f"fix metric_config in {suite.path}"
                )


def _unversioned(signature: str) -> str:
    return "|".join(part for part in str(signature).split("|") if not part.startswith("version:"))


def _entry(suite, recipe, scores, metric_config, n_rows, bad, limit, seconds) -> dict:
    """The results.json `suites.<name>` record (also what the card and the report read)."""
    d = recipe.data
    local = d.validation_file or d.train_file
    return {
        "suite": suite.name,
        "task": suite.task,
        "dataset": {
            # A local copy is named by its file: the card must not claim the Hub dataset was scored.
            "name": Path(str(local)).name if local else suite.data.get("dataset_name"),
            "benchmark": suite.data.get("dataset_name"),
            "config": suite.data.get("dataset_config_name"),
            "split": suite.data.get("validation_split", "validation"),
            "local_file": str(local) if local else None,
            "num_examples": n_rows,
            "bad_rows": bad,
            "limit": limit,
        },
        "settings": {
            "prompt_template": recipe.data.prompt_template,
            "max_seq_len": d.max_seq_len,
            "max_new_tokens": recipe.eval.max_new_tokens,
            "num_beams": recipe.eval.num_beams,
            "perplexity_stride": recipe.eval.perplexity_stride,
            "join": suite.join,
        },
        "metrics": {k: round(float(v), 4) for k, v in scores.items()},
        "metric_config": metric_config,
        "report": suite.report,
        "references": suite.references,
        "seconds": round(seconds, 1),
    }


def _write(target: Target, suite: Suite, entry: dict, preds: list[dict] | None) -> None:
    results = rundir.read_results(target.out)
    results.setdefault("suites", {})[suite.name] = entry
    rundir.write_results(target.out, results)
    if preds is not None:
        folder = target.out / "suites" / suite.name
        folder.mkdir(parents=True, exist_ok=True)
        rundir.write_predictions(folder, preds)
    if target.run_dir is not None:
        from hftoolkit.atomic import atomic_write_text
        from hftoolkit.card import build_model_card

        atomic_write_text(target.out / "README.md", str(build_model_card(target.out)))
