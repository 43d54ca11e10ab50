"""Corpus BLEU as an offline `evaluate` module, with the interface of the Hub module `sacrebleu`.

Loaded by `hftoolkit.metrics.load("sacrebleu")` through `evaluate.load(<this folder>)`. Scoring is done by the
`sacrebleu` package; this file only adapts inputs and outputs.
"""

import evaluate
import sacrebleu as scb

from hftoolkit.metrics_modules.shared import reference_streams, text_pair_features

_CITATION = """\
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/W18-6319",
    pages = "186--191",
}
"""

_DESCRIPTION = """\
Corpus-level BLEU computed by sacreBLEU on detokenized text, so that scores are comparable across papers:
sacreBLEU applies its own tokenization (13a by default) and reports a signature of every setting that
changes the number. The score is on a 0-100 scale.
See https://github.com/mjpost/sacreBLEU.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): detokenized system outputs, one per example.
    references (list of list of str, or list of str): the reference translations of each example. Examples
        may have different numbers of references (sacreBLEU's variable-reference mode); a plain string
        counts as a single reference.
    smooth_method (str): "exp" (default), "none", "floor" or "add-k".
    smooth_value (float, optional): the value for "floor" (default 0.1) or "add-k" (default 1).
    tokenize (str, optional): sacreBLEU tokenizer name ("13a", "intl", "zh", "char", "none", ...).
        Defaults to sacreBLEU's choice, which is "13a" unless a target language says otherwise.
    lowercase (bool): compare case-insensitively. Defaults to False.
    force (bool): do not warn about input that looks already tokenized. Defaults to False.
    use_effective_order (bool): leave n-gram orders with no matches out of the geometric mean; meant for
        sentence-level scores. Defaults to False.
Returns:
    score (float): BLEU, 0-100.
    counts (list of int): matching n-grams for orders 1-4.
    totals (list of int): system n-grams for orders 1-4.
    precisions (list of float): n-gram precisions, 0-100.
    bp (float): brevity penalty.
    sys_len (int): system length in tokens.
    ref_len (int): effective reference length in tokens.
Examples:
    >>> bleu = evaluate.load("hftoolkit/metrics_modules/sacrebleu")
    >>> result = bleu.compute(predictions=["the cat sat on the mat"], references=[["the cat sat on the mat"]])
    >>> round(result["score"], 1)
    100.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Sacrebleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            homepage="https://github.com/mjpost/sacreBLEU",
            inputs_description=_KWARGS_DESCRIPTION,
            features=text_pair_features(),
            codebase_urls=["https://github.com/mjpost/sacreBLEU"],
            reference_urls=["https://aclanthology.org/W18-6319", "https://en.wikipedia.org/wiki/BLEU"],
        )

    def _compute(
        self,
        predictions,
        references,
        smooth_method="exp",
        smooth_value=None,
        force=False,
        lowercase=False,
        tokenize=None,
        use_effective_order=False,
    ):
        bleu = scb.BLEU(
            lowercase=lowercase,
            force=force,
            tokenize=tokenize,
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            effective_order=use_effective_order,
        )
        output = bleu.corpus_score(list(predictions), reference_streams(references))
        return {
            "score": output.score,
            "counts": output.counts,
            "totals": output.totals,
            "precisions": output.precisions,
            "bp": output.bp,
            "sys_len": output.sys_len,
            "ref_len": output.ref_len,
        }
