"""Metric names → `evaluate` modules: the bundled offline modules first, then `evaluate.load`.

Usage: from hftoolkit import metrics; metrics.load("rouge").compute(predictions=["a b"], references=["a b"])

Public API:
    BUNDLED_METRICS                              names served offline from hftoolkit/metrics_modules/
    load(name, **kwargs) -> EvaluationModule     a bundled module, else evaluate.load(name, **kwargs)
    describe(module, nrefs=None, **compute_kwargs) -> dict   what a score was computed with, for results.json
    signature(name, nrefs=None, **compute_kwargs) -> str     the same as one "key:value|..." line

`describe` is the primary form (rather than a bare signature string): every metric gets one JSON-able dict with
its name, the scoring library and its version, and the settings that change the numbers, including sacreBLEU's
own signature string for sacrebleu/chrf. `signature` is a convenience over it: for sacrebleu/chrf it is exactly
sacreBLEU's signature. Settings are passed at `compute()` time in these modules, not stored in them, so both
take the same keyword arguments as `compute()`.

The bundled modules are real `evaluate` modules (loaded from their folders with `evaluate.load(path)`), with
the arguments, output keys and value scales of the Hub modules of the same name: rouge and exact_match 0-1;
sacrebleu, chrf, squad, squad_v2 0-100; perplexity as is. Where they differ from the Hub, each module's docstring says so.
"""

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import evaluate
import huggingface_hub.constants
from evaluate.utils.file_utils import DownloadConfig

from hftoolkit import __version__

BUNDLED_METRICS = ("rouge", "sacrebleu", "chrf", "squad", "squad_v2", "exact_match", "perplexity")
MODULES_DIR = Path(__file__).resolve().parent / "metrics_modules"

# Defaults of each bundled module's compute(); kept here so describe() reports what was actually used.
_ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
_ROUGE_BOOTSTRAP_SEED = 0  # the fixed seed in metrics_modules/rouge/rouge.py


def module_path(name: str) -> Path:
    """The folder of a bundled module (it holds one file, `<name>.py`)."""
    if name not in BUNDLED_METRICS:
        raise ValueError(f"{name!r} is not a bundled metric (bundled: {', '.join(BUNDLED_METRICS)})")
    return MODULES_DIR / name


def load(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Returns the `evaluate` module for `name`: bundled (offline) when it is one, else `evaluate.load`.

    `kwargs` go to `evaluate.load` (config_name, experiment_id, keep_in_memory, num_process, process_id,
    cache_dir, ...). A name that is neither bundled nor loadable by evaluate (for instance a Hub metric while
    offline) raises ValueError listing the bundled names.
    """
    if name in BUNDLED_METRICS:
        return evaluate.load(str(module_path(name)), **kwargs)
    if huggingface_hub.constants.HF_HUB_OFFLINE and "download_config" not in kwargs:
        # evaluate only honours its own HF_EVALUATE_OFFLINE and otherwise retries the Hub with sleeps;
        # under HF_HUB_OFFLINE it should look in its local cache only.
        kwargs["download_config"] = DownloadConfig(local_files_only=True)
    try:
        return evaluate.load(name, **kwargs)
    except OSError as err:  # FileNotFoundError, ConnectionError, Hub HTTP errors: the name did not resolve
        reason = " ".join(str(err).split())
        raise ValueError(
            f"unknown metric {name!r}: not bundled (bundled: {', '.join(BUNDLED_METRICS)}) "
            f"and evaluate.load failed: {reason}"
        ) from err


def _library_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nrefs(references: Any, nrefs: int | str | None) -> int | str:
    """References per example as sacreBLEU's signature counts them: a number, or 'var' when they differ."""
    if nrefs is not None:
        return nrefs
    if references is None:
        return 1
    counts = {1 if isinstance(refs, str) else len(refs) for refs in references}
    return counts.pop() if len(counts) == 1 else "var"


def _sacrebleu_signature(metric: Any, nrefs: int | str) -> str:
    # sacreBLEU only learns the reference count while scoring; -1 is its own code for "variable".
    metric.num_refs = -1 if nrefs == "var" else nrefs
    return metric.get_signature().format()


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    return repr(value)


def _describe_sacrebleu(name: str, kwargs: dict[str, Any], nrefs) -> dict[str, Any]:
    import sacrebleu

    bleu = sacrebleu.BLEU(
        lowercase=kwargs.get("lowercase", False),
        force=kwargs.get("force", False),
        tokenize=kwargs.get("tokenize"),
        smooth_method=kwargs.get("smooth_method", "exp"),
        smooth_value=kwargs.get("smooth_value"),
        effective_order=kwargs.get("use_effective_order", False),
    )
    return {
        "name": name,
        "library": "sacrebleu",
        "library_version": sacrebleu.__version__,
        "signature": _sacrebleu_signature(bleu, nrefs),
    }


def _describe_chrf(name: str, kwargs: dict[str, Any], nrefs) -> dict[str, Any]:
    import sacrebleu

    chrf = sacrebleu.CHRF(
        char_order=kwargs.get("char_order", sacrebleu.CHRF.CHAR_ORDER),
        word_order=kwargs.get("word_order", sacrebleu.CHRF.WORD_ORDER),
        beta=kwargs.get("beta", sacrebleu.CHRF.BETA),
        lowercase=kwargs.get("lowercase", False),
        whitespace=kwargs.get("whitespace", False),
        eps_smoothing=kwargs.get("eps_smoothing", False),
    )
    return {
        "name": name,
        "library": "sacrebleu",
        "library_version": sacrebleu.__version__,
        "signature": _sacrebleu_signature(chrf, nrefs),
    }


def _describe_rouge(name: str, kwargs: dict[str, Any], nrefs) -> dict[str, Any]:
    use_aggregator = bool(kwargs.get("use_aggregator", True))
    description = {
        "name": name,
        "library": "rouge_score",
        "library_version": _library_version("rouge_score"),
        "rouge_types": list(kwargs.get("rouge_types") or _ROUGE_TYPES),
        "use_stemmer": bool(kwargs.get("use_stemmer", False)),
        "tokenizer": "default" if kwargs.get("tokenizer") is None else "custom",
        "use_aggregator": use_aggregator,
    }
    if use_aggregator:
        description["aggregation"] = f"bootstrap mid F-measure, 1000 samples, seed {_ROUGE_BOOTSTRAP_SEED}"
    return description


def _describe_squad(name: str, kwargs: dict[str, Any], nrefs) -> dict[str, Any]:
    description = {
        "name": name,
        "library": "hftoolkit",
        "library_version": __version__,
        "normalization": "official SQuAD script: lowercase, strip punctuation and a/an/the, collapse spaces",
    }
    if name == "squad_v2":
        description["no_answer_threshold"] = float(kwargs.get("no_answer_threshold", 1.0))
    return description


def _describe_exact_match(name: str, kwargs: dict[str, Any], nrefs) -> dict[str, Any]:
    return {
        "name": name,
        "library": "hftoolkit",
        "library_version": __version__,
        **{
            key: _json_safe(kwargs.get(key, default))
            for key, default in (
                ("regexes_to_ignore", None),
                ("ignore_case", False),
                ("ignore_punctuation", False),
                ("ignore_numbers", False),
            )
        },
    }


def _describe_perplexity(name: str, kwargs: dict[str, Any], nrefs) -> dict[str, Any]:
    return {
        "name": name,
        "library": "transformers",
        "library_version": _library_version("transformers"),
        "model_id": _json_safe(kwargs.get("model_id")),
        "add_start_token": bool(kwargs.get("add_start_token", True)),
        "max_length": kwargs.get("max_length"),
    }


# The settings that change each bundled metric's numbers (and its library).
_DESCRIBERS = {
    "sacrebleu": _describe_sacrebleu,
    "chrf": _describe_chrf,
    "rouge": _describe_rouge,
    "squad": _describe_squad,
    "squad_v2": _describe_squad,
    "exact_match": _describe_exact_match,
    "perplexity": _describe_perplexity,
}


def describe(
    module: evaluate.EvaluationModule | str, nrefs: int | str | None = None, **compute_kwargs: Any
) -> dict[str, Any]:
    """A small JSON-able description of how `module` scores with these `compute()` keyword arguments.

    `module` is a loaded module (or its name); `compute_kwargs` are the keyword arguments given to `compute()`.
    `predictions` is ignored; sacreBLEU's `nrefs` (references per example, or "var") is `nrefs` when given,
    else counted from `references` when given, else 1. Always has `name`, `library` and `library_version`; bundled metrics add
    the settings that change their values, e.g. for sacrebleu
    `{"name": "sacrebleu", "library": "sacrebleu", "library_version": "2.6.0",
      "signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"}`.
    """
    if hasattr(module, "evaluation_modules"):  # evaluate.combine([...])
        return {
            "name": "combined",
            "modules": [describe(member, nrefs, **compute_kwargs) for member in module.evaluation_modules],
        }
    name = module if isinstance(module, str) else module.name
    nrefs = _nrefs(compute_kwargs.pop("references", None), nrefs)
    compute_kwargs.pop("predictions", None)
    kwargs = compute_kwargs
    if (describer := _DESCRIBERS.get(name)) is not None:
        return describer(name, kwargs, nrefs)
    return {
        "name": name,
        "library": "evaluate",
        "library_version": evaluate.__version__,
        "compute_kwargs": _json_safe(kwargs),
    }


def signature(name: str, nrefs: int | str | None = None, **compute_kwargs: Any) -> str:
    """`describe` as one line: sacreBLEU's own signature for sacrebleu/chrf, else "key:value|..." of the rest.

    >>> signature("sacrebleu")  # doctest: +SKIP
    'nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0'
    """
    description = describe(name, nrefs, **compute_kwargs)
    if "signature" in description:
        return description["signature"]
    return "|".join(
        f"{key}:{json.dumps(value) if isinstance(value, list | dict) else value}"
        for key, value in description.items()
    )


# ---------------------------------------------------------------------------------------------------------------
# Per-example scores (0-100) for predictions.jsonl: tasks pick one in Task.score_examples.


def squad_inputs(predictions: list[str], references: list[list[str]]) -> tuple[list[dict], list[dict]]:
    """Plain texts in the squad modules' input layout (ids are positions; answer starts are not scored)."""
    preds = [{"id": str(i), "prediction_text": p} for i, p in enumerate(predictions)]
    refs = [
        {"id": str(i), "answers": {"text": r, "answer_start": [0] * len(r)}} for i, r in enumerate(references)
    ]
    return preds, refs


def rouge_per_example(predictions: list[str], references: list[list[str]], key: str) -> list[float]:
    out = load("rouge").compute(
        predictions=predictions, references=references, use_stemmer=True, use_aggregator=False
    )
    return [100.0 * float(v) for v in out[key]]


def bleu_per_example(predictions: list[str], references: list[list[str]]) -> list[float]:
    """sacreBLEU's sentence BLEU (exponential smoothing, effective n-gram order): the corpus headline's
    per-example counterpart (corpus BLEU is not a mean of sentence BLEUs, so these only rank examples)."""
    import sacrebleu

    return [float(sacrebleu.sentence_bleu(p, r).score) for p, r in zip(predictions, references, strict=True)]


def squad_f1_per_example(predictions: list[str], references: list[list[str]]) -> list[float]:
    module = load("squad")
    scores = []
    for p, r in zip(predictions, references, strict=True):
        preds, refs = squad_inputs([p], [r])
        scores.append(float(module.compute(predictions=preds, references=refs)["f1"]))
    return scores
