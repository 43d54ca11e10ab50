"""The Task protocol is the one home of task knowledge: a task registered in hftoolkit.tasks.TASKS alone is
accepted by the recipe, generates its synthetic data, trains, evaluates and gets its model card."""

from __future__ import annotations

import json

import pytest
import yaml

from hftoolkit.config import load_recipe
from hftoolkit.errors import UserError
from hftoolkit.rundir import ModelInfo
from hftoolkit.tasks import TASKS
from hftoolkit.tasks.summarization import SummarizationTask
from tests.conftest import tiny_overrides

QS = "recipes/quickstart"


class ReverseTask(SummarizationTask):
    """A made-up task: write the words of a short text backwards. Defined here only, registered at run time."""

    name = "reverse"
    headline = "rougeL"
    hub_task = ("text2text-generation", "Word Reversal")

    def template(self, data_cfg):
        from hftoolkit.tasks.base import PromptTemplate

        return PromptTemplate("{document}\nReversed:", source_field="document")

    def synthetic_rows(self, rng, stream):
        words = ["red", "fox", "runs", "far", "blue", "cat", "sleeps", "here"]
        while True:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))
            yield {"document": text, "summary": " ".join(reversed(text.split()))}


@pytest.fixture
def reverse_task(monkeypatch):
    monkeypatch.setitem(TASKS, "reverse", ReverseTask())


def test_a_task_registered_alone_trains_end_to_end(reverse_task, tmp_path, cli):
    """If this fails, adding a task needs edits outside tasks/ again (a task-name list in config, synthetic data,
    the card's task type, the evaluation or report code)."""
    out = tmp_path / "run"
    code, _, err = cli("train", f"{QS}/summarization.yaml", *tiny_overrides(out), "task=reverse")
    assert code == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["task"] == "reverse"
    rows = [json.loads(line) for line in (out / "synthetic_data" / "train.jsonl").read_text().splitlines()]
    assert rows[0]["summary"].split() == rows[0]["document"].split()[::-1]
    assert ModelInfo.read(out / "model").prompt_template == "{document}\nReversed:"
    card = (out / "README.md").read_text()
    assert "text2text-generation" in card and "Word Reversal" in card
    assert "rougeL" in json.loads((out / "results.json").read_text())["final"]


def test_unknown_task_names_the_registered_ones(tmp_path):
    """If this fails, `task:` is checked against a list that can drift from the registry."""
    path = tmp_path / "r.yaml"
    path.write_text("task: poetry\ndata: {synthetic: {}}\n")
    with pytest.raises(
        UserError, match=r"^task: expected one of 'generation' \| 'summarization' \| 'translation'"
    ):
        load_recipe(path)


def test_config_yaml_is_the_resolved_recipe(tmp_path, cli):
    """If this fails, config.yaml is written before the task fills in what it derives (the synthetic
    translation languages), so `hftoolkit train OUTPUT_DIR/config.yaml` would not describe the run."""
    out = tmp_path / "run"
    overrides = [*tiny_overrides(out), "data.source_lang=null", "data.target_lang=null", "train.max_steps=1"]
    code, _, err = cli("train", f"{QS}/translation.yaml", *overrides, "eval.baseline=false")
    assert code == 0, err
    data = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert (data["source_lang"], data["target_lang"]) == ("en", "xx")


def test_model_info_that_does_not_parse_is_one_line(tmp_path):
    """If this fails, a corrupt model/hftoolkit.json gives a traceback in `generate`, `merge` or the card."""
    (tmp_path / "hftoolkit.json").write_text("{not json")
    with pytest.raises(UserError, match=r"hftoolkit.json is not valid JSON .*: fix it or re-save the model"):
        ModelInfo.read(tmp_path)


def test_a_template_without_the_source_placeholder_is_one_line(tmp_path, cli):
    """If this fails, a data.prompt_template override that drops the task's source field crashes mid-tokenization
    (it used to: "ValueError: not enough values to unpack")."""
    overrides = [
        *tiny_overrides(tmp_path / "run"),
        'data.prompt_template="{ctx} Question: {question} Answer:"',
    ]
    code, _, err = cli("plan", f"{QS}/qa.yaml", *overrides)
    assert code == 2
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        "error: data.prompt_template: must contain {context} exactly once, got '{ctx} Question: {question} Answer:'"
    ]


def messy_summaries(tmp_path, bad: dict[int, dict]) -> list[str]:
    """12 training rows (the first 6 also the validation file) with `bad` replacing some; overrides to train."""
    rows = [
        {"document": f"Ann met Bob in town number {i} .", "summary": f"Ann met Bob {i} ."} for i in range(12)
    ]
    for i, row in bad.items():
        rows[i] = row
    for name, part in (("train", rows), ("val", rows[:6])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return [*tiny_overrides(tmp_path / "run"), "data.synthetic=null", f"data.train_file={tmp_path / 'train.jsonl'}",
            f"data.validation_file={tmp_path / 'val.jsonl'}", "train.max_steps=1"]  # fmt: skip


BAD = {3: {"document": "Ann met Bob .", "summary": ""}, 5: {"document": "Ann met Bob .", "summary": None},
       8: {"document": "  \n ", "summary": "Ann met Bob ."}, 9: {"summary": "Ann met Bob ."}}  # fmt: skip


def test_rows_the_task_cannot_use_are_dropped_counted_and_not_scored(tmp_path, cli):
    """If this fails, a blank, null or missing field is trained on as an empty string, or scored as an empty
    reference, without a word."""
    overrides = [*messy_summaries(tmp_path, BAD), "data.max_bad_rows_share=0.4"]
    code, printed, err = cli("train", f"{QS}/summarization.yaml", *overrides)
    assert code == 0, err
    data = json.loads((tmp_path / "run" / "results.json").read_text())["data"]
    assert data["train"]["bad_rows"] == {
        "empty summary": 1, "null summary": 1, "whitespace-only document": 1, "null document": 1
    }  # fmt: skip
    assert data["train"]["examples"] == 8
    assert data["eval"]["bad_rows"] == {"empty summary": 1, "null summary": 1}
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == 4
    assert "data (train): dropped 4 unusable rows (1 empty summary, 1 null summary, " in printed


def test_too_many_bad_rows_or_bad_rows_error_name_the_rows(tmp_path, cli):
    """If this fails, a file that is mostly broken trains on what is left without stopping, or data.bad_rows=error
    does not say which rows to fix."""
    code, _, err = cli("train", f"{QS}/summarization.yaml", *messy_summaries(tmp_path, BAD))
    line = next(x for x in err.splitlines() if x.startswith("error"))
    assert code == 2 and line == (
        f"error: data: 4 of 12 train rows in {tmp_path / 'train.jsonl'} are unusable (1 empty summary, 1 null summary, "
        "1 whitespace-only document, 1 null document; rows 4, 6, 9, 10), more than data.max_bad_rows_share=0.05; "
        "fix the data or raise that share"
    )
    code, _, err = cli(
        "train", f"{QS}/summarization.yaml", *messy_summaries(tmp_path, {8: BAD[8]}), "data.bad_rows=error"
    )
    line = next(x for x in err.splitlines() if x.startswith("error"))
    assert code == 2 and line == (
        f"error: data: 1 unusable train row(s) in {tmp_path / 'train.jsonl'} (1 whitespace-only document; rows 9); "
        "fix them, or set data.bad_rows=drop to leave them out"
    )
