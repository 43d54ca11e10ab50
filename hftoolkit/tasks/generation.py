"""Generation: continue text. Trained on packed documents (EOS between them); scored by perplexity."""

from __future__ import annotations

from hftoolkit.tasks.base import BaseTask, PromptTemplate, as_text, column, first_present


class GenerationTask(BaseTask):
    name = "generation"
    metrics = ("perplexity",)
    headline = "perplexity"
    stop_strings: tuple[str, ...] = ()
    generates = False
    tokenization = "documents"
    hub_task = ("text-generation", "Text Generation")
    text_columns = ("text", "content", "document")

    def text_column(self, data_cfg, columns=None) -> str:
        return data_cfg.text_column or first_present(self.text_columns, columns)

    def template(self, data_cfg) -> PromptTemplate:
        # No prompt: the whole document is the target. The template only serves `hftoolkit generate`.
        return PromptTemplate(data_cfg.prompt_template or "{text}", source_field="text", target_prefix="")

    def required_columns(self, data_cfg, columns=None) -> list[str]:
        return [self.text_column(data_cfg, columns)]

    def fields(self, row, data_cfg) -> dict[str, str]:
        return {"text": ""}

    def target(self, row, data_cfg) -> str:
        return as_text(column(row, self.text_column(data_cfg, list(row)), "data.text_column"))

    def references(self, row, data_cfg) -> list[str]:
        return [self.target(row, data_cfg)]

    def postprocess(self, completion: str, stop_strings) -> str:
        return completion  # free text: `hftoolkit generate` prints the continuation as generated

    def synthetic_rows(self, rng, stream):
        from hftoolkit.synthetic import generation_rows

        return generation_rows(rng)
