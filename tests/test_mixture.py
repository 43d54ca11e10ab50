"""data.sources (weighted mixtures) and data.eval_sets (named eval sets): shares, order, per-source column mapping,
per-source bad rows, and several eval sets end to end on a tiny model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from hftoolkit.config import load_recipe
from hftoolkit.data import load_raw_splits
from hftoolkit.mixture import SOURCE_COLUMN
from hftoolkit.tasks import get_task
from tests.conftest import tiny_overrides

SUMMARIZATION = "recipes/quickstart/summarization.yaml"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def two_sources(tmp_path: Path, n: int = 2000) -> tuple[Path, Path]:
    """Source a in the task's Hub layout (document/summary), source b in its own (body/tldr), every row unique."""
    a = write_jsonl(
        tmp_path / "a.jsonl", [{"document": f"alpha doc {i} .", "summary": f"a{i}"} for i in range(n)]
    )
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [{"body": f"beta body {i} .", "tldr": f"b{i}", "extra": i} for i in range(n)],
    )
    return a, b


def mixture_recipe(tmp_path: Path, a: Path, b: Path, *extra: str, weights=(3, 1)):
    sources = (
        f"data.sources=[{{train_file: {a}, weight: {weights[0]}}}, "
        f"{{train_file: {b}, weight: {weights[1]}, text_column: body, summary_column: tldr}}]"
    )
    overrides = [*tiny_overrides(tmp_path / "out"), "data.synthetic=null", sources, *extra]
    return load_recipe(SUMMARIZATION, overrides)


def load_train(recipe, tmp_path):
    task = get_task(recipe.task)
    task.resolve(recipe.data)
    splits, bad_rows = load_raw_splits(recipe, tmp_path, task)
    return splits, bad_rows, task


def test_weights_3_to_1_realise_75_25_in_the_same_order_on_reload(tmp_path):
    a, b = two_sources(tmp_path)
    splits, _, _ = load_train(mixture_recipe(tmp_path, a, b), tmp_path)
    train = splits["train"]
    counts = Counter(train[SOURCE_COLUMN])
    share_a = counts[0] / len(train)
    assert 0.73 < share_a < 0.77, counts  # the weights' 75 %, within sampling noise (± 2 sd at n ≈ 2500)
    # first_exhausted: the mixture ends when source a (the one drawn 3× as often) has given all its rows, none twice
    documents = train["document"]
    assert counts[0] == 1900 and len(set(documents)) == len(documents)  # 95 % of 2000 rows: 5 % held out
    again, _, _ = load_train(mixture_recipe(tmp_path, a, b), tmp_path)
    assert again["train"]["document"] == documents
    other, _, _ = load_train(mixture_recipe(tmp_path, a, b, "seed=7"), tmp_path)
    # another seed draws the sources in another order (not only other held-out rows)
    assert other["train"][SOURCE_COLUMN] != train[SOURCE_COLUMN]
    # validation: each source's held-out rows, from both sources, disjoint from the training rows
    held = splits["validation"]
    assert set(Counter(held[SOURCE_COLUMN])) == {0, 1} and not set(held["document"]) & set(documents)


def test_all_exhausted_uses_every_row_of_every_source(tmp_path):
    a, b = two_sources(tmp_path, n=200)
    recipe = mixture_recipe(
        tmp_path, a, b, "data.mixture_stopping=all_exhausted", "data.validation_split_percentage=10"
    )
    train = load_train(recipe, tmp_path)[0]["train"]
    counts = Counter(train[SOURCE_COLUMN])
    assert len(set(d for d, s in zip(train["document"], train[SOURCE_COLUMN], strict=True) if s == 1)) == 180
    assert 0.70 < counts[0] / len(train) < 0.80  # shares still follow the weights; a's rows repeat


def test_each_source_reaches_the_task_fields_through_its_own_columns(tmp_path):
    a, b = two_sources(tmp_path, n=50)
    c = (
        tmp_path / "c.csv"
    )  # a third layout, renamed with `columns`; its own "summary" column is not the target
    c.write_text("txt,short,summary\n" + "".join(f"gamma text {i} .,g{i},wrong{i}\n" for i in range(50)))
    sources = (
        f"data.sources=[{{train_file: {a}}}, {{train_file: {b}, text_column: body, summary_column: tldr}}, "
        f"{{train_file: {c}, columns: {{document: txt, summary: short}}}}]"
    )
    overrides = [*tiny_overrides(tmp_path / "out"), "data.synthetic=null", sources]
    recipe = load_recipe(SUMMARIZATION, overrides)
    splits, _, task = load_train(recipe, tmp_path)
    originals = {json.loads(line)["body"]: json.loads(line)["tldr"] for line in b.read_text().splitlines()}
    originals |= {json.loads(x)["document"]: json.loads(x)["summary"] for x in a.read_text().splitlines()}
    originals |= {f"gamma text {i} .": f"g{i}" for i in range(50)}
    seen = Counter()
    for row in splits["train"]:
        document = task.fields(row, recipe.data)["document"]
        assert task.target(row, recipe.data) == originals[document]  # the pair of the file's own row
        seen[document.split()[0]] += 1
        assert document.startswith(("alpha", "beta", "gamma")[row[SOURCE_COLUMN]])
    assert set(seen) == {"alpha", "beta", "gamma"}
    assert sorted(splits["train"].column_names) == ["document", SOURCE_COLUMN, "summary"]


def test_translation_and_qa_sources_in_other_layouts_mix_into_one(tmp_path):
    pairs_a = write_jsonl(
        tmp_path / "a.jsonl", [{"translation": {"en": f"dog {i}", "de": f"Hund {i}"}} for i in range(40)]
    )
    pairs_b = write_jsonl(
        tmp_path / "b.jsonl",
        [{"pair": {"eng": f"cat {i}", "deu": f"Katze {i}", "fra": f"chat {i}"}} for i in range(40)],
    )
    sources = (
        f"data.sources=[{{train_file: {pairs_a}}}, "
        f"{{train_file: {pairs_b}, translation_column: pair, source_lang: eng, target_lang: deu}}]"
    )
    overrides = [
        *tiny_overrides(tmp_path / "t"),
        "data.synthetic=null",
        sources,
        "data.source_lang=en",
        "data.target_lang=de",
    ]
    recipe = load_recipe("recipes/quickstart/translation.yaml", overrides)
    splits, _, task = load_train(recipe, tmp_path)
    rows = splits["train"].to_list()
    cats = [r for r in rows if r[SOURCE_COLUMN] == 1]
    assert cats and all(task.fields(r, recipe.data)["source"].startswith("cat") for r in cats)
    assert all(
        task.target(r, recipe.data) == "Katze " + task.fields(r, recipe.data)["source"][4:] for r in cats
    )

    squad = {
        "context": "Ann lives in Oslo .",
        "question": "Where does Ann live ?",
        "answers": {"text": ["Oslo"], "answer_start": [13]},
    }
    qa_a = write_jsonl(tmp_path / "qa.jsonl", [squad] * 30)
    qa_b = write_jsonl(tmp_path / "qb.jsonl", [{"c": "Bo is 7 .", "q": "How old is Bo ?", "a": "7"}] * 30)
    sources = (
        f"data.sources=[{{train_file: {qa_a}}}, "
        f"{{train_file: {qa_b}, context_column: c, question_column: q, answer_column: a}}]"
    )
    overrides = [*tiny_overrides(tmp_path / "q"), "data.synthetic=null", sources]
    recipe = load_recipe("recipes/quickstart/qa.yaml", overrides)
    splits, _, task = load_train(recipe, tmp_path)
    targets = {(r[SOURCE_COLUMN], task.target(r, recipe.data)) for r in splits["train"]}
    assert targets == {(0, "Oslo"), (1, "7")}


def test_unusable_rows_are_counted_and_refused_per_source(tmp_path):
    a, b = two_sources(tmp_path, n=100)
    rows = [json.loads(line) for line in b.read_text().splitlines()]
    for row in rows[:3]:  # 3 % of source b: under the 5 % share, dropped and counted for b
        row["tldr"] = " "
    write_jsonl(b, rows)
    _, bad_rows, _ = load_train(mixture_recipe(tmp_path, a, b), tmp_path)
    assert bad_rows["train"] == {"whitespace-only tldr in data.sources[1]": 3}
    for row in rows[:10]:  # 10 %: over the share of source b alone (5 % of the two sources together)
        row["tldr"] = " "
    write_jsonl(b, rows)
    from hftoolkit.errors import UserError

    with pytest.raises(
        UserError, match=r"10 of 100 train rows in data\.sources\[1\] \(.*b\.jsonl\) are unusable"
    ):
        load_train(mixture_recipe(tmp_path, a, b), tmp_path)


def test_plan_shows_rows_and_realised_shares_per_source(tmp_path, cli):
    a, b = two_sources(tmp_path, n=400)
    sources = (
        f"data.sources=[{{train_file: {a}, weight: 3}}, "
        f"{{train_file: {b}, weight: 1, text_column: body, summary_column: tldr}}]"
    )
    code, out, err = cli(
        "plan", SUMMARIZATION, *tiny_overrides(tmp_path / "p"), "data.synthetic=null", sources
    )
    assert code == 0, err[-2000:]
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith("data.sources[")]
    assert (
        lines[0].startswith("data.sources[0]")
        and "380 of 380 rows" in lines[0]
        and "(weight 3 → 75.0%)" in lines[0]
    )
    rows_b = int(lines[1].split(": ")[1].split(" of ")[0])
    assert lines[1].endswith("(weight 1 → 25.0%)") and 100 < rows_b < 155


# ---------------------------------------------------------------------------------------------- eval sets


def eval_set_files(tmp_path: Path) -> tuple[Path, Path]:
    from hftoolkit.synthetic import make_validation_examples

    rows = make_validation_examples("summarization", 24, 0, exclude=[])
    first = write_jsonl(tmp_path / "first.jsonl", rows[:12])
    second = write_jsonl(
        tmp_path / "second.jsonl", [{"body": r["document"], "tldr": r["summary"]} for r in rows[12:]]
    )
    return first, second


def test_two_eval_sets_end_to_end(tmp_path, cli):
    first, second = eval_set_files(tmp_path)
    out = tmp_path / "run"
    sets = (
        f"data.eval_sets={{first: {{validation_file: {first}}}, "
        f"second: {{validation_file: {second}, text_column: body, summary_column: tldr, max_eval_samples: 10}}}}"
    )
    overrides = [
        *tiny_overrides(out),
        sets,
        "train.eval_steps=2",
        "train.metric_for_best_model=second/eval_loss",
    ]
    code, _, err = cli("train", SUMMARIZATION, *overrides)
    assert code == 0, err[-3000:]

    evals = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line
    ]
    for line in evals:
        for name in ("first", "second"):
            assert {f"{name}/eval_loss", f"{name}/rougeL", f"{name}/perplexity"} <= set(line)
        assert line["eval_loss"] == line["first/eval_loss"]  # the first set is the primary one (plain keys)
        assert line["second/eval_loss"] != line["first/eval_loss"]

    results = json.loads((out / "results.json").read_text())
    sets_out = results["eval_sets"]
    assert list(sets_out) == ["first", "second"]
    assert (
        sets_out["first"]["dataset"]["num_examples"] == 12
        and sets_out["second"]["dataset"]["num_examples"] == 10
    )
    assert sets_out["first"]["final"] == results["final"] and not any("/" in k for k in results["final"])
    assert sets_out["second"]["baseline"]["eval_loss"] == evals[0]["second/eval_loss"]
    # the best checkpoint was chosen by the second set's loss: the lowest of the periodic evaluations' values
    periodic = [line for line in evals if line["step"] not in (0,)][:-1]
    best = min(periodic, key=lambda line: line["second/eval_loss"])
    assert (
        results["best"]["step"] == best["step"]
        and results["best"]["second/eval_loss"] == best["second/eval_loss"]
    )

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    entries = meta["model-index"][0]["results"]
    assert [e["dataset"]["name"] for e in entries] == ["first", "second"]
    assert [e["dataset"]["type"] for e in entries] == ["first.jsonl", "second.jsonl"]
    second_metrics = {m["type"]: m["value"] for m in entries[1]["metrics"]}
    assert second_metrics["eval_loss"] == sets_out["second"]["final"]["eval_loss"]
    report = (out / "report.md").read_text()
    assert "## Eval sets" in report and "### first" in report and "### second" in report

    # Independent reference: the published model scored on the second file alone, by the single-dataset path.
    alone = tmp_path / "alone"
    single = [
        *tiny_overrides(alone), "data.synthetic=null", f"data.validation_file={second}", "data.text_column=body",
        "data.summary_column=tldr", "data.max_eval_samples=10", "model.init=null", f"model.name_or_path={out / 'model'}",
        "eval.max_new_tokens=8",
    ]  # fmt: skip
    code, _, err = cli("eval", SUMMARIZATION, *single)
    assert code == 0, err[-3000:]
    final_alone = json.loads((alone / "results.json").read_text())["final"]
    assert final_alone["eval_loss"] == pytest.approx(sets_out["second"]["final"]["eval_loss"], abs=1e-4)
    assert final_alone["rougeL"] == pytest.approx(sets_out["second"]["final"]["rougeL"], abs=1e-4)


def test_an_eval_set_key_is_an_override_away(tmp_path):
    """`data.eval_sets.<name>.<key>=value` reaches that set (e.g. a smaller set for a quick `hftoolkit eval`)."""
    from hftoolkit.errors import UserError

    base = [*tiny_overrides(tmp_path / "o"), "data.eval_sets={a: {validation_file: a.jsonl}}"]
    recipe = load_recipe(SUMMARIZATION, [*base, "data.eval_sets.a.max_eval_samples=5"])
    assert recipe.data.eval_sets["a"].max_eval_samples == 5
    with pytest.raises(UserError, match=r"unknown key 'data\.eval_sets\.a\.max_eval_sample' \(did you mean"):
        load_recipe(SUMMARIZATION, [*base, "data.eval_sets.a.max_eval_sample=5"])


def test_a_validation_file_next_to_sources_is_the_validation_split_and_nothing_is_held_out(tmp_path):
    a, b = two_sources(tmp_path, n=60)
    held = write_jsonl(
        tmp_path / "dev.jsonl", [{"document": f"dev {i} .", "summary": f"d{i}"} for i in range(7)]
    )
    splits, _, _ = load_train(mixture_recipe(tmp_path, a, b, f"data.validation_file={held}"), tmp_path)
    assert splits["validation"]["document"] == [f"dev {i} ." for i in range(7)]
    assert (
        Counter(splits["train"][SOURCE_COLUMN])[0] == 60
    )  # all of source a: no validation part taken from it
