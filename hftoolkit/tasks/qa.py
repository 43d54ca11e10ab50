"""Extractive QA as prompt → completion: `{context}\nQuestion: {question}\nAnswer:` → ` answer<eos>` (SQuAD layout)."""

from __future__ import annotations

from hftoolkit.tasks.base import BaseTask, PromptTemplate, as_references, as_text, column


class QATask(BaseTask):
    name = "qa"
    metrics = ("squad",)
    headline = "exact_match"
    hub_task = ("question-answering", "Question Answering")

    def columns(self, data_cfg) -> tuple[str, str, str]:
        return (
            data_cfg.context_column or "context",
            data_cfg.question_column or "question",
            data_cfg.answer_column or "answers",
        )

    def template(self, data_cfg) -> PromptTemplate:
        return PromptTemplate(
            data_cfg.prompt_template or "{context}\nQuestion: {question}\nAnswer:", source_field="context"
        )

    def required_columns(self, data_cfg, columns=None) -> list[str]:
        return list(self.columns(data_cfg))

    def fields(self, row, data_cfg) -> dict[str, str]:
        context, question, _ = self.columns(data_cfg)
        return {
            "context": as_text(column(row, context, "data.context_column")).strip(),
            "question": " ".join(as_text(column(row, question, "data.question_column")).split()),
        }

    def references(self, row, data_cfg) -> list[str]:
        _, _, answers = self.columns(data_cfg)
        return as_references(column(row, answers, "data.answer_column"))

    def target(self, row, data_cfg) -> str:
        return " ".join(self.references(row, data_cfg)[0].split())

    def align_layout(self, ds, source_cfg, data_cfg):
        """Answers as a list of strings: SQuAD's {"text", "answer_start"} and plain strings mix."""
        _, _, answers = self.columns(data_cfg)
        return ds.map(lambda value: {answers: as_references(value)}, input_columns=answers, desc="answers")

    def score_examples(self, predictions, references):
        from hftoolkit.metrics import squad_f1_per_example

        return squad_f1_per_example(predictions, references)

    def synthetic_rows(self, rng, stream):
        from hftoolkit.synthetic import qa_rows

        return qa_rows(rng, stream)
