"""Bad input: one line naming the key/file/row and the fix, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import errno
import json

import pytest

from tests.conftest import tiny_overrides

QA = "recipes/quickstart/qa.yaml"


def assert_clean_error(result, *words):
    code, out, err = result
    assert code == 2, (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, words",
    [
        ("task: qa\ndata: {synthetic: {}\n", ["r.yaml", "line", "malformed YAML"]),
        ("- just\n- a list\n", ["expected a mapping"]),
        (
            "task: qa\ndata: {synthetic: {}}\ntrain: {learnin_rate: 1}\n",
            ["train.learnin_rate", "did you mean 'learning_rate'"],
        ),
        (
            "task: qa\ndata: {synthetic: {}}\ntrain: {max_steps: many}\n",
            ["train.max_steps", "expected an integer"],
        ),
        ("task: poetry\ndata: {synthetic: {}}\n", ["task", "expected one of"]),
        (
            "task: qa\ndata: {synthetic: {}}\ntrain: {learning_rate: 3}\n",
            ["train.learning_rate", "out of range"],
        ),
        (
            "task: qa\ndata: {synthetic: {}}\ntrain: {per_device_train_batch_size: 0}\n",
            ["per_device_train_batch_size"],
        ),
        ("task: qa\ndata: {synthetic: {}}\ntrain: {warmup_ratio: -0.1}\n", ["train.warmup_ratio"]),
        ("task: qa\ndata: {synthetic: {}}\neval: {num_beams: 0}\n", ["eval.num_beams"]),
        ("task: qa\ndata: {synthetic: {}}\nhub: {push: true}\n", ["hub.repo_id", "required"]),
        ("task: qa\ndata: {}\n", ["data", "exactly one of"]),
    ],
)
def test_recipe_errors(tmp_path, cli, text, words):
    """Recipe problems are caught before any work, with the key and the fix; nothing is written."""
    path = write(tmp_path, "r.yaml", text)
    assert_clean_error(cli("train", path, f"output_dir={tmp_path / 'out'}"), *words)
    assert not (tmp_path / "out").exists()


def test_missing_recipe_file(tmp_path, cli):
    """A missing recipe names the file and how to find shipped ones."""
    assert_clean_error(cli("train", tmp_path / "nope.yaml"), "nope.yaml", "no such file", "recipes ls")


def test_bad_override(tmp_path, cli):
    """An override without '=' or with an unknown key is rejected."""
    assert_clean_error(cli("train", QA, "train.max_steps"), "key.sub=value")
    assert_clean_error(cli("train", QA, "train.max_stepz=3"), "did you mean 'max_steps'")


def data_recipe(tmp_path, train_file, extra=""):
    return write(
        tmp_path, "r.yaml",
        f"task: qa\noutput_dir: {tmp_path / 'out'}\nmodel: {{init: {{preset: tiny, tokenizer: bpe, vocab_size: 300}}}}\n"
        f"data: {{train_file: {train_file}, max_seq_len: 64}}\ntrain: {{max_steps: 1}}\n{extra}",
    )  # fmt: skip


def test_missing_data_file(tmp_path, cli):
    assert_clean_error(
        cli("train", data_recipe(tmp_path, tmp_path / "none.jsonl")), "data.train_file", "no such file"
    )


def test_malformed_json_line_and_bytes(tmp_path, cli):
    """Malformed JSON lines and undecodable bytes name the file and the line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "question": "b", "answers": "c"}\n{oops}\n')
    assert_clean_error(cli("train", data_recipe(tmp_path, bad)), "bad.jsonl line 2", "malformed JSON")
    bad.write_bytes(b'{"context": "a", "question": "b", "answers": "c"}\n{"context": "\xff\xfe"}\n')
    assert_clean_error(cli("train", data_recipe(tmp_path, bad)), "line 2", "not UTF-8")


def test_empty_file_and_missing_column(tmp_path, cli):
    """An empty dataset and a missing column (with the columns that exist) are clean errors."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_clean_error(cli("train", data_recipe(tmp_path, empty)), "empty")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"passage": "p", "question": "q", "answers": "a"}) + "\n" for _ in range(4))
    )
    assert_clean_error(
        cli("train", data_recipe(tmp_path, rows)), "column 'context'", "columns: passage, question, answers"
    )


def test_translation_language_absent(tmp_path, cli):
    rows = tmp_path / "t.jsonl"
    rows.write_text("".join(json.dumps({"translation": {"en": "a b", "fr": "c d"}}) + "\n" for _ in range(4)))
    recipe = write(
        tmp_path, "t.yaml",
        f"task: translation\noutput_dir: {tmp_path / 'out'}\nmodel: {{init: {{preset: tiny, tokenizer: bpe, vocab_size: 300}}}}\n"
        f"data: {{train_file: {rows}, source_lang: en, target_lang: de}}\n",
    )  # fmt: skip
    assert_clean_error(cli("train", recipe), "data.target_lang", "'de'", "languages: en, fr")


def test_model_path_missing_and_context(tmp_path, cli):
    """A model folder that does not exist, and max_seq_len beyond the model's context."""
    assert_clean_error(
        cli(
            "train",
            QA,
            *tiny_overrides(tmp_path / "o"),
            "model.init=null",
            "model.name_or_path=./no/such/model",
        ),
        "model.name_or_path",
        "does not exist",
    )
    assert_clean_error(
        cli("train", QA, *tiny_overrides(tmp_path / "o2"), "data.max_seq_len=4096"),
        "data.max_seq_len",
        "context of 512",
    )


def test_unknown_metric(tmp_path, cli):
    assert_clean_error(
        cli("train", QA, *tiny_overrides(tmp_path / "o"), "eval.metrics=[no_such_metric_xyz]"),
        "eval.metrics",
        "no_such_metric_xyz",
    )


def test_tokenizer_without_eos():
    """A tokenizer with no EOS is refused: completions could never end."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from hftoolkit.errors import UserError
    from hftoolkit.modeling import prepare_tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    )
    with pytest.raises(UserError, match="no EOS token"):
        prepare_tokenizer(tok, "some/model")


def test_output_dir_guards(tmp_path, cli):
    """output_dir that is a file, or that already holds a run, is refused unless resuming or overwriting."""
    f = tmp_path / "afile"
    f.write_text("x")
    assert_clean_error(cli("train", QA, *tiny_overrides(f)), "output_dir", "is a file")
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    assert_clean_error(cli("train", QA, *tiny_overrides(out)), "already holds a run", "overwrite_output_dir")
    assert json.loads((out / "results.json").read_text()) == {}  # nothing touched
    assert_clean_error(
        cli("train", QA, *tiny_overrides(out), "train.resume_from_checkpoint=/no/such/ckpt"),
        "resume_from_checkpoint",
        "not a checkpoint",
    )


def test_nan_loss_stops_with_step(tmp_path, cli, monkeypatch):
    """A NaN loss stops training at the logging step that sees it, names the step, and saves no model."""
    import torch

    import hftoolkit.train as train_mod

    real = train_mod.backward_window

    def poisoned(acc, model, window, targets_only):
        real(acc, model, window, targets_only)
        return torch.tensor(float("nan"))

    monkeypatch.setattr(train_mod, "backward_window", poisoned)
    out = tmp_path / "run"
    line = assert_clean_error(
        cli("train", QA, *tiny_overrides(out), "eval.baseline=false"), "loss became nan", "step 2"
    )
    assert "Last good checkpoint" in line
    assert not (out / "model").exists()


def test_disk_full_while_saving(tmp_path, cli, monkeypatch):
    """ENOSPC during a checkpoint save is one line; no half-written checkpoint is left behind."""
    from accelerate import Accelerator

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", full)
    out = tmp_path / "run"
    assert_clean_error(
        cli("train", QA, *tiny_overrides(out), "train.save_steps=2", "eval.baseline=false"),
        "no space left",
        "resume",
    )
    assert not list((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else True
    assert not list((out / "checkpoints").glob(".tmp-*")) if (out / "checkpoints").exists() else True


def test_unexpected_error_is_one_line_without_debug(cli, monkeypatch):
    """Even an unexpected exception prints one line (with a --debug hint) and exits non-zero; --debug re-raises."""
    import hftoolkit.recipes as rec

    monkeypatch.setattr(rec, "list_recipes", lambda: 1 / 0)
    code, _, err = cli("recipes", "ls")
    assert code == 1 and "ZeroDivisionError" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        cli("recipes", "ls", "--debug")


@pytest.mark.parametrize(
    "command",
    ["train", "eval", "plan", "generate", "init-model", "push", "recipes", "report", "merge", "quickstart"],
)
def test_every_command_has_help(cli, command):
    """Every command documents itself."""
    code, out, _ = cli(command, "--help")
    assert code == 0 and "usage: hftoolkit" in out
