"""Exact match as an offline `evaluate` module, with the interface of the Hub module `exact_match`.

Loaded by `hftoolkit.metrics.load("exact_match")` through `evaluate.load(<this folder>)`. Same arguments, output
key and 0-1 scale as the Hub module: strings are compared after the optional normalisations, in this order:
regexes removed, lower-casing, punctuation removed, digits removed. Where the Hub module takes several references
per example it does not; this one accepts one string or a list per example and scores the best (a prediction
that equals any reference matches).
"""

import re
import string

import evaluate

from hftoolkit.metrics_modules.shared import text_pair_features

_DESCRIPTION = """\
The share of predictions that equal their reference exactly (after the chosen normalisations), 0-1.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): one prediction per example.
    references (list of str, or list of list of str): the reference(s) of each example.
    regexes_to_ignore (list of str): removed from both sides before comparing. Default None.
    ignore_case (bool): lower-case both sides. Default False.
    ignore_punctuation (bool): remove string.punctuation from both sides. Default False.
    ignore_numbers (bool): remove digits from both sides. Default False.
Returns:
    exact_match (float): matches / examples, 0-1.
Examples:
    >>> em = evaluate.load("hftoolkit/metrics_modules/exact_match")
    >>> em.compute(predictions=["billing", "Shipping"], references=["billing", "shipping"], ignore_case=True)
    {'exact_match': 1.0}
"""


def _normalise(text, regexes, ignore_case, ignore_punctuation, ignore_numbers):
    for pattern in regexes or ():
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if ignore_numbers:
        text = text.translate(str.maketrans("", "", string.digits))
    return text


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=text_pair_features(),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/exact_match"],
        )

    def _compute(
        self,
        predictions,
        references,
        regexes_to_ignore=None,
        ignore_case=False,
        ignore_punctuation=False,
        ignore_numbers=False,
    ):
        if not predictions:
            return {"exact_match": 0.0}
        options = (regexes_to_ignore, ignore_case, ignore_punctuation, ignore_numbers)
        matches = 0
        for prediction, refs in zip(predictions, references, strict=True):
            refs = [refs] if isinstance(refs, str) else refs
            pred = _normalise(prediction, *options)
            matches += any(pred == _normalise(ref, *options) for ref in refs)
        return {"exact_match": matches / len(predictions)}
