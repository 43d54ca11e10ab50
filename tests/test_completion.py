"""`task: completion`: any columns → prompt template → completion + EOS, with an optional label set."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from hftoolkit.data import encode_supervised
from hftoolkit.errors import UserError
from hftoolkit.evaluation import compute_scores
from hftoolkit.tasks import get_task

ALPACA_TEMPLATE = "{instruction}\n{input}\n### Response:"
ALPACA_ROWS = [
    {"instruction": "Reverse the words.", "input": "red fox runs", "output": "runs fox red"},
    {"instruction": "Name the colour.", "input": "the sky on a clear day", "output": "blue"},
    {"instruction": "Give a greeting.", "input": "", "output": "Hello there!\nHave a nice day."},
    {"instruction": "Count to three.", "input": "", "output": "one two three"},
] * 4


def data_cfg(**kw):
    base = dict(
        prompt_template=ALPACA_TEMPLATE, target_column="output", target_template=None, truncate_column=None,
        labels=None, synthetic=None,
    )  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture
def alpaca_files(tmp_path):
    for name, rows in (("train", ALPACA_ROWS), ("val", ALPACA_ROWS[:4])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "train.jsonl", tmp_path / "val.jsonl"


def alpaca_overrides(out, train, val, **extra):
    values = {
        "task": "completion",
        "output_dir": out,
        "model.init": "{preset: tiny, tokenizer: bpe, vocab_size: 300}",
        "data.train_file": train,
        "data.validation_file": val,
        "data.prompt_template": json.dumps(ALPACA_TEMPLATE),
        "data.target_column": "output",
        "data.max_seq_len": 64,
        "train.max_steps": 3,
        "train.logging_steps": 1,
        "train.per_device_train_batch_size": 4,
        "eval.max_new_tokens": 8,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_alpaca_shaped_jsonl_trains_and_generates(alpaca_files, tmp_path, cli):
    """If this fails, instruction data with its own columns cannot be trained, saved with its template, or used
    through `hftoolkit generate` with a JSON input."""
    out = tmp_path / "run"
    code, _, err = cli("train", "recipes/quickstart/classification.yaml", *alpaca_overrides(out, *alpaca_files),
                       "data.synthetic=null", "data.labels=null")  # fmt: skip
    assert code == 0, err
    final = json.loads((out / "results.json").read_text())["final"]
    assert {"rougeL", "eval_loss"} <= set(final)
    info = json.loads((out / "model" / "hftoolkit.json").read_text())
    assert info["task"] == "completion" and info["prompt_template"] == ALPACA_TEMPLATE
    assert info["source_field"] == "input"  # the template's last field is the one cut by default
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert preds[0]["prompt"] == "Reverse the words.\nred fox runs\n### Response:"
    assert preds[0]["references"] == ["runs fox red"]
    code, printed, err = cli(
        "generate", out / "model", "--input", json.dumps({"instruction": "Count to three.", "input": ""}),
        "--show-prompt", "--max-new-tokens", "3",
    )  # fmt: skip
    assert code == 0, err
    assert printed.startswith("Count to three.\n\n### Response:")
    assert (
        "{prompt_template}" not in (out / "README.md").read_text()
        and ALPACA_TEMPLATE in (out / "README.md").read_text()
    )


def test_only_the_prompt_is_masked_and_eos_keeps_its_label(gpt2_tokenizer):
    """If this fails, the loss falls on the instruction (or misses the response / the EOS that teaches the model to
    stop). The reference is independent: the prompt and the target tokenized on their own."""
    task, cfg = get_task("completion"), data_cfg()
    template = task.template(cfg)
    rows = ALPACA_ROWS[:3]
    examples = encode_supervised(task, template, gpt2_tokenizer, rows, cfg, max_len=256)
    eos = gpt2_tokenizer.eos_token_id
    for row, ex in zip(rows, examples, strict=True):
        prompt = template.render(task.fields(row, cfg))
        prompt_ids = gpt2_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = gpt2_tokenizer(" " + row["output"], add_special_tokens=False)["input_ids"] + [eos]
        assert ex["input_ids"] == prompt_ids + target_ids
        assert ex["labels"] == [-100] * len(prompt_ids) + target_ids
        assert ex["labels"][-1] == eos  # GPT-2 pads with EOS: the collators mask padding by length, not by id


def test_plan_masks_exactly_the_prompt(alpaca_files, tmp_path, cli):
    """If this fails, `hftoolkit plan` shows a different split between masked prompt and learned target than the
    one training uses."""
    overrides = alpaca_overrides(
        tmp_path / "plan", *alpaca_files, **{"model.init": "{preset: tiny, tokenizer: gpt2}"}
    )
    code, out, err = cli("plan", "recipes/quickstart/classification.yaml", *overrides, "data.synthetic=null",
                         "data.labels=null", "--no-color", "--examples", "1")  # fmt: skip
    assert code == 0, err
    assert "[[Reverse the words.\n  red fox runs\n  ### Response:]] runs fox red⟨eos⟩" in out


def test_truncation_cuts_the_named_field_never_the_target(gpt2_tokenizer):
    """If this fails, an over-long example loses its target (or the fixed template text) instead of the field
    data.truncate_column names."""
    task = get_task("completion")
    cfg = data_cfg(truncate_column="instruction")
    row = {"instruction": "word " * 200, "input": "keep me", "output": "the answer"}
    (ex,) = encode_supervised(task, task.template(cfg), gpt2_tokenizer, [row], cfg, max_len=32)
    text = gpt2_tokenizer.decode(ex["input_ids"])
    assert len(ex["input_ids"]) == 32
    assert text.endswith("\nkeep me\n### Response: the answer<|endoftext|>")


def test_empty_completion_rows_are_dropped_and_counted():
    """If this fails, a row with an empty or null output is trained on as "stop at once" without a word, or a row
    whose optional prompt field is empty (Alpaca's input) is thrown away."""
    from datasets import Dataset

    from hftoolkit.data import drop_bad_rows

    task, cfg = get_task("completion"), data_cfg(bad_rows="drop", max_bad_rows_share=0.5)
    rows = [*ALPACA_ROWS[:4], {"instruction": "x", "input": "y", "output": ""},
            {"instruction": "x", "input": "y", "output": None}, {"instruction": "", "input": "", "output": "z"}]  # fmt: skip
    kept, counts = drop_bad_rows(task, cfg, Dataset.from_list(rows), "train", "rows.jsonl")
    assert counts == {"empty output": 1, "null output": 1, "empty prompt": 1}
    assert kept.to_list() == ALPACA_ROWS[:4]  # rows 3 and 4 have an empty input, and are kept


def test_missing_template_field_names_the_field_and_the_columns(alpaca_files, tmp_path, cli):
    """If this fails, a template placeholder that is not a column fails mid-tokenization with a KeyError."""
    overrides = alpaca_overrides(
        tmp_path / "run", *alpaca_files, **{"data.prompt_template": '"{question}\\nA:"'}
    )
    code, _, err = cli("train", "recipes/quickstart/classification.yaml", *overrides, "data.synthetic=null",
                       "data.labels=null")  # fmt: skip
    assert code == 2
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        "error: data: column 'question' not in the train data (columns: instruction, input, output); "
        "set the task's column key (e.g. data.text_column)"
    ]


def test_labels_score_out_of_set_predictions_as_wrong():
    """If this fails, a classifier's prediction outside the label set is scored right, or not counted."""
    task = get_task("completion")
    cfg = data_cfg(labels=["billing", "shipping"])
    preds, refs = (
        ["billing", "billing ", "refund", "shipping"],
        [["billing"], ["billing"], ["billing"], ["billing"]],
    )
    names = task.default_metrics(cfg)
    assert names == ("exact_match",) and task.headline_metric(cfg) == "exact_match"
    scores, _ = compute_scores(names, preds, refs)
    assert (
        scores["exact_match"] == 25.0
    )  # "billing " (trailing space) and "refund" are wrong, like "shipping"
    extra = task.extra_scores(preds, refs, cfg)
    assert extra["out_of_label_set"] == 2.0
    # macro F1 over the labels seen: billing P=1/1 R=1/4 → 0.4; shipping P=0 R=0 (no gold) → 0.
    assert extra["macro_f1"] == pytest.approx(20.0)


def test_class_ids_name_their_labels():
    """If this fails, an integer ClassLabel column (AG News) trains on "2" instead of the label name."""
    task = get_task("completion")
    cfg = data_cfg(target_column="label", labels=["World", "Sports", "Business", "Sci/Tech"])
    assert task.target({"instruction": "", "input": "", "label": 3}, cfg) == "Sci/Tech"
    with pytest.raises(UserError, match=r"^data.labels: class id 7 in column 'label' but only 4 labels"):
        task.target({"label": 7}, cfg)


def test_completion_config_errors_are_one_line(tmp_path, cli):
    """If this fails, a completion recipe without a template or a target is accepted and fails later."""
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump({"task": "completion", "data": {"train_file": "x.jsonl"}}))
    code, _, err = cli("plan", rec)
    assert code == 2 and err.startswith("error: data.prompt_template: required for task completion")
    rec.write_text(
        yaml.safe_dump({"task": "completion", "data": {"train_file": "x.jsonl", "prompt_template": "{a}"}})
    )
    code, _, err = cli("plan", rec)
    assert code == 2 and err.startswith("error: data.target_column / data.target_template: set exactly one")
    rec.write_text(
        yaml.safe_dump(
            {"task": "completion",
             "data": {"train_file": "x.jsonl", "prompt_template": "{a}", "target_column": "b", "truncate_column": "c"}}
        )
    )  # fmt: skip
    code, _, err = cli("plan", rec)
    assert code == 2 and err.startswith(
        "error: data.truncate_column: 'c' is not a field of data.prompt_template"
    )
