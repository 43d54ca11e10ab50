"""Evaluation suites (eval/*.yaml) on local fixtures the tests write, and sliding-window perplexity against a plain
loop over transformers' own loss."""

from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path

import pytest
import torch

from hftoolkit import suites
from tests.conftest import tiny_gpt2, tiny_overrides

WORDS = (
    "the council voted to build a new bridge over river on monday town will people said it was good".split()
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from hftoolkit.modeling import init_model_dir

    return Path(init_model_dir(str(tmp_path_factory.mktemp("suite_model") / "m"), "tiny", "gpt2", 1024, 0))


def sentence(i: int, n: int = 8) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)).capitalize() + " ."


def fixture_rows(suite: suites.Suite, n: int = 6) -> list[dict]:
    """Rows in the layout of the suite's Hub dataset (made up here, not copied from it)."""
    d = suite.data
    if suite.task == "generation":  # WikiText-like: headings, paragraphs and blank rows
        return [{"text": "" if i % 3 == 2 else f" = {sentence(i, 3)} = \n" if i % 3 == 0 else sentence(i, 30)}
                for i in range(n)]  # fmt: skip
    if suite.task == "summarization":
        return [{d["text_column"]: sentence(i, 40), d["summary_column"]: sentence(i, 6)} for i in range(n)]
    if suite.task == "translation":
        return [
            {"translation": {d["source_lang"]: sentence(i), d["target_lang"]: sentence(i + 1)}}
            for i in range(n)
        ]
    rows = []
    for i in range(n):
        context = sentence(i, 20)
        answer = [] if (d.get("no_answer_text") and i % 2) else [context.split()[3]]
        rows.append({"id": str(i), "title": "t", "context": context, "question": f"What is word {i} ?",
                     "answers": {"text": answer, "answer_start": [0] * len(answer)}})  # fmt: skip
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_on(suite, model, tmp_path, rows, *extra, limit=4):
    local = write_jsonl(tmp_path / f"{suite.name}.jsonl", rows)
    overrides = [f"data.validation_file={local}", "eval.max_new_tokens=6", *extra]
    out = tmp_path / "out"
    suites.run_suites(str(suite.path), str(model), limit, overrides, str(out))
    results = json.loads((out / "results.json").read_text())["suites"][suite.name]
    preds_path = out / "suites" / suite.name / "predictions.jsonl"
    preds = [json.loads(line) for line in preds_path.read_text().splitlines()] if preds_path.exists() else []
    return results, preds


SHIPPED = [s.name for s in suites.list_suites()]


def test_every_benchmark_of_the_issue_is_shipped():
    assert set(SHIPPED) == {
        "wikitext2", "wikitext103", "xsum", "cnn_dailymail", "wmt16_ro_en", "wmt14_en_de", "squad", "squad_v2",
    }  # fmt: skip


@pytest.mark.parametrize("name", [n for n in SHIPPED if suites.read_suite(n).task != "generation"])
def test_generating_suite_loads_prompts_and_scores_a_local_copy(name, tiny_model, tmp_path):
    """Fails if a suite's columns, template or split handling drift from its layout, or if the scores are not the
    ones its metric configuration gives on the predictions written (recomputed here from predictions.jsonl)."""
    suite = suites.read_suite(name)
    rows = fixture_rows(suite)
    entry, preds = run_on(suite, tiny_model, tmp_path, rows)
    assert entry["dataset"]["num_examples"] == 4 and len(preds) == 4
    assert entry["dataset"]["benchmark"] == suite.data["dataset_name"]
    # The prompt is the suite's template on the row (rendered here with str.format, not by the task).
    template = suite.data.get("prompt_template")
    if template:
        field = re.findall(r"{(\w+)}", template)[0]
        column = suite.data.get("text_column") or field
        assert preds[0]["prompt"] == template.format(**{field: rows[0][column]})
    for pinned, settings in suite.pinned.items():
        for key, value in settings.items():
            got = entry["metric_config"][pinned][key]
            assert (
                suites._unversioned(got) == suites._unversioned(value) if key == "signature" else got == value
            )
    texts = [p["prediction"] for p in preds]
    refs = [p["references"] for p in preds]
    if suite.task == "translation":
        import sacrebleu

        tgt = [r[0] for r in refs]
        assert entry["metrics"]["bleu"] == pytest.approx(
            sacrebleu.corpus_bleu(texts, [tgt], tokenize="13a").score, abs=1e-3
        )
        assert entry["metrics"]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(texts, [tgt]).score, abs=1e-3)
    assert set(suite.report) <= set(entry["metrics"])


@pytest.mark.parametrize("name", ["xsum", "wmt14_en_de", "squad", "squad_v2"])
def test_suite_scores_a_model_that_writes_the_references(name, tiny_model, tmp_path):
    """The references of a second local copy are the first run's predictions on half of the rows (the others keep
    theirs): the scores must be 100 on those rows and lower on the rest. Fails if scoring reads another column,
    misaligns predictions with rows, or (squad_v2) does not count a no-answer prediction on an unanswerable row."""
    suite = suites.read_suite(name)
    rows = fixture_rows(suite)[:4]
    _, preds = run_on(suite, tiny_model, tmp_path / "a", rows)
    echoed = [dict(r) for r in rows]
    d = suite.data
    for i, (row, p) in enumerate(zip(echoed, preds, strict=True)):
        if i % 2:
            continue
        if suite.task == "summarization":
            row[d["summary_column"]] = p["prediction"]
        elif suite.task == "translation":
            row["translation"] = {**row["translation"], d["target_lang"]: p["prediction"]}
        else:
            row["answers"] = {"text": [p["prediction"]], "answer_start": [0]}
    if name == "squad_v2":  # row 1: unanswerable, and the "model" says so
        echoed[1]["answers"] = {"text": [], "answer_start": []}
    entry, preds2 = run_on(suite, tiny_model, tmp_path / "b", echoed)
    assert [p["prediction"] for p in preds2] == [p["prediction"] for p in preds]
    m = entry["metrics"]
    if suite.task == "qa":
        if name == "squad_v2":
            texts = [p["prediction"] for p in preds2]
            right = 2 + (texts[1].lower() == "unanswerable")
            assert m["exact_match"] == pytest.approx(100 * right / 4)
            assert m["HasAns_exact"] == pytest.approx(100.0)
        else:
            assert m["exact_match"] == pytest.approx(50.0)
    elif suite.task == "translation":
        assert [p["score"] for p in preds2][0::2] == [100.0, 100.0]
    else:
        assert [p["score"] for p in preds2][0::2] == [100.0, 100.0]
        assert m["rouge1"] > 0


def test_no_answer_text_is_the_empty_answer_for_squad_v2():
    """Fails if data.no_answer_text is not read as "no answer" (or an unanswerable row as a bad row)."""
    from hftoolkit.config import DataConfig
    from hftoolkit.evaluation import compute_scores
    from hftoolkit.tasks import TASKS

    qa = TASKS["qa"]
    cfg = DataConfig(synthetic=None, no_answer_text="unanswerable")
    row = {"context": "Ann lives in Oslo .", "question": "Who ?", "answers": {"text": [], "answer_start": []}}
    assert qa.row_problem(row, cfg) is None and qa.target(row, cfg) == "unanswerable"
    assert qa.row_problem(row, DataConfig(synthetic=None)) == "empty answers"
    assert qa.default_metrics(cfg) == ("squad_v2",)
    preds = [qa.scoring_text(t, cfg) for t in ("Unanswerable", "Oslo", "unanswerable")]
    refs = [qa.references(row, cfg), ["Oslo"], ["Oslo"]]
    scores, _ = compute_scores(["squad_v2"], preds, refs)
    assert scores["exact_match"] == pytest.approx(200 / 3)
    assert scores["NoAns_exact"] == 100.0 and scores["HasAns_exact"] == 50.0


# ---------------------------------------------------------------------------------------------- perplexity


def reference_perplexity(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """The transformers guide's loop, one window at a time with transformers' own loss; the tokens counted are the
    labels the shifted loss really averages (the guide's `- 1` per window is exact only for the first window)."""
    seq = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        target_len = end - prev_end
        input_ids = seq[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-target_len] = -100
        n = int((labels[:, 1:] != -100).sum())
        if n:
            with torch.no_grad():
                nll += model(input_ids, labels=labels).loss.item() * n
            count += n
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("window,stride,batch", [(32, 8, 3), (32, 17, 2), (32, 32, 4), (16, 1, 8)])
def test_sliding_window_perplexity_equals_the_guide_loop(window, stride, batch):
    """Fails if a window scores tokens another already scored, skips some, or sees the wrong context."""
    from accelerate import Accelerator

    from hftoolkit.evaluation import sliding_window_perplexity

    model = tiny_gpt2(n_positions=64).eval()
    ids = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    got = sliding_window_perplexity(
        Accelerator(cpu=True), model, ids, [True] * len(ids), window, stride, batch
    )
    want, count = reference_perplexity(model, ids, window, stride)
    assert got["ppl_tokens"] == count
    assert got["perplexity"] == pytest.approx(want, rel=1e-5)
    if stride < window:
        assert count == len(ids) - 1  # every token but the first, once


def test_non_overlapping_stride_equals_todays_eval_loss(cli, tmp_path):
    """eval.perplexity_stride = data.max_seq_len reads the eval split as evaluate_loss does (packed blocks, the
    first token of a block and of a document unscored): the same perplexity. Fails if the stream or the windows
    differ from the blocks training evaluates."""
    recipe = "recipes/quickstart/generation.yaml"
    base = tiny_overrides(tmp_path / "plain", **{"data.synthetic.num_eval": 24, "data.max_seq_len": 64})
    assert cli("eval", recipe, *base)[0] == 0
    strided = [*base[1:], f"output_dir={tmp_path / 'strided'}", "eval.perplexity_stride=64"]
    assert cli("eval", recipe, *strided)[0] == 0
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())["final"]
    windows = json.loads((tmp_path / "strided" / "results.json").read_text())["final"]
    assert windows["ppl_tokens"] > 100
    assert windows["eval_loss"] == pytest.approx(plain["eval_loss"], abs=2e-4)
    # And an overlapping stride, with more context per token, reads the same tokens.
    overlap = [*base[1:], f"output_dir={tmp_path / 'overlap'}", "eval.perplexity_stride=16"]
    assert cli("eval", recipe, *overlap)[0] == 0
    more = json.loads((tmp_path / "overlap" / "results.json").read_text())["final"]
    assert more["ppl_windows"] > windows["ppl_windows"]


@pytest.mark.parametrize("name", ["wikitext2", "wikitext103"])
def test_perplexity_suite_reads_the_split_as_one_joined_text(name, tiny_model, tmp_path):
    """Fails if blank rows are dropped, the rows are joined otherwise than by the suite's string, or the windows
    are not the model's context moved by the suite's stride (a small context here: data.max_seq_len=48)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    suite = suites.read_suite(name)
    rows = fixture_rows(suite, n=12)
    entry, _ = run_on(
        suite, tiny_model, tmp_path, rows, "data.max_seq_len=48", "eval.perplexity_stride=16", limit=None
    )
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok("\n\n".join(r["text"] for r in rows), add_special_tokens=False)["input_ids"]
    want, count = reference_perplexity(AutoModelForCausalLM.from_pretrained(tiny_model).eval(), ids, 48, 16)
    assert entry["metrics"]["ppl_tokens"] == count == len(ids) - 1
    assert entry["metrics"]["perplexity"] == pytest.approx(want, rel=1e-3)
    assert entry["metric_config"]["perplexity"]["stride"] == 16


def test_suite_results_reach_the_card_and_the_report(fake_run_dir, tmp_path):
    """A suite run on a run directory adds model-index entries (dataset, split, metric settings) and a report
    table with the published reference beside the score."""
    from hftoolkit.card import build_model_card
    from hftoolkit.report import compare_runs

    suite = suites.read_suite("cnn_dailymail")
    local = write_jsonl(tmp_path / "cnn.jsonl", fixture_rows(suite))
    suites.run_suites(
        "cnn_dailymail", str(fake_run_dir), 3, [f"data.validation_file={local}", "eval.max_new_tokens=4"]
    )
    card = str(build_model_card(fake_run_dir))
    assert "cnn.jsonl" in card and "use_stemmer: true" in card
    written = (fake_run_dir / "README.md").read_text()
    assert "cnn.jsonl" in written and "29.34" not in written  # published scores are never claimed as ours
    assert all(f"type: {m}\n" in written for m in ("rouge1", "rouge2", "rougeL"))
    report = compare_runs([fake_run_dir])
    assert re.search(
        r"\| cnn_dailymail \| cnn.jsonl \(test, 3 examples\) \| rouge1 \| [\d.]+ \| 29.34 GPT-2 1542M", report
    )


def test_unloadable_dataset_names_it_and_the_local_override(tiny_model, tmp_path, cli):
    code, _, err = cli("eval", "--suite", "xsum", tiny_model, "--limit", "2", "--output-dir", tmp_path / "o")
    assert code == 2
    assert "suite xsum: cannot load EdinburghNLP/xsum split test" in err
    assert "data.validation_file=FILE (rows with document and summary columns)" in err


def test_suite_all_needs_a_task_and_picks_the_tasks_suites(tiny_model, tmp_path, cli):
    code, _, err = cli("eval", "--suite", "all", tiny_model, "--output-dir", tmp_path / "o")
    assert code == 2 and "does not say its task" in err
    target = suites.Target("m", tmp_path, None, "translation")
    assert [s.name for s in suites.suites_for("all", target)] == ["wmt14_en_de", "wmt16_ro_en"]


def test_shipped_suites_are_in_the_package_copy():
    """eval_suites (the installed package's copy) is the same folder as eval/ (quickstart reads it too)."""
    package = Path(suites.__file__).parent / "eval_suites"
    names = {p.name for p in package.glob("*.yaml")}
    assert {f"{n}.yaml" for n in SHIPPED} | {"quickstart.yaml"} <= names
    assert all(set(string.ascii_lowercase + "0123456789_") >= set(n) for n in SHIPPED)
