"""Tests for hftoolkit.synthetic: the offline datasets every quickstart recipe trains on."""

import json

import pytest

from hftoolkit import synthetic
from hftoolkit.synthetic import (
    SYNTHETIC_LANG,
    TASKS,
    make_dataset_files,
    make_examples,
    translate_to_synthetic,
    write_jsonl,
)

N = 200


def _key(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k != "id"}, sort_keys=True)


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_rows_other_seed_other_rows(task):
    """If this fails, a re-run (or a resumed run, or another rank) trains and scores on different data."""
    assert make_examples(task, N, seed=0) == make_examples(task, N, seed=0)
    other = make_examples(task, N, seed=1)
    same = sum(_key(a) == _key(b) for a, b in zip(make_examples(task, N, seed=0), other, strict=True))
    assert same < N // 10  # content, not just the qa ids, depends on the seed
    assert (
        make_examples(task, 10, seed=3) == make_examples(task, 30, seed=3)[:10]
    )  # n only extends the stream


@pytest.mark.parametrize("task", TASKS)
def test_rows_are_varied(task):
    """If this fails, the stream repeats itself and a model can memorise the train set instead of the rule."""
    rows = make_examples(task, N)
    assert len({_key(r) for r in rows}) >= 0.95 * N


def test_unknown_task_is_a_clear_error():
    """If this fails, a typo in `task` gives a KeyError or an empty dataset instead of naming the choices."""
    with pytest.raises(ValueError, match="generation, summarization, translation, qa"):
        make_examples("sumarization", 3)


EXPECTED_COLUMNS = {
    "generation": {"text"},
    "summarization": {"document", "summary"},
    "translation": {"translation"},
    "qa": {"id", "title", "context", "question", "answers"},
    "completion": {"text", "label"},  # the classification quickstart's columns (its recipe names them)
}


@pytest.mark.parametrize("task", TASKS)
def test_rows_use_the_hub_layout(task):
    """If this fails, the task's column defaults (xsum, wmt16, squad layouts) no longer find the synthetic columns."""
    for row in make_examples(task, 50):
        assert set(row) == EXPECTED_COLUMNS[task]
        for value in row.values():
            assert value  # no empty text, document, summary, context, question or answers
        if task == "translation":
            assert set(row["translation"]) == {"en", SYNTHETIC_LANG}
            assert all(isinstance(v, str) and v for v in row["translation"].values())
        if task == "qa":
            assert set(row["answers"]) == {"text", "answer_start"}
            assert len(row["answers"]["text"]) == len(row["answers"]["answer_start"]) == 1
            assert isinstance(row["answers"]["answer_start"][0], int)


def test_qa_answers_are_exact_spans_of_the_context():
    """If this fails, SQuAD-style span labels point at the wrong characters and exact_match is unreachable."""
    rows = make_examples("qa", 500) + synthetic.make_validation_examples("qa", 100)
    for row in rows:
        (text,), (start,) = row["answers"]["text"], row["answers"]["answer_start"]
        assert row["context"][start : start + len(text)] == text, row
    assert len({r["id"] for r in rows}) == len(rows)  # ids unique across train and validation streams


def test_qa_answers_are_unique_in_the_context():
    """If this fails, a question can have two right answers and the single reference marks one of them wrong."""
    for row in make_examples("qa", 500):
        answer = row["answers"]["text"][0]
        assert row["context"].split().count(answer) == 1, row


def test_qa_needs_the_question():
    """If this fails, the answer is guessable from the context alone (one fact per relation), not reading comprehension."""
    rows = make_examples("qa", 500)
    repeated = [r for r in rows if "Who" in r["question"] or r["context"].count(" lives in ") > 1]
    assert len(repeated) > 50


def test_summary_is_derivable_from_the_document():
    """If this fails, the summary contains words the document lacks, so no model can learn it by copying."""
    for row in make_examples("summarization", 300):
        key = next(s for s in row["document"].split(" . ") if s.startswith("The main news is that "))
        cut = key.removeprefix("The main news is that ").rsplit(" in ", 1)[0]
        assert row["summary"] == f"{cut} ."
        assert row["document"].count("main news") == 1


def test_translation_rule_is_a_deterministic_word_for_word_function():
    """If this fails, the target language is not a function of the source: BLEU 100 becomes unreachable."""
    assert (
        translate_to_synthetic("The red fox eats the apple in the garden .")
        == "Lo vulpo rubi manjan lo melo en lo gardo ."
    )
    assert translate_to_synthetic("Alice sleeps near the old house .") == "Alice dorman pres lo domo veki ."
    for row in make_examples("translation", 300):
        en, xx = row["translation"]["en"], row["translation"][SYNTHETIC_LANG]
        assert translate_to_synthetic(en) == xx
        assert len(en.split()) == len(xx.split())  # per-word substitution: no words appear or vanish
    lexicon = synthetic._LEXICON.values()
    assert len(set(lexicon)) == len(lexicon)  # injective: two English words never share a translation


def test_route_is_a_function_of_the_one_keyword():
    """If this fails, a synthetic support message names no team's keyword, or several: its label is not learnable."""
    from hftoolkit.tasks.completion import ROUTES

    counts = dict.fromkeys(ROUTES, 0)
    for row in make_examples("completion", 500):
        words = set(row["text"].split())
        hits = [label for label, keywords in ROUTES.items() if words & set(keywords)]
        assert hits == [row["label"]], row
        counts[row["label"]] += 1
    assert min(counts.values()) > 500 / len(ROUTES) / 2  # every team gets its share


WORD_LIMITS = {"generation": 48, "summarization": 43, "translation": 12, "qa": 25, "completion": 20}  # maxima


@pytest.mark.parametrize("task", TASKS)
def test_examples_are_short(task):
    """If this fails, examples outgrow the ~60-token budget a tiny model learns in minutes on a CPU."""
    for row in make_examples(task, 300):
        if task == "generation":
            words = len(row["text"].split())
        elif task == "summarization":
            words = len(row["document"].split()) + len(row["summary"].split())
        elif task == "translation":
            words = max(len(v.split()) for v in row["translation"].values())
        elif task == "qa":
            words = len(row["context"].split()) + len(row["question"].split()) + 1
        else:
            words = len(row["text"].split()) + 1
        assert words <= WORD_LIMITS[task], row


@pytest.mark.parametrize("task", TASKS)
def test_dataset_files_are_disjoint_and_round_trip(task, tmp_path):
    """If this fails, eval scores measure memorised train rows, or the files differ from the rows we generated."""
    paths = make_dataset_files(task, tmp_path / task, n_train=300, n_eval=50, seed=7)
    assert paths == {
        "train": tmp_path / task / "train.jsonl",
        "validation": tmp_path / task / "validation.jsonl",
    }
    train = [json.loads(line) for line in paths["train"].read_text(encoding="utf-8").splitlines()]
    validation = [json.loads(line) for line in paths["validation"].read_text(encoding="utf-8").splitlines()]
    assert train == make_examples(task, 300, seed=7)
    assert len(validation) == 50
    assert not {_key(r) for r in train} & {_key(r) for r in validation}
    assert validation[:10] != make_examples(
        task, 10, seed=8
    )  # its own stream, not the next seed's train rows
    assert not list((tmp_path / task).glob(".*tmp*"))  # no temporary file left behind


def test_write_jsonl_round_trips_unicode_and_replaces_atomically(tmp_path):
    """If this fails, non-ASCII text is mangled, or a rewrite leaves a mix of old and new lines."""
    rows = [{"text": "naïve café — 東京"}, {"translation": {"en": "a", "xx": "b"}}]
    path = tmp_path / "sub" / "rows.jsonl"
    write_jsonl(rows * 3, path)
    write_jsonl(rows, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert "東京" in lines[0]  # utf-8, not \\u escapes
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.jsonl"]
