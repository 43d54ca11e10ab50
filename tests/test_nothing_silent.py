"""Nothing silent: messy .txt corpora, one run per output_dir, extending a finished run (the run killed again and
again is in test_resume.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hftoolkit.rundir import LOCK
from tests.conftest import REPO_ROOT, tiny_overrides
from tests.test_resume import QA

GEN = "recipes/quickstart/generation.yaml"


def error_line(err: str) -> str:
    return next(line for line in err.splitlines() if line.startswith("error: "))


# ------------------------------------------------------------------------------------------------ .txt corpora


def test_txt_paragraphs_split_on_whitespace_only_lines(tmp_path, cli):
    """If this fails, a corpus whose blank lines carry spaces is read as one huge example (and its validation split
    then fails inside datasets), or blank runs become whitespace-only training documents."""
    paragraphs = [f"Paragraph {i} says the fox runs .\nIt has two lines ." for i in range(40)]
    text = "".join(p + ("\n \t\n" if i % 2 else "\n\n\n\n") for i, p in enumerate(paragraphs))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    out = tmp_path / "run"
    overrides = [
        *tiny_overrides(out),
        "data.synthetic=null",
        f"data.train_file={corpus}",
        "train.max_steps=1",
    ]
    code, _, err = cli("train", GEN, *overrides, "data.validation_split_percentage=10", "eval.baseline=false")
    assert code == 0, err
    data = json.loads((out / "results.json").read_text())["data"]
    assert (data["train"]["examples"], data["eval"]["examples"]) == (36, 4)
    assert data["train"]["bad_rows"] == {}  # the validation part is held out of the same, clean, rows


def test_txt_of_blank_lines_is_the_empty_split_error(tmp_path, cli):
    """If this fails, a .txt file holding only blank or whitespace lines trains on whitespace and writes a model."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n   \n\t\n\n")
    code, _, err = cli(
        "train", GEN, *tiny_overrides(tmp_path / "run"), "data.synthetic=null", f"data.train_file={corpus}"
    )
    assert code == 2
    assert (
        error_line(err)
        == f"error: data: the train split is empty ({corpus} has no rows); check data.train_file"
    )
    assert not (tmp_path / "run" / "model").exists()


# ------------------------------------------------------------------------------------------------ the lock


@pytest.fixture
def other_process():
    """A live process that is not this one (holds a lock in the tests), stopped afterwards."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def write_lock(run_dir: Path, pid: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": socket.gethostname(), "started": "2026-12-01 09:00:00"}
    (run_dir / LOCK).write_text(json.dumps(holder))


def test_a_second_run_in_the_same_output_dir_is_refused(tmp_path, cli, other_process):
    """If this fails, two runs write into one output_dir at once (with overwrite_output_dir the second deletes
    what the first writes) and both "succeed"."""
    out = tmp_path / "run"
    write_lock(out, other_process)
    for extra in ([], ["train.overwrite_output_dir=true"]):
        code, _, err = cli("train", QA, *tiny_overrides(out), *extra)
        assert code == 2
        assert error_line(err) == (
            f"error: output_dir: {out} is in use by another run (process {other_process} on {socket.gethostname()}, "
            "started 2026-12-01 09:00:00); wait for it to end or choose another output_dir"
        )
    assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing written


def test_a_stale_lock_is_taken_over_and_released(tmp_path, cli):
    """If this fails, a run killed with SIGKILL leaves a folder no later run may use, or a finished run keeps its
    lock."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "run"
    write_lock(out, gone.pid)
    code, printed, err = cli("train", QA, *tiny_overrides(out), "train.max_steps=1")
    assert code == 0, err
    assert f"output_dir: taking over the lock of process {gone.pid} (started 2026-12-01 09:00:00)" in printed
    assert not (out / LOCK).exists()


# ------------------------------------------------------------------------------------------------ extending


def test_resume_with_more_steps_extends_the_run(tmp_path, cli):
    """If this fails, the common way to extend a run that turned out too short (more max_steps) is refused, or the
    run does not say how the learning-rate schedule treats the new total; shortening below the checkpoint is still
    refused with the fix."""
    out = tmp_path / "run"
    base = [*tiny_overrides(out), "train.save_steps=2", "train.logging_steps=1", "eval.baseline=false"]
    assert cli("train", QA, *base)[0] == 0  # 4 steps
    code, printed, err = cli("train", QA, *base, "train.max_steps=6", "train.resume_from_checkpoint=latest")
    assert code == 0, err
    assert (
        "extending the run from 4 to 6 steps at step 4: the learning-rate schedule is rebuilt for 6 steps"
        in printed
    )
    results = json.loads((out / "results.json").read_text())
    assert results["extended"] == {
        "at_step": 4, "from_total_steps": 4, "to_total_steps": 6,
        "learning_rate_schedule": "rebuilt for 6 steps, continued from step 4",
    }  # fmt: skip
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert lines[-1]["kind"] == "eval" and lines[-1]["step"] == 6
    code, _, err = cli("train", QA, *base, "train.max_steps=5", "train.resume_from_checkpoint=latest")
    assert code == 2 and "is already at step 6; set train.max_steps (or num_train_epochs) beyond 6" in err
    code, _, err = cli("train", QA, *base, "train.max_steps=8", "train.learning_rate=0.002",
                       "train.resume_from_checkpoint=latest")  # fmt: skip
    assert code == 2 and "was trained with a different config (train.learning_rate: 0.001 → 0.002)" in err


# ------------------------------------------------------------------------------------------------ tokenization cache

PROBE = """
import json, sys
from datasets import load_dataset
import hftoolkit.data as data
from hftoolkit.config import load_recipe
from hftoolkit.modeling import gpt2_tokenizer, prepare_tokenizer
from hftoolkit.tasks import get_task
ds = load_dataset("json", data_files=sys.argv[1])["train"]
cfg = load_recipe(None, ["task=summarization", "data.synthetic.num_train=1"]).data
encoded, _ = data.tokenize_split(get_task("summarization"), prepare_tokenizer(gpt2_tokenizer(), "gpt2"), ds, cfg, 64, True)
assert data.__file__.startswith(sys.argv[2]), data.__file__
print(json.dumps(encoded[0]["labels"]))
"""


@pytest.mark.slow  # three subprocesses (~5 s of imports each)
def test_changed_tokenization_code_does_not_reuse_the_cache(tmp_path):
    """If this fails, datasets' map cache (keyed on the `encode` closure, which names the functions it calls
    without their code) hands an upgraded or edited hftoolkit the examples its previous version tokenized."""
    import shutil

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"document": f"Ann met Bob {i} .", "summary": f"Bob {i} ."}) + "\n"
                            for i in range(8)))  # fmt: skip
    copy = tmp_path / "copy"
    shutil.copytree(REPO_ROOT / "hftoolkit", copy / "hftoolkit")
    (copy / "probe.py").write_text(PROBE)
    env = {
        **os.environ,
        "PYTHONPATH": str(copy),
        "HF_DATASETS_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
    }

    def labels() -> list[int]:
        cmd = [sys.executable, "probe.py", str(rows), str(copy)]
        out = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = labels()
    assert labels() == first and first[-1] != -100  # the same code: the cache serves the same examples
    data_py = copy / "hftoolkit" / "data.py"
    old = '"labels": [-100] * len(prompt) + target,'
    assert data_py.read_text().count(old) == 1
    data_py.write_text(data_py.read_text().replace(old, '"labels": [-100] * (len(prompt) + len(target)),'))
    assert labels() == [-100] * len(first)  # the edited code re-tokenizes
