"""Any prompt → completion: `data.prompt_template` over any columns → ` target<eos>` (classification, instructions,
data-to-text, rewriting).

The target is `data.target_column` (with `data.labels`, an integer class id names its label) or
`data.target_template` over several columns. `data.truncate_column` is the template field cut when an example
is over budget. With `data.labels` it is a classifier: scored by exact match, with out-of-set predictions counted.
"""

from __future__ import annotations

import functools
import string

from hftoolkit.errors import UserError
from hftoolkit.tasks.base import BaseTask, PromptTemplate, as_text, blank_reason, column

# The synthetic set: route a support message to its team by the keyword it mentions.
SYNTHETIC_TEMPLATE = "Message: {text}\nCategory:"
ROUTES = {
    "billing": ("invoice", "refund", "charge", "payment", "receipt", "bill", "price", "discount"),
    "shipping": ("package", "parcel", "delivery", "courier", "tracking", "shipment", "carrier", "postage"),
    "technical": ("app", "screen", "crash", "error", "bug", "update", "battery", "wifi"),
    "account": ("password", "username", "email", "profile", "signup", "settings", "login", "verification"),
    "feedback": ("compliment", "suggestion", "survey", "review", "praise", "idea", "opinion", "comment"),
}
_NAMES = ("Ann", "Bob", "Carl", "Dana", "Eve", "Finn", "Gia", "Hal", "Ida", "Jon", "Kim", "Lou", "Max", "Noa")
_OPENERS = ("hi ,", "hello ,", "good morning ,", "hey there ,", "dear team ,")
_PHRASES = (
    "my {kw} is wrong", "there is a problem with my {kw}", "I have a question about the {kw}",
    "please look at my {kw}", "the {kw} needs attention", "I want to talk about the {kw}",
)  # fmt: skip
_WHEN = ("today", "since monday", "this week", "again", "for two days", "right now", "once more")


@functools.cache  # called for every row while tokenizing and checking rows: parse each template once
def template_fields(template: str) -> tuple[str, ...]:
    try:
        return tuple(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(template) if name))
    except ValueError as e:  # "{" without "}" and the like
        raise UserError(f"data.prompt_template: not a {{field}} template ({e}): {template!r}") from None


class CompletionTask(BaseTask):
    name = "completion"
    metrics = ("rouge",)
    headline = "rougeL"
    stop_strings: tuple[str, ...] = ()  # completions may span lines (instructions); they end at EOS
    hub_task = ("text-generation", "Text Generation")

    def default_metrics(self, data_cfg) -> tuple[str, ...]:
        return ("exact_match",) if data_cfg.labels else ("rouge",)

    def headline_metric(self, data_cfg) -> str:
        return "exact_match" if data_cfg.labels else "rougeL"

    def check_config(self, data_cfg) -> None:
        if data_cfg.synthetic is not None:
            return  # resolve() fills the synthetic set's template, target and labels
        if not data_cfg.prompt_template:
            raise UserError(
                'data.prompt_template: required for task completion, e.g. "{instruction}\\n{input}\\n### Response:"'
            )
        if (data_cfg.target_column is None) == (data_cfg.target_template is None):
            raise UserError("data.target_column / data.target_template: set exactly one for task completion")
        fields = template_fields(data_cfg.prompt_template)
        if data_cfg.truncate_column is not None and data_cfg.truncate_column not in fields:
            raise UserError(
                f"data.truncate_column: '{data_cfg.truncate_column}' is not a field of data.prompt_template "
                f"(fields: {', '.join(fields) or 'none'})"
            )

    def resolve(self, data_cfg) -> None:
        if data_cfg.synthetic is not None:
            data_cfg.prompt_template = data_cfg.prompt_template or SYNTHETIC_TEMPLATE
            if data_cfg.target_template is None:
                data_cfg.target_column = data_cfg.target_column or "label"
            data_cfg.labels = data_cfg.labels or list(ROUTES)
        fields = template_fields(data_cfg.prompt_template)
        if data_cfg.truncate_column is None and fields:
            data_cfg.truncate_column = fields[-1]

    def template(self, data_cfg) -> PromptTemplate:
        # A template without fields (a fixed instruction) still renders; nothing in it can be cut.
        return PromptTemplate(data_cfg.prompt_template, source_field=data_cfg.truncate_column or "")

    def required_columns(self, data_cfg, columns=None) -> list[str]:
        target = [data_cfg.target_column] if data_cfg.target_column else []
        if data_cfg.target_template:
            target = template_fields(data_cfg.target_template)
        return list(dict.fromkeys(template_fields(data_cfg.prompt_template) + tuple(target)))

    def fields(self, row, data_cfg) -> dict[str, str]:
        return {
            name: as_text(column(row, name, "data.prompt_template")).strip()
            for name in template_fields(data_cfg.prompt_template)
        }

    def target(self, row, data_cfg) -> str:
        if data_cfg.target_template:
            names = template_fields(data_cfg.target_template)
            values = {n: as_text(column(row, n, "data.target_template")).strip() for n in names}
            return data_cfg.target_template.format(**values).strip()
        value = column(row, data_cfg.target_column, "data.target_column")
        labels = data_cfg.labels
        if labels and isinstance(value, int) and not isinstance(value, bool):  # a ClassLabel id
            if not 0 <= value < len(labels):
                raise UserError(
                    f"data.labels: class id {value} in column '{data_cfg.target_column}' but only {len(labels)} "
                    "labels; list every class name in data.labels, in id order"
                )
            return labels[value]
        return as_text(value).strip()

    def references(self, row, data_cfg) -> list[str]:
        return [self.target(row, data_cfg)]

    def row_problem(self, row, data_cfg) -> str | None:
        """Prompt fields may be empty (Alpaca's input often is) but not null or absent, nor all blank; the
        target must have text."""
        for name in self.required_columns(data_cfg, list(row)):
            if name not in row:
                return f"missing {name}"
            if row[name] is None:
                return f"null {name}"
        if not self.target(row, data_cfg):
            column_name = data_cfg.target_column
            reason = blank_reason(row.get(column_name)) if column_name else None
            return f"{reason or 'empty'} {column_name or 'target'}"
        fields = self.fields(row, data_cfg)
        if fields and not any(fields.values()):
            return "empty prompt"
        return None

    def score_examples(self, predictions, references):
        from hftoolkit.metrics import rouge_per_example

        return rouge_per_example(predictions, references, "rougeL")

    def extra_scores(self, predictions, references, data_cfg) -> dict[str, float]:
        """With a label set: how many predictions name no label (scored wrong by exact match), and macro F1."""
        labels = data_cfg.labels
        if not labels:
            return {}
        gold = [refs[0] for refs in references]
        f1s = []
        for label in labels:
            tp = sum(p == label and g == label for p, g in zip(predictions, gold, strict=True))
            predicted, actual = predictions.count(label), gold.count(label)
            if predicted + actual:
                f1s.append(2 * tp / (predicted + actual))
        return {
            "out_of_label_set": float(sum(p not in labels for p in predictions)),
            "macro_f1": 100.0 * sum(f1s) / max(len(f1s), 1),
        }

    def synthetic_rows(self, rng, stream):
        while True:
            label = rng.choice(list(ROUTES))
            phrase = rng.choice(_PHRASES).format(kw=rng.choice(ROUTES[label]))
            text = f"{rng.choice(_OPENERS)} {rng.choice(_NAMES)} here . {phrase} {rng.choice(_WHEN)} ."
            yield {"text": text, "label": label}
