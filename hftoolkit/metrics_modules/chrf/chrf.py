"""chrF / chrF++ as an offline `evaluate` module, with the interface of the Hub module `chrf`.

Loaded by `hftoolkit.metrics.load("chrf")` through `evaluate.load(<this folder>)`. Scoring is done by the
`sacrebleu` package's CHRF; this file only adapts inputs and outputs.
"""

import evaluate
from sacrebleu.metrics import CHRF

from hftoolkit.metrics_modules.shared import reference_streams, text_pair_features

_CITATION = """\
@inproceedings{popovic-2015-chrf,
    title = "chr{F}: character n-gram {F}-score for automatic {MT} evaluation",
    author = "Popovi{\\'c}, Maja",
    booktitle = "Proceedings of the Tenth Workshop on Statistical Machine Translation",
    year = "2015",
    url = "https://aclanthology.org/W15-3049",
    pages = "392--395",
}
@inproceedings{popovic-2017-chrf,
    title = "chr{F}++: words helping character n-grams",
    author = "Popovi{\\'c}, Maja",
    booktitle = "Proceedings of the Second Conference on Machine Translation",
    year = "2017",
    url = "https://aclanthology.org/W17-4770",
    pages = "612--618",
}
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    url = "https://aclanthology.org/W18-6319",
    pages = "186--191",
}
"""

_DESCRIPTION = """\
chrF is the F-score of character n-gram overlap between system outputs and references, computed over the whole
corpus; chrF++ (word_order=2) adds word unigrams and bigrams. Beta weights recall beta times as much as
precision. The score is on a 0-100 scale. Computed with sacreBLEU's CHRF (https://github.com/mjpost/sacreBLEU).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): system outputs, one per example.
    references (list of list of str, or list of str): the references of each example (one list per example,
        not sacreBLEU's transposed streams). Examples may have different numbers of references; a plain
        string counts as a single reference.
    char_order (int): character n-gram order. Defaults to 6.
    word_order (int): word n-gram order; 2 gives chrF++. Defaults to 0.
    beta (int): weight of recall relative to precision. Defaults to 2.
    lowercase (bool): compare case-insensitively. Defaults to False.
    whitespace (bool): keep whitespace in character n-grams. Defaults to False.
    eps_smoothing (bool): epsilon smoothing as in chrF++.py, NLTK and Moses; False uses the effective-order
        behaviour of sacreBLEU >= 2.0. Defaults to False.
Returns:
    score (float): chrF, 0-100.
    char_order (int), word_order (int), beta (int): the settings used.
Examples:
    >>> chrf = evaluate.load("hftoolkit/metrics_modules/chrf")
    >>> chrf.compute(predictions=["the cat sat"], references=[["the cat sat"]])
    {'score': 100.0, 'char_order': 6, 'word_order': 0, 'beta': 2}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            homepage="https://github.com/mjpost/sacreBLEU#chrf--chrf",
            inputs_description=_KWARGS_DESCRIPTION,
            features=text_pair_features(),
            codebase_urls=["https://github.com/mjpost/sacreBLEU#chrf--chrf"],
            reference_urls=["https://github.com/m-popovic/chrF"],
        )

    def _compute(
        self,
        predictions,
        references,
        char_order=CHRF.CHAR_ORDER,
        word_order=CHRF.WORD_ORDER,
        beta=CHRF.BETA,
        lowercase=False,
        whitespace=False,
        eps_smoothing=False,
    ):
        chrf = CHRF(
            char_order=char_order,
            word_order=word_order,
            beta=beta,
            lowercase=lowercase,
            whitespace=whitespace,
            eps_smoothing=eps_smoothing,
        )
        output = chrf.corpus_score(list(predictions), reference_streams(references))
        return {
            "score": output.score,
            "char_order": output.char_order,
            "word_order": output.word_order,
            "beta": output.beta,
        }
