"""Translation as prompt → completion: `English: {source}\nGerman:` → ` target<eos>` (HF `translation` dict layout)."""

from __future__ import annotations

import re

from hftoolkit.errors import UserError
from hftoolkit.tasks.base import BaseTask, PromptTemplate, as_text, blank_reason, column

LANGUAGE_NAMES = {
    "en": "English", "de": "German", "fr": "French", "ro": "Romanian", "es": "Spanish", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "cs": "Czech",
    "fi": "Finnish", "tr": "Turkish", "pl": "Polish", "sv": "Swedish", "da": "Danish", "no": "Norwegian",
}  # fmt: skip


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


class TranslationTask(BaseTask):
    name = "translation"
    metrics = ("sacrebleu", "chrf")
    headline = "bleu"
    hub_task = ("translation", "Translation")

    def check_config(self, data_cfg) -> None:
        if data_cfg.synthetic is None and not (data_cfg.source_lang and data_cfg.target_lang):
            raise UserError("data.source_lang/data.target_lang: required for translation (e.g. en, de)")

    def resolve(self, data_cfg) -> None:
        if data_cfg.synthetic is not None:  # the synthetic pairs are English → the made-up language "xx"
            from hftoolkit.synthetic import SYNTHETIC_LANG

            data_cfg.source_lang = data_cfg.source_lang or "en"
            data_cfg.target_lang = data_cfg.target_lang or SYNTHETIC_LANG

    def langs(self, data_cfg) -> tuple[str, str]:
        return data_cfg.source_lang, data_cfg.target_lang

    def template(self, data_cfg) -> PromptTemplate:
        return PromptTemplate(
            data_cfg.prompt_template or "{source_lang}: {source}\n{target_lang}:", source_field="source"
        )

    def required_columns(self, data_cfg, columns=None) -> list[str]:
        return [data_cfg.translation_column]

    def _pair(self, row, data_cfg) -> dict:
        pair = column(row, data_cfg.translation_column, "data.translation_column")
        if not isinstance(pair, dict):
            raise UserError(
                f"data.translation_column: '{data_cfg.translation_column}' holds {type(pair).__name__}, "
                "expected a {lang: sentence} mapping"
            )
        for key, lang in (("source_lang", data_cfg.source_lang), ("target_lang", data_cfg.target_lang)):
            if lang not in pair:
                raise UserError(
                    f"data.{key}: language '{lang}' not in the data (languages: {', '.join(pair)})"
                )
        return pair

    def fixed_fields(self, data_cfg) -> dict[str, str]:
        src, tgt = self.langs(data_cfg)
        return {"source_lang": language_name(src or "en"), "target_lang": language_name(tgt or "de")}

    def row_problem(self, row, data_cfg) -> str | None:
        """By language: "null translation.de", "whitespace-only translation.en", ..."""
        name = data_cfg.translation_column
        if name not in row:
            return f"missing {name}"
        pair = row[name]
        if pair is None:
            return f"null {name}"
        if isinstance(pair, dict):  # any other layout is _pair's one-line error
            for lang in (data_cfg.source_lang, data_cfg.target_lang):
                reason = "missing" if lang not in pair else blank_reason(pair[lang])
                if reason is not None:
                    return f"{reason} {name}.{lang}"
        return None

    def fields(self, row, data_cfg) -> dict[str, str]:
        pair = self._pair(row, data_cfg)
        return {
            "source": " ".join(as_text(pair[data_cfg.source_lang]).split()),
            **self.fixed_fields(data_cfg),
        }

    def references(self, row, data_cfg) -> list[str]:
        pair = self._pair(row, data_cfg)
        value = pair[data_cfg.target_lang]
        values = value if isinstance(value, list) else [value]
        return [" ".join(as_text(v).split()) for v in values]

    def target(self, row, data_cfg) -> str:
        return self.references(row, data_cfg)[0]

    def align_layout(self, ds, source_cfg, data_cfg):
        """Pairs keyed by the recipe's language codes, holding those two languages only (a source may name them
        otherwise, e.g. eng/deu, or carry more languages)."""
        name, src, tgt = data_cfg.translation_column, source_cfg.source_lang, source_cfg.target_lang
        to_src, to_tgt = data_cfg.source_lang, data_cfg.target_lang
        return ds.map(
            lambda pair: {name: {to_src: pair[src], to_tgt: pair[tgt]}}, input_columns=name, desc="languages"
        )

    def score_examples(self, predictions, references):
        from hftoolkit.metrics import bleu_per_example

        return bleu_per_example(predictions, references)

    def languages(self, data) -> list[str] | None:
        # Only real ISO 639 codes: the Hub rejects others, and the synthetic data uses "xx" on purpose.
        codes = [data.get("source_lang"), data.get("target_lang")]
        codes = [c for c in codes if isinstance(c, str) and re.fullmatch(r"[a-z]{2,3}", c) and c != "xx"]
        return list(dict.fromkeys(codes)) or None

    def synthetic_rows(self, rng, stream):
        from hftoolkit.synthetic import translation_rows

        return translation_rows(rng)
