"""Translation as prompt → completion: `English: {source}\nGerman:` → ` target<eos>` (HF `translation` dict layout)."""

from __future__ import annotations

from hftoolkit.errors import UserError
from hftoolkit.tasks.base import PromptTemplate, column, cut_at_stop

LANGUAGE_NAMES = {
    "en": "English", "de": "German", "fr": "French", "ro": "Romanian", "es": "Spanish", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "cs": "Czech",
    "fi": "Finnish", "tr": "Turkish", "pl": "Polish", "sv": "Swedish", "da": "Danish", "no": "Norwegian",
}  # fmt: skip


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


class TranslationTask:
    name = "translation"
    metrics = ("sacrebleu", "chrf")
    headline = "bleu"
    stop_strings = ("\n",)
    generates = True

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

    def fields(self, row, data_cfg) -> dict[str, str]:
        src, tgt = self.langs(data_cfg)
        pair = self._pair(row, data_cfg)
        return {
            "source": " ".join(str(pair[src]).split()),
            "source_lang": language_name(src),
            "target_lang": language_name(tgt),
        }

    def references(self, row, data_cfg) -> list[str]:
        pair = self._pair(row, data_cfg)
        value = pair[data_cfg.target_lang]
        values = value if isinstance(value, list) else [value]
        return [" ".join(str(v).split()) for v in values]

    def target(self, row, data_cfg) -> str:
        return self.references(row, data_cfg)[0]

    def postprocess(self, completion: str, stop_strings) -> str:
        return cut_at_stop(completion, stop_strings)
