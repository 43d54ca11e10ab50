"""What every task is: a prompt template, a target, columns, metrics, decoding defaults, post-processing.

A task imports nothing heavy. The same `PromptTemplate` object renders training examples, evaluation
prompts, `hftoolkit generate` prompts and the model card.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from hftoolkit.errors import UserError


@dataclass(frozen=True)
class PromptTemplate:
    """`template` with {field} placeholders; `source_field` is the long field truncated when over budget."""

    template: str
    source_field: str
    target_prefix: str = " "

    def field_names(self) -> list[str]:
        return [name for _, name, _, _ in string.Formatter().parse(self.template) if name]

    def check(self, available: list[str]) -> None:
        names = self.field_names()
        if self.source_field and names.count(self.source_field) != 1:
            raise UserError(
                f"data.prompt_template: must contain {{{self.source_field}}} exactly once, got {self.template!r}"
            )
        unknown = sorted(set(names) - set(available))
        if unknown:
            raise UserError(
                f"data.prompt_template: unknown placeholder {{{unknown[0]}}}; available: "
                + ", ".join("{" + a + "}" for a in available)
            )

    def pieces(self, fields: dict[str, str]) -> tuple[str, str, str]:
        """(prefix, source, suffix) whose concatenation is the rendered prompt.

        Whitespace before the source stays with the source, so BPE sees " word" as GPT-2 does in running text.
        A template without a source field (nothing may be cut) is all prefix.
        """
        if not self.source_field:
            return self.template.format(**fields), "", ""
        before, after = self.template.split("{" + self.source_field + "}", 1)
        prefix = before.format(**fields)
        kept = prefix.rstrip(" ")
        return kept, prefix[len(kept) :] + fields[self.source_field], after.format(**fields)

    def render(self, fields: dict[str, str]) -> str:
        return "".join(self.pieces(fields))


# Lower is better for these in every task (every other score in results.json is 0-100, higher is better).
LOSS_METRICS = ("eval_loss", "perplexity")


class Task(Protocol):
    """One use case: everything that varies by task, so the rest of hftoolkit asks the task instead of branching on
    its name. Implementations live in one small file each and are registered in tasks/__init__.py; most of them
    inherit the common parts from `BaseTask`."""

    name: str
    metrics: tuple[str, ...]  # default evaluate metric names (default_metrics() may depend on the recipe)
    headline: str  # the results.json key that sums the task up (headline_metric() may depend on the recipe)
    stop_strings: tuple[str, ...]  # decoding stops here (besides EOS)
    generates: bool  # evaluation generates completions and scores them (False: loss / perplexity only)
    tokenization: Literal[
        "documents", "completion"
    ]  # packed documents, or prompt (masked) -> completion + EOS
    hub_task: tuple[str, str]  # model-index task type and its pretty name, for the model card
    lower_is_better: tuple[str, ...]  # score names where smaller wins

    def check_config(self, data_cfg) -> None: ...

    def default_metrics(self, data_cfg) -> tuple[str, ...]: ...

    def headline_metric(self, data_cfg) -> str: ...

    def extra_scores(
        self, predictions: list[str], references: list[list[str]], data_cfg
    ) -> dict[str, float]: ...

    def resolve(self, data_cfg) -> None: ...

    def template(self, data_cfg) -> PromptTemplate: ...

    def fields(self, row: dict[str, Any], data_cfg) -> dict[str, str]: ...

    def fixed_fields(self, data_cfg) -> dict[str, str]: ...

    def target(self, row: dict[str, Any], data_cfg) -> str: ...

    def references(self, row: dict[str, Any], data_cfg) -> list[str]: ...

    def required_columns(self, data_cfg, columns: list[str] | None = None) -> list[str]: ...

    def postprocess(self, completion: str, stop_strings) -> str: ...

    def scoring_text(self, prediction: str, data_cfg) -> str: ...

    def row_problem(self, row: dict[str, Any], data_cfg) -> str | None: ...

    def align_layout(self, ds, source_cfg, data_cfg): ...

    def score_examples(self, predictions: list[str], references: list[list[str]]) -> list[float | None]: ...

    def languages(self, data: dict[str, Any]) -> list[str] | None: ...

    def synthetic_rows(self, rng: random.Random, stream: str) -> Iterator[dict]: ...


class BaseTask:
    """Defaults shared by the tasks; a task overrides what differs."""

    stop_strings: tuple[str, ...] = ("\n",)
    generates = True
    tokenization = "completion"
    lower_is_better = LOSS_METRICS

    def check_config(self, data_cfg) -> None:
        """Cross-field checks of the recipe's data section for this task (config.validate calls it)."""

    def default_metrics(self, data_cfg) -> tuple[str, ...]:
        """The metrics scored when eval.metrics is not set (a task whose metrics depend on the recipe overrides)."""
        return self.metrics

    def headline_metric(self, data_cfg) -> str:
        """The score that sums the task up (results.json key)."""
        return self.headline

    def extra_scores(self, predictions: list[str], references: list[list[str]], data_cfg) -> dict[str, float]:
        """Scores only this task computes, merged into each evaluation's scores (e.g. out-of-label-set counts)."""
        return {}

    def resolve(self, data_cfg) -> None:
        """Fill data keys the task derives (before config.yaml is written, so it is the resolved config)."""

    def fixed_fields(self, data_cfg) -> dict[str, str]:
        """Template fields that come from the recipe rather than from a row (`hftoolkit generate` needs them)."""
        return {}

    def postprocess(self, completion: str, stop_strings) -> str:
        return cut_at_stop(completion, stop_strings)

    def row_problem(self, row: dict[str, Any], data_cfg) -> str | None:
        """Why this row can be neither trained on nor scored, as "<reason> <column>" ("null summary", "empty
        document", "whitespace-only text", "empty target"), or None. The built-in tasks need every column they
        read; a task with optional prompt fields overrides this."""
        for name in self.required_columns(data_cfg, list(row)):
            if name not in row:
                return f"missing {name}"
            if (reason := blank_reason(row[name])) is not None:
                return f"{reason} {name}"
        if not self.target(row, data_cfg).strip():  # e.g. a translation pair whose target language is null
            return "empty target"
        if self.tokenization == "completion":
            source = self.template(data_cfg).source_field
            if source and not self.fields(row, data_cfg).get(source, "").strip():
                return "empty source"
        return None

    def align_layout(self, ds, source_cfg, data_cfg):
        """A dataset whose columns were renamed to the recipe's (hftoolkit.mixture), with its values in the layout
        that `data_cfg` reads and one schema across datasets; `source_cfg` is how the dataset's own rows are read.
        Plain columns need nothing; dict layouts (translation pairs, SQuAD answers) override this."""
        return ds

    def scoring_text(self, prediction: str, data_cfg) -> str:
        """The prediction as the metrics see it (QA maps data.no_answer_text to the empty answer)."""
        return prediction

    def score_examples(self, predictions: list[str], references: list[list[str]]) -> list[float | None]:
        """A 0-100 score per example for predictions.jsonl (the report's best/worst listings); None: no score."""
        return [None] * len(predictions)

    def languages(self, data: dict[str, Any]) -> list[str] | None:
        """ISO 639 codes of the model card's `language:` metadata (None: not stated)."""
        return None


def column(row: dict[str, Any], name: str, what: str) -> Any:
    if name not in row:
        raise UserError(f"{what}: column '{name}' not in the data (columns: {', '.join(map(str, row))})")
    return row[name]


def blank_reason(value: Any) -> str | None:
    """ "null", "empty" or "whitespace-only" when a cell holds no text (lists and SQuAD answers: no item with
    text), else None."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return None if value.strip() else ("whitespace-only" if value else "empty")
    if isinstance(value, dict) and "text" in value:
        value = value["text"]
    if isinstance(value, (list, tuple)):
        return None if any(blank_reason(v) is None for v in value) else "empty"
    return None


def as_text(value: Any) -> str:
    """A cell as one string: lists of sentences (SciTLDR-style) are joined with spaces."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v).strip() for v in value if v is not None)
    return "" if value is None else str(value)


def as_references(value: Any) -> list[str]:
    """A cell as a list of references (one or several)."""
    if isinstance(value, dict) and "text" in value:  # SQuAD `answers`
        value = value["text"]
    if isinstance(value, (list, tuple)):
        refs = [str(v).strip() for v in value if v is not None and str(v).strip()]
        return refs or [""]
    return [as_text(value).strip()]


def cut_at_stop(completion: str, stop_strings) -> str:
    """Everything before the first stop string, stripped (generation may run past it within a batch)."""
    cut = len(completion)
    for stop in stop_strings or ():
        if stop and (i := completion.find(stop)) != -1:
            cut = min(cut, i)
    return completion[:cut].strip()


def first_present(candidates: tuple[str, ...], columns: list[str] | None) -> str:
    """The first candidate column present in `columns` (the Hub layouts differ in names); else the first."""
    if columns:
        for name in candidates:
            if name in columns:
                return name
    return candidates[0]
