"""What several bundled metric modules share. evaluate copies a module's own file into its cache and imports it
from there, so the modules import this by its absolute name (hftoolkit is installed wherever they run)."""

import re
import string

import datasets


def text_pair_features():
    """Two alternative schemas: several references per example, or exactly one (sacreBLEU, chrF)."""
    return [
        datasets.Features(
            {
                "predictions": datasets.Value("string", id="sequence"),
                "references": datasets.Sequence(datasets.Value("string", id="sequence"), id="references"),
            }
        ),
        datasets.Features(
            {
                "predictions": datasets.Value("string", id="sequence"),
                "references": datasets.Value("string", id="sequence"),
            }
        ),
    ]


def reference_streams(references):
    """Turns per-example reference lists into sacreBLEU's per-position streams.

    Examples with fewer references are padded with None, which sacreBLEU skips for that example (its
    variable-reference mode; the Hub modules raise ValueError on ragged references instead).
    """
    references = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    n_streams = max((len(refs) for refs in references), default=0)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(n_streams)]


def squad_features(no_answer_probability: bool):
    """SQuAD's prediction/reference schema; v2.0 adds a no-answer probability to each prediction."""
    prediction = {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")}
    if no_answer_probability:
        prediction["no_answer_probability"] = datasets.Value("float32")
    return datasets.Features(
        {
            "predictions": prediction,
            "references": {
                "id": datasets.Value("string"),
                "answers": datasets.features.Sequence(
                    {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                ),
            },
        }
    )


_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text):
    """Lower-cases, drops punctuation, then the articles a/an/the, then collapses whitespace (the official SQuAD
    v1.1 and v2.0 scripts normalise alike)."""
    text = text.lower()
    text = "".join(char for char in text if char not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())
