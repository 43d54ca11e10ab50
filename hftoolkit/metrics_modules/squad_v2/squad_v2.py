"""SQuAD v2.0 scores as an offline `evaluate` module, with the interface of the Hub module `squad_v2`.

Loaded by `hftoolkit.metrics.load("squad_v2")` through `evaluate.load(<this folder>)`. Normalisation, the
no-answer threshold and the best-threshold search follow the official SQuAD v2.0 evaluation script.
"""

import collections
import logging

import evaluate

from hftoolkit.metrics_modules.shared import normalize_answer, squad_features

logger = logging.getLogger(__name__)

_CITATION = """\
@inproceedings{rajpurkar-etal-2018-know,
    title = "Know What You Don{'}t Know: Unanswerable Questions for {SQ}u{AD}",
    author = "Rajpurkar, Pranav and Jia, Robin and Liang, Percy",
    booktitle = "Proceedings of the 56th Annual Meeting of the Association for Computational Linguistics",
    year = "2018",
    url = "https://aclanthology.org/P18-2124",
    pages = "784--789",
}
"""

_DESCRIPTION = """\
Exact match and token F1 for SQuAD v2.0, where some questions have no answer in the passage. A prediction
counts as "no answer" when its text is empty or its no_answer_probability exceeds `no_answer_threshold`.
Answers are normalised as in SQuAD v1.1 (lower-case, no punctuation, no a/an/the, collapsed whitespace); a
question with no gold answer is matched against the empty string. Scores are on a 0-100 scale, overall and
split into answerable (HasAns) and unanswerable (NoAns) questions; best_* report the threshold on
no_answer_probability that would have maximised each score.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of dict): one per question, {"id": str, "prediction_text": str,
        "no_answer_probability": float}; use prediction_text "" to abstain.
    references (list of dict): one per question, {"id": str, "answers": {"text": [str, ...],
        "answer_start": [int, ...]}}; empty lists mark an unanswerable question.
    no_answer_threshold (float): a prediction whose no_answer_probability is above this counts as
        "no answer". Defaults to 1.0 (only the text decides).
Returns:
    exact, f1 (float), total (int): over all scored questions.
    HasAns_exact, HasAns_f1, HasAns_total: over answerable questions (present when there are any).
    NoAns_exact, NoAns_f1, NoAns_total: over unanswerable questions (present when there are any).
    best_exact, best_exact_thresh, best_f1, best_f1_thresh: the best scores over all thresholds and the
        no_answer_probability threshold that reaches them.
Examples:
    >>> squad_v2 = evaluate.load("hftoolkit/metrics_modules/squad_v2")
    >>> result = squad_v2.compute(
    ...     predictions=[{"id": "q1", "prediction_text": "", "no_answer_probability": 0.0}],
    ...     references=[{"id": "q1", "answers": {"text": [], "answer_start": []}}],
    ... )
    >>> result["exact"], result["NoAns_total"]
    (100.0, 1)
"""


def exact_score(gold, prediction):
    return int(normalize_answer(gold) == normalize_answer(prediction))


def f1_score(gold, prediction):
    gold_tokens = normalize_answer(gold).split()
    prediction_tokens = normalize_answer(prediction).split()
    # v2.0: "no answer" against "no answer" is a full match, against anything else a miss.
    if not gold_tokens or not prediction_tokens:
        return int(gold_tokens == prediction_tokens)
    n_common = sum((collections.Counter(gold_tokens) & collections.Counter(prediction_tokens)).values())
    if n_common == 0:
        return 0
    precision = n_common / len(prediction_tokens)
    recall = n_common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def raw_scores(references, prediction_by_id):
    """Per-question best exact and F1 over the gold answers, before any no-answer threshold."""
    exact = {}
    f1 = {}
    for reference in references:
        question_id = reference["id"]
        golds = [text for text in reference["answers"]["text"] if normalize_answer(text)]
        if not golds:
            golds = [""]
        if question_id not in prediction_by_id:
            logger.warning("Missing prediction for %s", question_id)
            continue
        prediction = prediction_by_id[question_id]
        exact[question_id] = max(exact_score(gold, prediction) for gold in golds)
        f1[question_id] = max(f1_score(gold, prediction) for gold in golds)
    return exact, f1


def apply_threshold(scores, no_answer_probability, has_answer, threshold):
    """Replaces the score of each question predicted as unanswerable by whether it really is."""
    return {
        question_id: float(not has_answer[question_id])
        if no_answer_probability[question_id] > threshold
        else score
        for question_id, score in scores.items()
    }


def summarize(exact, f1, question_ids=None):
    question_ids = list(exact) if question_ids is None else question_ids
    total = len(question_ids)
    return {
        "exact": 100.0 * sum(exact[q] for q in question_ids) / total,
        "f1": 100.0 * sum(f1[q] for q in question_ids) / total,
        "total": total,
    }


def best_threshold(prediction_by_id, scores, no_answer_probability, has_answer):
    """Sweeps the no-answer threshold over the predicted probabilities, lowest first; returns (score, threshold)."""
    score = best = sum(1 for question_id in has_answer if not has_answer[question_id])
    threshold = 0.0
    for question_id in sorted(no_answer_probability, key=lambda q: no_answer_probability[q]):
        if question_id not in scores:
            continue
        if has_answer[question_id]:
            score += scores[question_id]
        elif prediction_by_id[question_id]:
            score -= 1
        if score > best:
            best = score
            threshold = no_answer_probability[question_id]
    return 100.0 * best / len(scores), threshold


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SquadV2(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=squad_features(no_answer_probability=True),
            codebase_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def _compute(self, predictions, references, no_answer_threshold=1.0):
        prediction_by_id = {p["id"]: p["prediction_text"] for p in predictions}
        no_answer_probability = {p["id"]: p["no_answer_probability"] for p in predictions}
        has_answer = {r["id"]: bool(r["answers"]["text"]) for r in references}

        exact_raw, f1_raw = raw_scores(references, prediction_by_id)
        exact = apply_threshold(exact_raw, no_answer_probability, has_answer, no_answer_threshold)
        f1 = apply_threshold(f1_raw, no_answer_probability, has_answer, no_answer_threshold)

        result = summarize(exact, f1)
        for prefix, wanted in (("HasAns", True), ("NoAns", False)):
            question_ids = [q for q, answerable in has_answer.items() if answerable == wanted]
            if question_ids:
                for key, value in summarize(exact, f1, question_ids).items():
                    result[f"{prefix}_{key}"] = value

        result["best_exact"], result["best_exact_thresh"] = best_threshold(
            prediction_by_id, exact_raw, no_answer_probability, has_answer
        )
        result["best_f1"], result["best_f1_thresh"] = best_threshold(
            prediction_by_id, f1_raw, no_answer_probability, has_answer
        )
        return result
