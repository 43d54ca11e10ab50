"""The README's error table, row by row: each row's bad input is produced here and the message the README shows
must be the one the user gets (placeholders FILE, PATH, L, C, N, M, P stand for any text, "…" for any text).

A README row without a case here fails `test_every_readme_row_has_a_case`, so the table cannot promise a message
that nothing checks.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, tiny_overrides

QA = "recipes/quickstart/qa.yaml"
TR = "recipes/quickstart/translation.yaml"
SUM = "recipes/quickstart/summarization.yaml"
PLACEHOLDERS = ("FILE", "PATH", "L", "C", "N", "M", "P")


def readme_rows() -> dict[str, list[str]]:
    """{bad input: [message snippets in backticks]} from the README's "## Errors" table."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("bad input", "---"):
            # The messages are the backticked snippets with words (the others name a file or a key).
            rows[cells[0]] = [m for m in re.findall(r"`([^`]+)`", cells[1]) if " " in m]
    return rows


def snippet_regex(snippet: str) -> re.Pattern:
    pattern = re.escape(snippet)
    for dots in (re.escape("…"), re.escape("(...)"), re.escape("...")):
        pattern = pattern.replace(dots, ".*")
    for name in PLACEHOLDERS:
        pattern = re.sub(rf"\b{name}\b", ".+?", pattern)
    return re.compile(pattern)


def error_lines(result) -> list[str]:
    code, out, err = result
    assert code == 2, (code, err[-2000:])
    # transformers' log handler keeps the stderr of the test that first logged (pytest's capture, closed since):
    # its "--- Logging error ---" reports are about the test harness, not about hftoolkit's output.
    harness = re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", "", err, flags=re.S)
    assert "Traceback" not in harness + out
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    return lines


def recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def qa_files(tmp_path: Path, train_text: str, name: str = "rows.jsonl") -> list[str]:
    train = tmp_path / name
    train.write_text(train_text)
    return [*tiny_overrides(tmp_path / "out"), "data.synthetic=null", f"data.train_file={train}"]


SQUAD_ROW = {
    "context": "Ann lives in Oslo .",
    "question": "Where does Ann live ?",
    "answers": {"text": ["Oslo"]},
}


def trained_with_checkpoint(cli, out: Path) -> None:
    overrides = [*tiny_overrides(out), "train.max_steps=2", "train.save_steps=1", "eval.baseline=false"]
    assert cli("train", QA, *overrides)[0] == 0


def case_malformed_yaml(tmp_path, cli, monkeypatch):
    return error_lines(cli("plan", recipe(tmp_path, "task: qa\ndata: [unclosed\n")))


def case_not_a_mapping(tmp_path, cli, monkeypatch):
    return error_lines(cli("plan", recipe(tmp_path, "- just\n- a list\n")))


def case_unknown_key(tmp_path, cli, monkeypatch):
    return error_lines(cli("plan", QA, "train.learnin_rate=1e-4"))


def case_wrong_type(tmp_path, cli, monkeypatch):
    return error_lines(cli("plan", QA, "train.max_steps=many"))


def case_out_of_range(tmp_path, cli, monkeypatch):
    return error_lines(cli("plan", QA, "train.learning_rate=3"))


def case_unknown_task_or_metric(tmp_path, cli, monkeypatch):
    return error_lines(cli("plan", QA, "task=poetry")) + error_lines(
        cli("plan", QA, *tiny_overrides(tmp_path / "o"), "eval.metrics=[x]")
    )


def case_push_without_repo(tmp_path, cli, monkeypatch):
    return error_lines(cli("train", QA, *tiny_overrides(tmp_path / "o"), "hub.push=true"))


def case_lora_push_local_base(tmp_path, cli, monkeypatch):
    out = tmp_path / "run"
    lora = ["model.lora={r: 4}", "train.max_steps=1", "eval.baseline=false"]
    assert cli("train", QA, *tiny_overrides(out), *lora)[0] == 0
    return error_lines(cli("push", out, "--repo-id", "alice/x", "--dry-run"))


def case_strategy_without_push(tmp_path, cli, monkeypatch):
    return error_lines(cli("plan", QA, "hub.strategy=every_save"))


def case_unknown_scheduler(tmp_path, cli, monkeypatch):
    return error_lines(cli("plan", QA, "train.lr_scheduler_type=x"))


def case_tracker_not_installed(tmp_path, cli, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    return error_lines(cli("train", QA, *tiny_overrides(tmp_path / "o"), "report_to=wandb"))


def case_missing_file_or_extension(tmp_path, cli, monkeypatch):
    missing = error_lines(
        cli("train", QA, *qa_files(tmp_path, ""), f"data.train_file={tmp_path / 'nope.jsonl'}")
    )
    (tmp_path / "rows.xml").write_text("<rows/>\n")
    return missing + error_lines(
        cli("train", QA, *qa_files(tmp_path, ""), f"data.train_file={tmp_path / 'rows.xml'}")
    )


def case_malformed_json_or_bytes(tmp_path, cli, monkeypatch):
    good = json.dumps(SQUAD_ROW) + "\n"
    malformed = error_lines(cli("train", QA, *qa_files(tmp_path, good + '{"context": \n')))
    (tmp_path / "bytes.jsonl").write_bytes(good.encode() + b'{"context": "\xff"}\n')
    undecodable = error_lines(
        cli("train", QA, *qa_files(tmp_path, ""), f"data.train_file={tmp_path / 'bytes.jsonl'}")
    )
    return malformed + undecodable


def case_empty_split(tmp_path, cli, monkeypatch):
    return error_lines(cli("train", QA, *qa_files(tmp_path, "")))  # the file name does not say "empty"


def case_missing_column(tmp_path, cli, monkeypatch):
    overrides = qa_files(tmp_path, json.dumps(SQUAD_ROW) + "\n")
    validation = f"data.validation_file={tmp_path / 'rows.jsonl'}"
    return error_lines(cli("train", QA, *overrides, validation, "data.question_column=x"))


def case_too_few_rows(tmp_path, cli, monkeypatch):
    return error_lines(cli("train", QA, *qa_files(tmp_path, json.dumps(SQUAD_ROW) + "\n")))


def messy_qa(tmp_path: Path, bad: int) -> list[str]:
    """10 QA rows whose first `bad` have a whitespace-only question."""
    rows = [dict(SQUAD_ROW, question=" " if i < bad else SQUAD_ROW["question"]) for i in range(10)]
    overrides = qa_files(tmp_path, "".join(json.dumps(r) + "\n" for r in rows))
    return [*overrides, f"data.validation_file={tmp_path / 'rows.jsonl'}"]


def case_unusable_rows(tmp_path, cli, monkeypatch):
    return error_lines(cli("train", QA, *messy_qa(tmp_path, 2)))


def case_unusable_rows_error(tmp_path, cli, monkeypatch):
    return error_lines(cli("train", QA, *messy_qa(tmp_path, 1), "data.bad_rows=error"))


def case_no_usable_row(tmp_path, cli, monkeypatch):
    return error_lines(cli("train", QA, *messy_qa(tmp_path, 10)))


def case_output_dir_in_use(tmp_path, cli, monkeypatch):
    import socket
    import subprocess
    import sys

    from hftoolkit.rundir import LOCK

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run").mkdir()
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "2026-12-01 09:00:00"}
        (tmp_path / "run" / LOCK).write_text(json.dumps(lock))
        return error_lines(cli("train", QA, *tiny_overrides(tmp_path / "run")))
    finally:
        holder.kill()
        holder.wait()


def resumed_with(tmp_path, cli, *changes: str) -> list[str]:
    """Train 2 steps with a checkpoint each, then resume from the latest with `changes`: the error line."""
    out = tmp_path / "run"
    trained_with_checkpoint(cli, out)
    resume = [*tiny_overrides(out), "train.max_steps=2", "train.resume_from_checkpoint=latest", *changes]
    return error_lines(cli("train", QA, *resume))


def case_fewer_steps(tmp_path, cli, monkeypatch):
    return resumed_with(tmp_path, cli, "train.max_steps=1")


def case_language_absent(tmp_path, cli, monkeypatch):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"translation": {"en": "A dog runs .", "fr": "Un chien court ."}}) + "\n")
    overrides = [*tiny_overrides(tmp_path / "o"), "data.synthetic=null", f"data.train_file={pairs}"]
    return error_lines(cli("train", TR, *overrides, f"data.validation_file={pairs}", "data.target_lang=de"))


def case_model_path_missing(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe_path = REPO_ROOT / QA
    return error_lines(
        cli(
            "train", recipe_path, *tiny_overrides(tmp_path / "o"), "model.init=null", "model.name_or_path=./x"
        )
    )


def case_tokenizer_without_eos(tmp_path, cli, monkeypatch):
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    model_dir = tmp_path / "no-eos"
    vocab = {f"w{i}": i for i in range(30)} | {"[UNK]": 30}
    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    ).save_pretrained(model_dir)
    GPT2LMHeadModel(GPT2Config(vocab_size=31, n_layer=1, n_embd=8, n_head=2, n_positions=64)).save_pretrained(
        model_dir
    )
    return error_lines(
        cli(
            "train", QA, *tiny_overrides(tmp_path / "o"), "model.init=null", f"model.name_or_path={model_dir}"
        )
    )


def case_sample_by_not_text(tmp_path, cli, monkeypatch):
    return error_lines(
        cli("plan", QA, *qa_files(tmp_path, json.dumps(SQUAD_ROW) + "\n"), "data.sample_by=line")
    )


def case_cache_dir_not_writable(tmp_path, cli, monkeypatch):
    (tmp_path / "a-file").write_text("")
    return error_lines(
        cli("preprocess", QA, *tiny_overrides(tmp_path / "o"), f"data.cache_dir={tmp_path}/a-file/c")
    )


def case_context_exceeded(tmp_path, cli, monkeypatch):
    overrides = [*tiny_overrides(tmp_path / "o"), "model.init.n_positions=1024", "data.max_seq_len=4096"]
    return error_lines(cli("train", QA, *overrides))


def case_output_dir_guards(tmp_path, cli, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    is_file = error_lines(cli("train", QA, *tiny_overrides(tmp_path / "a-file")))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    holds_run = error_lines(cli("train", QA, *tiny_overrides(tmp_path / "run")))
    assert (tmp_path / "run" / "results.json").read_text() == "{}"  # nothing written into the other run
    return is_file + holds_run


def case_missing_checkpoint(tmp_path, cli, monkeypatch):
    return error_lines(
        cli("train", QA, *tiny_overrides(tmp_path / "o"), f"train.resume_from_checkpoint={tmp_path}")
    )


def case_resume_changed(tmp_path, cli, monkeypatch):
    return resumed_with(tmp_path, cli, "train.learning_rate=0.002")


def case_disk_full(tmp_path, cli, monkeypatch):
    """The second save runs out of space after writing part of its files: the first checkpoint stays intact and
    no temp folder is left."""
    from accelerate import Accelerator

    real, calls = Accelerator.save_state, []

    def fills_the_disk(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 1:
            return real(self, output_dir, **kwargs)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", fills_the_disk)
    out = tmp_path / "run"
    lines = error_lines(cli("train", QA, *tiny_overrides(out), "train.save_steps=1", "eval.baseline=false"))
    checkpoints = out / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-0000001"]
    monkeypatch.setattr(Accelerator, "save_state", real)
    resumed = [
        *tiny_overrides(out),
        "train.save_steps=1",
        "train.resume_from_checkpoint=latest",
    ]
    assert cli("train", QA, *resumed)[0] == 0  # the checkpoint left behind is whole: training resumes from it
    return lines


def case_nan_loss(tmp_path, cli, monkeypatch):
    import torch

    import hftoolkit.train as train_mod

    real = train_mod.backward_window
    monkeypatch.setattr(
        train_mod, "backward_window", lambda *a, **k: real(*a, **k) * torch.tensor(float("nan"))
    )
    out = tmp_path / "run"
    lines = error_lines(cli("train", QA, *tiny_overrides(out), "eval.baseline=false"))
    assert not (out / "model").exists()
    return lines


def mixture_files(tmp_path: Path) -> tuple[Path, Path]:
    """Two summarization sources: a in the Hub layout (document/summary), b in its own (body/tldr)."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(
        "".join(json.dumps({"document": f"doc {i} .", "summary": f"s{i}"}) + "\n" for i in range(20))
    )
    b.write_text("".join(json.dumps({"body": f"body {i} .", "tldr": f"t{i}"}) + "\n" for i in range(20)))
    return a, b


def mixture_overrides(tmp_path: Path, second: str) -> list[str]:
    a, b = mixture_files(tmp_path)
    sources = f"data.sources=[{{train_file: {a}}}, {{train_file: {b}{second}}}]"
    return [*tiny_overrides(tmp_path / "o"), "data.synthetic=null", sources]


def case_mixture_unknown_column(tmp_path, cli, monkeypatch):
    overrides = mixture_overrides(tmp_path, ", text_column: x, summary_column: tldr")
    return error_lines(cli("train", SUM, *overrides))


def case_mixture_weight(tmp_path, cli, monkeypatch):
    negative = error_lines(cli("plan", SUM, *mixture_overrides(tmp_path, ", weight: -1")))
    return negative + error_lines(cli("plan", SUM, *mixture_overrides(tmp_path, ", weight: heavy")))


def case_mixture_task_mismatch(tmp_path, cli, monkeypatch):
    overrides = mixture_overrides(tmp_path, "")
    (tmp_path / "b.jsonl").write_text(json.dumps({"document": "A dog runs .", "gist": "dog"}) + "\n")
    return error_lines(cli("train", SUM, *overrides))


def case_mixture_with_train_file(tmp_path, cli, monkeypatch):
    overrides = mixture_overrides(tmp_path, "")
    return error_lines(cli("plan", SUM, *overrides, f"data.train_file={tmp_path / 'a.jsonl'}"))


def case_eval_sets_with_validation_file(tmp_path, cli, monkeypatch):
    a, _ = mixture_files(tmp_path)
    sets = f"data.eval_sets={{x: {{validation_file: {a}}}}}"
    return error_lines(cli("plan", SUM, *tiny_overrides(tmp_path / "o"), sets, f"data.validation_file={a}"))


def case_perplexity_stride(tmp_path, cli, monkeypatch):
    generation = "recipes/quickstart/generation.yaml"
    return error_lines(cli("plan", QA, "eval.perplexity_stride=8")) + error_lines(
        cli("plan", generation, "eval.perplexity_stride=2048")
    )


def case_unknown_suite(tmp_path, cli, monkeypatch):
    odd = tmp_path / "odd.yaml"
    odd.write_text("suite: odd\ntask: qa\ndata: {}\nx: 1\n")
    return (
        error_lines(cli("eval", "--suite", tmp_path / "nope.yaml", "gpt2"))
        + error_lines(cli("eval", "--suite", "eval/quickstart.yaml", "gpt2"))
        + error_lines(cli("eval", "--suite", odd, "gpt2"))
        + error_lines(cli("eval", "--suite", "xsum", "gpt2", "--limit", "0"))
    )


def case_suite_pin_differs(tmp_path, cli, monkeypatch):
    suite = (REPO_ROOT / "eval" / "wmt14_en_de.yaml").read_text()
    assert "sacrebleu: {tokenize: 13a}" in suite
    path = tmp_path / "wmt.yaml"
    path.write_text(suite.replace("sacrebleu: {tokenize: 13a}", "sacrebleu: {tokenize: intl}"))
    rows = tmp_path / "wmt.jsonl"
    rows.write_text(json.dumps({"translation": {"en": "a cat .", "de": "eine Katze ."}}) + "\n")
    model = suite_model(tmp_path)
    return error_lines(
        cli("eval", "--suite", path, model, "--output-dir", tmp_path / "o", f"data.validation_file={rows}",
            "eval.max_new_tokens=2")
    )  # fmt: skip


def suite_model(tmp_path) -> Path:
    from hftoolkit.modeling import init_model_dir

    return Path(init_model_dir(str(tmp_path / "m"), "tiny", "gpt2", 1024, 0))


def case_suite_dataset_unloadable(tmp_path, cli, monkeypatch):
    model = suite_model(tmp_path)
    return error_lines(cli("eval", "--suite", "xsum", model, "--limit", "2", "--output-dir", tmp_path / "o"))


def case_suite_all_without_task(tmp_path, cli, monkeypatch):
    model = suite_model(tmp_path)
    return error_lines(cli("eval", "--suite", "all", model, "--output-dir", tmp_path / "o"))


STREAM = ["data.streaming=true", "eval.baseline=false"]


def case_streaming_without_max_steps(tmp_path, cli, monkeypatch):
    return error_lines(cli("plan", QA, "data.streaming=true", "train.max_steps=-1"))


def case_streaming_cannot_honour(tmp_path, cli, monkeypatch):
    no_eval = qa_files(tmp_path, json.dumps(SQUAD_ROW) + "\n")
    train, _ = mixture_files(tmp_path)
    (tmp_path / "t.txt").write_text("one line\n\nanother\n")
    text_files = [f"data.train_file={tmp_path / 't.txt'}", f"data.validation_file={tmp_path / 't.txt'}"]
    text_files.append("data.synthetic=null")
    mixture = f"data.sources=[{{train_file: {train}, weight: 1}}]"
    return (
        error_lines(cli("train", QA, *no_eval, *STREAM))
        + error_lines(cli("plan", QA, *STREAM, "data.max_train_samples=10"))
        + error_lines(cli("plan", SUM, *STREAM, mixture, "data.synthetic=null"))
        + error_lines(
            cli("plan", "recipes/quickstart/generation.yaml", *STREAM, *text_files, "data.sample_by=line")
        )
    )


def case_streaming_resume_other_process_count(tmp_path, cli, monkeypatch):
    out = tmp_path / "run"
    steps = [*tiny_overrides(out), *STREAM, "train.max_steps=1", "train.save_steps=1"]
    assert cli("train", QA, *steps)[0] == 0
    state = out / "checkpoints" / "step-0000001" / "hftoolkit_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "num_processes": 2}))
    return error_lines(cli("train", QA, *steps, "train.max_steps=2", "train.resume_from_checkpoint=latest"))


def case_streaming_checkpoint_without_position(tmp_path, cli, monkeypatch):
    out = tmp_path / "run"
    steps = [*tiny_overrides(out), *STREAM, "train.max_steps=1", "train.save_steps=1"]
    assert cli("train", QA, *steps)[0] == 0
    (out / "checkpoints" / "step-0000001" / "stream_state_0.json").unlink()
    return error_lines(cli("train", QA, *steps, "train.max_steps=2", "train.resume_from_checkpoint=latest"))


def case_streaming_share_without_example(tmp_path, cli, monkeypatch):
    # Every training question (the part of a QA prompt that is never cut) is longer than data.max_seq_len, so no
    # row gives an example; the evaluation rows fit.
    long = dict(SQUAD_ROW, question="Where " * 40 + "?")
    overrides = qa_files(tmp_path, (json.dumps(long) + "\n") * 4)
    (tmp_path / "eval.jsonl").write_text(json.dumps(SQUAD_ROW) + "\n")
    validation = f"data.validation_file={tmp_path / 'eval.jsonl'}"
    return error_lines(cli("train", QA, *overrides, validation, *STREAM, "data.max_seq_len=32"))


CASES = {
    "malformed YAML": case_malformed_yaml,
    "perplexity stride out of place": case_perplexity_stride,
    "suite file, name or --limit wrong": case_unknown_suite,
    "suite metric settings differ from its pin": case_suite_pin_differs,
    "suite dataset cannot be loaded (offline, renamed)": case_suite_dataset_unloadable,
    "`--suite all` on a model without a task": case_suite_all_without_task,
    "recipe not a mapping": case_not_a_mapping,
    "unknown key": case_unknown_key,
    "wrong type": case_wrong_type,
    "out-of-range value": case_out_of_range,
    "unknown task / metric": case_unknown_task_or_metric,
    "Hub push without repo id": case_push_without_repo,
    "LoRA push whose base is not on the Hub": case_lora_push_local_base,
    "checkpoint uploads without push or saves": case_strategy_without_push,
    "unknown learning-rate schedule": case_unknown_scheduler,
    "tracker not installed": case_tracker_not_installed,
    "missing data file / bad extension": case_missing_file_or_extension,
    "malformed JSON line / undecodable bytes": case_malformed_json_or_bytes,
    "empty dataset or split": case_empty_split,
    "missing column": case_missing_column,
    "data.sample_by on a file that is not .txt": case_sample_by_not_text,
    "tokenized cache folder not writable": case_cache_dir_not_writable,
    "rows with a null, missing, empty or whitespace-only field the task needs": case_unusable_rows,
    "the same with `data.bad_rows: error`": case_unusable_rows_error,
    "a split with no usable row": case_no_usable_row,
    "another run is writing into output_dir": case_output_dir_in_use,
    "resume to fewer steps than the checkpoint has": case_fewer_steps,
    "no validation data and too few rows to hold some out": case_too_few_rows,
    "mixture source naming a column it lacks": case_mixture_unknown_column,
    "mixture weight ≤ 0 or not a number": case_mixture_weight,
    "mixture source whose columns do not fit the task": case_mixture_task_mismatch,
    "`data.sources` next to `data.train_file` / `dataset_name` / `synthetic`": case_mixture_with_train_file,
    "`data.eval_sets` next to `data.validation_file`": case_eval_sets_with_validation_file,
    "translation language absent": case_language_absent,
    "model path missing": case_model_path_missing,
    "tokenizer without EOS": case_tokenizer_without_eos,
    "max_seq_len beyond the context": case_context_exceeded,
    "output_dir is a file / holds another run": case_output_dir_guards,
    "missing checkpoint to resume": case_missing_checkpoint,
    "resume with changed config/data": case_resume_changed,
    "no disk space while saving": case_disk_full,
    "NaN/inf loss": case_nan_loss,
    "streaming without train.max_steps": case_streaming_without_max_steps,
    "streaming with a setting it cannot honour": case_streaming_cannot_honour,
    "streaming resume on another process count": case_streaming_resume_other_process_count,
    "streaming checkpoint without its stream position": case_streaming_checkpoint_without_position,
    "a process's share of the stream gives no example": case_streaming_share_without_example,
}


def test_every_readme_row_has_a_case():
    """If this fails, the README promises an error message that no test produces (or a case lost its row)."""
    assert set(readme_rows()) == set(CASES)


@pytest.mark.parametrize("row", list(CASES))
def test_readme_row_is_the_message_users_get(row, tmp_path, cli, monkeypatch):
    """If this fails, the README's error table shows a message that this bad input no longer produces."""
    lines = CASES[row](tmp_path, cli, monkeypatch)
    snippets = readme_rows()[row]
    assert snippets, row
    for snippet in snippets:
        assert any(snippet_regex(snippet).search(line) for line in lines), (snippet, lines)
