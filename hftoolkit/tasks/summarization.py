"""Summarization as prompt → completion: `{document}\nTL;DR:` (GPT-2's zero-shot cue) → ` summary<eos>`."""

from __future__ import annotations

from hftoolkit.tasks.base import BaseTask, PromptTemplate, as_references, as_text, column, first_present


class SummarizationTask(BaseTask):
    name = "summarization"
    metrics = ("rouge",)
    headline = "rougeL"
    hub_task = ("summarization", "Summarization")
    # xsum: document/summary; cnn_dailymail: article/highlights; SciTLDR: source/target.
    document_columns = ("document", "article", "source", "text")
    summary_columns = ("summary", "highlights", "target", "tldr")

    def columns(self, data_cfg, columns=None) -> tuple[str, str]:
        return (
            data_cfg.text_column or first_present(self.document_columns, columns),
            data_cfg.summary_column or first_present(self.summary_columns, columns),
        )

    def template(self, data_cfg) -> PromptTemplate:
        return PromptTemplate(data_cfg.prompt_template or "{document}\nTL;DR:", source_field="document")

    def required_columns(self, data_cfg, columns=None) -> list[str]:
        return list(self.columns(data_cfg, columns))

    def fields(self, row, data_cfg) -> dict[str, str]:
        doc, _ = self.columns(data_cfg, list(row))
        # Newlines inside the document would collide with the "\n" stop string of the completion only, so keep them.
        return {"document": as_text(column(row, doc, "data.text_column")).strip()}

    def references(self, row, data_cfg) -> list[str]:
        _, summary = self.columns(data_cfg, list(row))
        return as_references(column(row, summary, "data.summary_column"))

    def target(self, row, data_cfg) -> str:
        # One line: the completion stops at "\n" or EOS. Multi-reference data trains on the first reference.
        return " ".join(self.references(row, data_cfg)[0].split())

    def score_examples(self, predictions, references):
        from hftoolkit.metrics import rouge_per_example

        return rouge_per_example(predictions, references, self.headline)

    def synthetic_rows(self, rng, stream):
        from hftoolkit.synthetic import summarization_rows

        return summarization_rows(rng)
