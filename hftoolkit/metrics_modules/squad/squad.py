"""SQuAD v1.1 exact match and F1 as an offline `evaluate` module, with the interface of the Hub module `squad`.

Loaded by `hftoolkit.metrics.load("squad")` through `evaluate.load(<this folder>)`. The answer normalisation
and scoring follow the official SQuAD v1.1 evaluation script.
"""

import collections
import logging

import evaluate

from hftoolkit.metrics_modules.shared import normalize_answer, squad_features

logger = logging.getLogger(__name__)

_CITATION = """\
@inproceedings{rajpurkar-etal-2016-squad,
    title = "{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text",
    author = "Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy",
    booktitle = "Proceedings of the 2016 Conference on Empirical Methods in Natural Language Processing",
    year = "2016",
    url = "https://aclanthology.org/D16-1264",
    pages = "2383--2392",
}
"""

_DESCRIPTION = """\
Exact match and token F1 of extractive question-answering predictions against the gold answers, as defined by
the official SQuAD v1.1 evaluation script: both sides are lower-cased, stripped of ASCII punctuation and of the
articles a/an/the, and whitespace-collapsed; each question scores the best value over its gold answers; both
numbers are averaged over all questions and reported on a 0-100 scale. A question without a prediction
scores 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of dict): one per question, {"id": str, "prediction_text": str}.
    references (list of dict): one per question, {"id": str, "answers": {"text": [str, ...],
        "answer_start": [int, ...]}} (the layout of the `squad` dataset); only the texts are used.
Returns:
    exact_match (float): percentage of questions whose normalised prediction equals a normalised gold answer.
    f1 (float): mean over questions of the best token-overlap F1 against the gold answers, 0-100.
Examples:
    >>> squad = evaluate.load("hftoolkit/metrics_modules/squad")
    >>> squad.compute(
    ...     predictions=[{"id": "q1", "prediction_text": "The Eiffel Tower."}],
    ...     references=[{"id": "q1", "answers": {"text": ["Eiffel tower"], "answer_start": [0]}}],
    ... )
    {'exact_match': 100.0, 'f1': 100.0}
"""


def exact_match_score(prediction, gold):
    return normalize_answer(prediction) == normalize_answer(gold)


def f1_score(prediction, gold):
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    n_common = sum((collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)).values())
    # v1.1 scores an empty side as 0 even against an empty gold answer (v2.0 changes this).
    if n_common == 0:
        return 0.0
    precision = n_common / len(prediction_tokens)
    recall = n_common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Squad(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=squad_features(no_answer_probability=False),
            codebase_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def _compute(self, predictions, references):
        prediction_by_id = {prediction["id"]: prediction["prediction_text"] for prediction in predictions}
        exact_match_total = 0.0
        f1_total = 0.0
        for reference in references:
            question_id = reference["id"]
            if question_id not in prediction_by_id:
                logger.warning("Unanswered question %s will receive score 0.", question_id)
                continue
            prediction = prediction_by_id[question_id]
            golds = reference["answers"]["text"]
            if not golds:
                raise ValueError(
                    f"question {question_id!r} has no gold answer; SQuAD v1.1 needs at least one"
                )
            exact_match_total += max(float(exact_match_score(prediction, gold)) for gold in golds)
            f1_total += max(f1_score(prediction, gold) for gold in golds)
        n_questions = len(references)
        return {"exact_match": 100.0 * exact_match_total / n_questions, "f1": 100.0 * f1_total / n_questions}
