"""What every task is: a prompt template, a target, columns, metrics, decoding defaults, post-processing.

A task imports nothing heavy. The same `PromptTemplate` object renders training examples, evaluation
prompts, `hftoolkit generate` prompts and the model card.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Protocol

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
        if names.count(self.source_field) != 1:
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
        """
        before, after = self.template.split("{" + self.source_field + "}", 1)
        prefix = before.format(**fields)
        kept = prefix.rstrip(" ")
        return kept, prefix[len(kept) :] + fields[self.source_field], after.format(**fields)

    def render(self, fields: dict[str, str]) -> str:
        return "".join(self.pieces(fields))


class Task(Protocol):
    """One use case. Implementations live in one small file each and are registered in tasks/__init__.py."""

    name: str
    metrics: tuple[str, ...]  # default evaluate metric names
    headline: str  # the results.json key the quickstart table and best-checkpoint tracking use
    stop_strings: tuple[str, ...]  # decoding stops here (besides EOS)
    generates: bool  # evaluation generates completions (False: loss / perplexity only)

    def template(self, data_cfg) -> PromptTemplate: ...

    def fields(self, row: dict[str, Any], data_cfg) -> dict[str, str]: ...

    def target(self, row: dict[str, Any], data_cfg) -> str: ...

    def references(self, row: dict[str, Any], data_cfg) -> list[str]: ...

    def required_columns(self, data_cfg) -> list[str]: ...

    def postprocess(self, completion: str, stop_strings) -> str: ...


def column(row: dict[str, Any], name: str, what: str) -> Any:
    if name not in row:
        raise UserError(f"{what}: column '{name}' not in the data (columns: {', '.join(map(str, row))})")
    return row[name]


def as_text(value: Any) -> str:
    """A cell as one string: lists of sentences (SciTLDR-style) are joined with spaces."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v).strip() for v in value)
    return "" if value is None else str(value)


def as_references(value: Any) -> list[str]:
    """A cell as a list of references (one or several)."""
    if isinstance(value, dict) and "text" in value:  # SQuAD `answers`
        value = value["text"]
    if isinstance(value, (list, tuple)):
        refs = [str(v).strip() for v in value if str(v).strip()]
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
