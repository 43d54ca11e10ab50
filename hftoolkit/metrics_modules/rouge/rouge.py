"""ROUGE as an offline `evaluate` module, with the interface of the Hub module `rouge`.

Loaded by `hftoolkit.metrics.load("rouge")` through `evaluate.load(<this folder>)`. Scoring is done by
Google's `rouge_score` package; this file only adapts inputs and outputs.
"""

import datasets
import evaluate
import numpy as np
from rouge_score import rouge_scorer, scoring

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/W04-1013",
    pages = "74--81",
}
"""

_DESCRIPTION = """\
ROUGE (Recall-Oriented Understudy for Gisting Evaluation) scores a generated text by its n-gram (rouge1,
rouge2, ...) and longest-common-subsequence (rougeL, rougeLsum) overlap with one or more reference texts.
The reported number is the F-measure, on a 0-1 scale. The default tokenizer lower-cases the text and keeps only
ASCII letters and digits, so text in other scripts needs a custom `tokenizer`. rougeLsum treats newlines as
sentence boundaries: put each sentence on its own line or it equals rougeL.
Computed with the `rouge_score` package (https://github.com/google-research/google-research/tree/master/rouge).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts, one per example.
    references (list of str, or list of list of str): one reference text per example, or several; with several,
        each score type takes the reference with the highest F-measure for that example.
    rouge_types (list of str, optional): which scores to return. Defaults to
        ["rouge1", "rouge2", "rougeL", "rougeLsum"]. "rouge{n}" counts n-gram overlap, "rougeL" the longest
        common subsequence, "rougeLsum" the summary-level LCS over newline-separated sentences.
    use_stemmer (bool): strip English suffixes with the Porter stemmer before matching. Defaults to False.
    use_aggregator (bool): True (default) returns one number per score type: the middle (50th percentile) of
        a 1000-sample bootstrap of the corpus mean F-measure, as `rouge_score.scoring.BootstrapAggregator`
        reports it. The bootstrap runs on a fixed seed with numpy's global random state saved and restored,
        so the result is reproducible and the caller's random stream is untouched. False returns a list
        with one F-measure per example.
    tokenizer (callable, optional): function mapping a text to a list of tokens, used instead of the default
        tokenizer (the stemmer is then not applied).
Returns:
    dict mapping each requested rouge type to a float in [0, 1] (or a list of floats without aggregation).
Examples:
    >>> rouge = evaluate.load("hftoolkit/metrics_modules/rouge")
    >>> rouge.compute(predictions=["the cat sat"], references=["the cat sat"])
    {'rouge1': 1.0, 'rouge2': 1.0, 'rougeL': 1.0, 'rougeLsum': 1.0}
"""

DEFAULT_ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
# The Hub module bootstraps with numpy's global generator, so its numbers drift a little from call to call
# and every call advances the caller's random stream; a fixed seed in a saved/restored state avoids both.
BOOTSTRAP_SEED = 0


class _CallableTokenizer:
    """Adapts a plain `text -> tokens` function to the `.tokenize(text)` object rouge_score expects."""

    def __init__(self, function):
        self.function = function

    def tokenize(self, text):
        return self.function(text)


def _bootstrap_mid_fmeasure(per_example_scores):
    aggregator = scoring.BootstrapAggregator()
    for scores in per_example_scores:
        aggregator.add_scores(scores)
    saved_state = np.random.get_state()
    np.random.seed(BOOTSTRAP_SEED)
    try:
        aggregate = aggregator.aggregate()
    finally:
        np.random.set_state(saved_state)
    return {rouge_type: float(value.mid.fmeasure) for rouge_type, value in aggregate.items()}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Two alternative schemas: several references per example, or exactly one.
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://aclanthology.org/W04-1013"],
        )

    def _compute(
        self,
        predictions,
        references,
        rouge_types=None,
        use_aggregator=True,
        use_stemmer=False,
        tokenizer=None,
    ):
        rouge_types = list(rouge_types) if rouge_types is not None else list(DEFAULT_ROUGE_TYPES)
        if tokenizer is not None:
            tokenizer = _CallableTokenizer(tokenizer)
        scorer = rouge_scorer.RougeScorer(
            rouge_types=rouge_types, use_stemmer=use_stemmer, tokenizer=tokenizer
        )

        per_example = []
        for prediction, reference in zip(predictions, references, strict=True):
            if isinstance(reference, str):
                per_example.append(scorer.score(reference, prediction))
            else:
                # score_multi keeps, per rouge type, the reference with the best F-measure.
                per_example.append(scorer.score_multi(list(reference), prediction))

        if use_aggregator:
            return _bootstrap_mid_fmeasure(per_example)
        return {
            rouge_type: [float(scores[rouge_type].fmeasure) for scores in per_example]
            for rouge_type in rouge_types
        }
