"""Resume: N straight steps == N/2 steps + resume + N/2 steps, after a kill -9 mid-save, after SIGTERM, and
refusals when what would be trained changed.

One straight run (module fixture, 4 steps, checkpoint every 2) is the reference for the interrupted runs. Dropout
stays on (GPT-2's 0.1), so exactness also covers the RNG states a checkpoint restores.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hftoolkit.checkpoint import TRAINER_STATE, list_checkpoints, resolve_resume
from tests.conftest import REPO_ROOT, tiny_overrides

QA = str(REPO_ROOT / "recipes/quickstart/qa.yaml")
STEPS, SAVE = 4, 2
# Gradient accumulation (2 micro-batches of 4) and packing (the default): the state a resume must restore
# includes the position inside the epoch in micro-batches.
ACCUMULATION = {"train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 2}


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory) -> dict[str, Path]:
    """The synthetic QA rows as local files, so a test can change the data without changing the config."""
    from hftoolkit.synthetic import make_dataset_files

    return make_dataset_files("qa", tmp_path_factory.mktemp("qa_data"), 64, 8)


def overrides(out: Path, files: dict, **extra) -> list[str]:
    values = {
        "data.synthetic": "null",
        "data.train_file": files["train"],
        "data.validation_file": files["validation"],
        "train.max_steps": STEPS,
        "train.save_steps": SAVE,
        "train.logging_steps": 1,
        "eval.baseline": "false",
        **extra,
    }
    return tiny_overrides(out, **values)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, qa_files) -> Path:
    """4 uninterrupted steps (accumulation, packing, dropout), checkpoints at steps 2 and 4."""
    from hftoolkit.cli import main

    out = tmp_path_factory.mktemp("straight") / "run"
    try:
        assert main(["train", QA, *overrides(out, qa_files, **ACCUMULATION)]) == 0
    finally:
        reset_accelerate()
    return out


def train_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["kind"] == "train"]


def assert_same_training(reference: Path, resumed: Path) -> None:
    """Same logged loss at every step and the same final weights (float noise at most)."""
    assert train_losses(resumed) == pytest.approx(train_losses(reference), rel=1e-6)
    assert len(train_losses(resumed)) == STEPS
    w_ref, w_res = (load_file(d / "model" / "model.safetensors") for d in (reference, resumed))
    assert w_ref.keys() == w_res.keys()
    for k in w_ref:
        torch.testing.assert_close(w_res[k], w_ref[k], atol=1e-6, rtol=0)


def cut_back(src: Path, dst: Path, step: int) -> None:
    """A copy of a finished run as it was right after saving checkpoint `step` (a simulated pre-emption)."""
    shutil.copytree(src, dst)
    written_at_the_end = (
        "model",
        "base_model",
        "plots",
        "results.json",
        "predictions.jsonl",
        "report.md",
        "README.md",
    )
    for name in written_at_the_end:
        path = dst / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for ckpt in list_checkpoints(dst / "checkpoints"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)


@pytest.mark.slow  # a subprocess (~15 s of imports) besides the in-process resume
def test_resume_after_kill_9_during_a_save_is_exact(straight, qa_files, tmp_path, cli):
    """A run killed (SIGKILL) in the middle of writing checkpoint 4 leaves checkpoint 2 intact and picked by
    `latest`; resuming from it replays steps 3-4 exactly as the straight run did (same losses, same weights).
    Failing means a half-written checkpoint can be taken for a complete one, or a resume does not restore
    weights, optimizer, scheduler, RNG states or the position inside the epoch (accumulation + packing)."""
    out = tmp_path / "run"
    # Every save pauses 2 s with its temp folder half-written (test hook in checkpoint.py).
    env = {**os.environ, "HFTOOLKIT_TEST_SAVE_DELAY": "2"}
    cmd = [sys.executable, "-m", "hftoolkit", "train", QA, *overrides(out, qa_files, **ACCUMULATION)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # accelerator.save_state writes the RNG states last: once they exist the save is under way, not finished.
    half_written = out / "checkpoints" / f".tmp-step-{STEPS:07d}" / "random_states_0.pkl"
    deadline = time.monotonic() + 240
    while not half_written.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the run never reached its second save"
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    assert not (half_written.parent / TRAINER_STATE).exists()
    assert resolve_resume("latest", out) == out / "checkpoints" / f"step-{SAVE:07d}"
    code, stdout, err = cli(
        "train", QA, *overrides(out, qa_files, **ACCUMULATION), "train.resume_from_checkpoint=latest"
    )
    assert code == 0, err
    assert f"resumed from {out / 'checkpoints' / f'step-{SAVE:07d}'} at step {SAVE}" in stdout
    assert_same_training(straight, out)
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the next save cleaned the leftover


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(straight, qa_files, tmp_path, cli, monkeypatch):
    """SIGTERM (pre-emption notice) during training: the run saves a checkpoint at the next optimizer step, exits
    with 143 and prints the command that resumes it; that command finishes the run exactly like the straight one.
    Failing means a pre-empted job loses its progress, or the printed command does not resume it."""
    out = tmp_path / "run"
    monkeypatch.setenv("HFTOOLKIT_TEST_SAVE_DELAY", "1")
    # The signal goes to this (pytest) process: keep a harmless handler around the run, in case it lands late.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    in_save = out / "checkpoints" / f".tmp-step-{SAVE:07d}" / "random_states_0.pkl"

    def send_sigterm_during_first_save():
        deadline = time.monotonic() + 240
        while not in_save.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send_sigterm_during_first_save, daemon=True)
    sender.start()
    try:
        code, stdout, err = cli("train", QA, *overrides(out, qa_files, **ACCUMULATION))
    finally:
        sender.join(timeout=5)
        signal.signal(signal.SIGTERM, previous)
    assert code == 143, err
    # The flag is set during the step-2 save, so the loop stops (and saves) at step 3.
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        f"step-{SAVE:07d}",
        f"step-{SAVE + 1:07d}",
    ]
    assert not (out / "model").exists()
    message = next(line for line in stdout.splitlines() if "Resume with:" in line)
    command = message.split("Resume with:")[1].split()
    assert command[:2] == ["hftoolkit", "train"]

    monkeypatch.delenv("HFTOOLKIT_TEST_SAVE_DELAY")
    reset_accelerate()
    code, stdout, err = cli(*command[1:])
    assert code == 0, err
    assert f"at step {SAVE + 1}" in stdout
    assert_same_training(straight, out)


def test_resume_unpacked_across_an_epoch_boundary_is_exact(qa_files, tmp_path, cli):
    """data.packing=false (padded, length-grouped batches), 24 rows = 3 steps per epoch: stop after step 2,
    resume, and steps 3 (end of epoch 0) and 4 (epoch 1, new shuffle) match the straight run. Failing means the
    skipped batches or the next epoch's order differ after a resume."""
    extra = {"data.packing": "false", "data.max_train_samples": 24}
    a, b = tmp_path / "straight", tmp_path / "resumed"
    code, _, err = cli("train", QA, *overrides(a, qa_files, **extra))
    assert code == 0, err
    cut_back(a, b, SAVE)
    reset_accelerate()
    code, stdout, err = cli(
        "train", QA, *overrides(b, qa_files, **extra), "train.resume_from_checkpoint=latest"
    )
    assert code == 0, err
    assert f"at step {SAVE}" in stdout
    lines = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [x["epoch"] for x in lines] == pytest.approx([1 / 3, 2 / 3, 1.0, 4 / 3], abs=1e-3)
    assert_same_training(a, b)


def one_line_error(code: int, err: str) -> str:
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_resume_refuses_a_changed_learning_rate(straight, qa_files, tmp_path, cli):
    """Resuming with a different train.learning_rate is refused with one line naming the key and the value.
    Failing means a resume silently continues a different optimisation than the checkpoint's."""
    out = tmp_path / "run"
    cut_back(straight, out, SAVE)
    code, _, err = cli(
        "train",
        QA,
        *overrides(out, qa_files, **ACCUMULATION, **{"train.learning_rate": 0.0123}),
        "train.resume_from_checkpoint=latest",
    )
    line = one_line_error(code, err)
    assert "train.learning_rate" in line and "0.0123" in line


def test_resume_refuses_changed_training_data(straight, qa_files, tmp_path, cli):
    """Same config, but the training file's content changed since the checkpoint: refused, naming the data.
    Failing means a resume would skip "already seen" batches of a different dataset."""
    out = tmp_path / "run"
    cut_back(straight, out, SAVE)
    original = qa_files["train"].read_text()
    try:
        qa_files["train"].write_text("".join(original.splitlines(keepends=True)[1:]))  # drop one row
        code, _, err = cli(
            "train", QA, *overrides(out, qa_files, **ACCUMULATION), "train.resume_from_checkpoint=latest"
        )
    finally:
        qa_files["train"].write_text(original)
    line = one_line_error(code, err)
    assert "training data changed" in line


def test_resume_from_a_missing_checkpoint_is_a_clean_error(tmp_path, cli):
    """train.resume_from_checkpoint=/nonexistent: one line naming the key and the path, exit code 2."""
    code, _, err = cli(
        "train",
        QA,
        *tiny_overrides(tmp_path / "run"),
        "train.resume_from_checkpoint=/nonexistent/step-0000002",
    )
    line = one_line_error(code, err)
    assert code == 2 and "train.resume_from_checkpoint" in line and "/nonexistent/step-0000002" in line


# ------------------------------------------------------------------------------------------------ repeated kills


def wait_for(predicate, proc, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, f"the run never reached {what}"
        time.sleep(0.02)


@pytest.mark.slow  # four subprocesses (~10 s of imports each)
def test_a_run_killed_again_and_again_ends_like_an_uninterrupted_one(straight, qa_files, tmp_path):
    """SIGKILL during a checkpoint save, at a random moment between saves, and while model/ is being written; each
    time the run resumes from `latest`. The last resume ends with the straight run's losses and weights. Failing
    means a kill can corrupt a checkpoint or model/, leave a lock that blocks the resume, or a resume is inexact."""
    out = tmp_path / "run"
    args = [*overrides(out, qa_files, **ACCUMULATION), "train.save_steps=1"]
    env = {**os.environ, "HFTOOLKIT_TEST_SAVE_DELAY": "1"}
    rng = random.Random(0)
    checkpoints = out / "checkpoints"
    kill_moments = [
        ("during the save of checkpoint 2", lambda: (checkpoints / ".tmp-step-0000002" / "random_states_0.pkl").exists()),
        ("between saves after checkpoint 3", lambda: (checkpoints / "step-0000003").exists()),
        ("while model/ is written", lambda: any(out.glob(".model.*/model.safetensors"))),
    ]  # fmt: skip
    for i, (what, reached) in enumerate(kill_moments):
        cmd = [sys.executable, "-m", "hftoolkit", "train", QA, *args]
        cmd += ["train.resume_from_checkpoint=latest"] if i else []
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        wait_for(reached, proc, what)
        time.sleep(rng.uniform(0, 0.3) if i == 1 else 0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, what
    assert not (out / "model").exists()  # killed before the swap: no half model/
    final = subprocess.run(
        [sys.executable, "-m", "hftoolkit", "train", QA, *args, "train.resume_from_checkpoint=latest"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert final.returncode == 0, final.stderr[-2000:]
    assert "taking over the lock of process" in final.stdout
    assert_same_training(straight, out)
    assert len(train_losses(out)) == 4
