"""Extractive QA as prompt → completion: `{context}\nQuestion: {question}\nAnswer:` → ` answer<eos>` (SQuAD layout).

Unanswerable questions (SQuAD v2: `answers.text` empty) are unusable rows unless `data.no_answer_text` is set; then
the model learns to write that text for them, and scoring reads it as the empty answer that squad_v2 expects."""

from __future__ import annotations

from hftoolkit.tasks.base import BaseTask, PromptTemplate, as_references, as_text, blank_reason, column


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

    def default_metrics(self, data_cfg) -> tuple[str, ...]:
        # squad_v2 scores unanswerable questions (and splits the scores into HasAns/NoAns).
        return ("squad_v2",) if getattr(data_cfg, "no_answer_text", None) else self.metrics

    def references(self, row, data_cfg) -> list[str]:
        """The gold answers; [""] for an unanswerable question (the empty answer squad_v2 scores)."""
        _, _, answers = self.columns(data_cfg)
        return as_references(column(row, answers, "data.answer_column"))

    def target(self, row, data_cfg) -> str:
        answer = " ".join(self.references(row, data_cfg)[0].split())
        return answer or (getattr(data_cfg, "no_answer_text", None) or "")

    def row_problem(self, row, data_cfg) -> str | None:
        """With data.no_answer_text, a row without an answer is an unanswerable question, not a bad row."""
        if getattr(data_cfg, "no_answer_text", None):
            _, _, answers = self.columns(data_cfg)
            if answers in row and blank_reason(row[answers]) is not None:
                row = {**row, answers: data_cfg.no_answer_text}
        return super().row_problem(row, data_cfg)

    def scoring_text(self, prediction: str, data_cfg) -> str:
        """The prediction as scored: data.no_answer_text means "no answer", the empty string to squad_v2."""
        no_answer = getattr(data_cfg, "no_answer_text", None)
        if no_answer and " ".join(prediction.split()).lower() == " ".join(no_answer.split()).lower():
            return ""
        return prediction

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
