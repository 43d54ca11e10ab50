"""Metric-driven best checkpoint and early stopping (hftoolkit/selection.py): the published model/ is the best
periodic evaluation's, reproducibly; patience and best survive a resume; all processes stop together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hftoolkit.config import load_recipe
from hftoolkit.errors import UserError
from tests.conftest import tiny_overrides
from tests.test_invariants_e2e import launch_2proc

CLS = "recipes/quickstart/classification.yaml"
QA = "recipes/quickstart/qa.yaml"


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def assert_model_is_checkpoint(out: Path, checkpoint: str) -> None:
    """model/model.safetensors holds, tensor for tensor, the weights of the checkpoint folder."""
    published, saved = (
        load_file(out / "model" / "model.safetensors"),
        load_file(out / checkpoint / "model.safetensors"),
    )
    assert set(saved) <= set(published)
    for name, tensor in saved.items():
        torch.testing.assert_close(published[name], tensor, atol=0, rtol=0)


def test_best_checkpoint_is_published_and_reproducible(tmp_path, cli):
    """If this fails, model/ is not the checkpoint results.json calls best, save_total_limit deleted it, or its
    score cannot be reproduced by `hftoolkit eval` on the same eval subset."""
    out = tmp_path / "run"
    extra = {
        "data.synthetic.num_train": 600, "data.synthetic.num_eval": 24, "model.init.vocab_size": 600,
        "train.max_steps": 45, "train.eval_steps": 15, "train.save_steps": 15, "train.save_total_limit": 1,
        "train.logging_steps": 15, "eval.max_eval_samples_during_training": 12, "eval.max_new_tokens": 4,
        "train.per_device_train_batch_size": 32,
    }  # fmt: skip
    code, _, err = cli("train", CLS, *tiny_overrides(out, **extra))
    assert code == 0, err
    best = results(out)["best"]
    assert best["published"] is True and best["checkpoint"] == f"checkpoints/step-{best['step']:07d}"
    periodic = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x][
        1:-1
    ]
    assert [e["step"] for e in periodic] == [15, 30, 45]
    assert best["exact_match"] == max(e["exact_match"] for e in periodic) > 0
    assert best["step"] == next(e["step"] for e in periodic if e["exact_match"] == best["exact_match"])
    assert (out / best["checkpoint"]).is_dir()  # kept although save_total_limit=1
    assert_model_is_checkpoint(out, best["checkpoint"])
    code, _, err = cli(
        "eval", CLS, *tiny_overrides(tmp_path / "again", **extra), "model.init=null",
        f"model.name_or_path={out / 'model'}", "data.max_eval_samples=12",
    )  # fmt: skip
    assert code == 0, err
    assert results(tmp_path / "again")["final"]["exact_match"] == best["exact_match"]


@pytest.fixture
def scripted_scores(monkeypatch):
    """A test double for the periodic scores: exact_match by step (peaks at step 4), the rest of the evaluation
    real. Real runs this small do not peak reliably; the logic under test only sees the scores."""
    from hftoolkit.run import Run

    table = {2: 10.0, 4: 30.0, 6: 20.0, 8: 15.0, 10: 12.0}
    real = Run.evaluate

    def evaluate(self, step, final, subset):
        scores = real(self, step, final, subset)
        return {**scores, "exact_match": table[step]} if subset else scores

    monkeypatch.setattr(Run, "evaluate", evaluate)
    return table


def test_early_stopping_and_a_resume_that_keeps_patience(tmp_path, cli, scripted_scores):
    """If this fails, training goes on after `patience` evaluations without improvement, the reason is not said,
    the best checkpoint is rotated away, or a resume forgets the best and the patience counter."""
    out = tmp_path / "run"
    extra = {"train.eval_steps": 2, "train.save_steps": 2, "train.save_total_limit": 1, "eval.baseline": "false",
             "train.early_stopping_patience": 2, "train.logging_steps": 1}  # fmt: skip
    # 6 steps: best at 4, one evaluation (6) without improvement. Kept: the best (4) and the newest (6).
    code, _, err = cli("train", QA, *tiny_overrides(out, **extra), "train.max_steps=6")
    assert code == 0, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]
    assert (
        json.loads((out / "checkpoints/step-0000006/hftoolkit_state.json").read_text())[
            "evals_without_improvement"
        ]
        == 1
    )
    # Extended to 10: the evaluation at 8 is the second without improvement, so it stops there, not at 10.
    code, printed, err = cli(
        "train",
        QA,
        *tiny_overrides(out, **extra),
        "train.max_steps=10",
        "train.resume_from_checkpoint=latest",
    )
    assert code == 0, err
    reason = "early stopping: exact_match has not improved by ≥ 0 for 2 evaluation(s) since step 4 (exact_match 30)"
    assert f"{reason}; stopped at step 8" in printed
    r = results(out)
    assert r["stopped_early"] == {"step": 8, "reason": reason}
    assert r["best"] == {
        "step": 4,
        "exact_match": 30.0,
        "checkpoint": "checkpoints/step-0000004",
        "published": True,
    }
    assert "loading the best checkpoint (step 4, exact_match 30)" in printed
    assert_model_is_checkpoint(out, "checkpoints/step-0000004")
    steps = [
        json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x
    ]
    assert steps == list(range(1, 9))


def test_selection_keys_are_checked(tmp_path):
    """If this fails, early stopping without periodic evaluations is accepted and silently never stops."""
    with pytest.raises(
        UserError, match=r"^train.early_stopping_patience: must be ≥ 1, and needs train.eval_steps"
    ):
        load_recipe(QA, ["train.eval_steps=null", "train.early_stopping_patience=2"])


@pytest.mark.multiproc
def test_two_processes_stop_at_the_same_step(tmp_path):
    """If this fails, one rank stops early while the other waits in a collective (a hang), or they disagree on
    the step. A threshold no evaluation can reach makes the second evaluation the last, deterministically."""
    out = tmp_path / "run"
    extra = {"train.max_steps": 8, "train.eval_steps": 2, "train.early_stopping_patience": 1,
             "train.early_stopping_threshold": 1000, "train.metric_for_best_model": "eval_loss",
             "eval.baseline": "false"}  # fmt: skip
    launch_2proc("train", QA, *tiny_overrides(out, **extra))
    r = results(out)
    assert r["stopped_early"]["step"] == 4 and r["best"]["step"] == 2
    assert (
        "eval_loss has not improved by ≥ 1000 for 1 evaluation(s) since step 2"
        in r["stopped_early"]["reason"]
    )


def test_report_card_and_plot_say_which_step_was_published(tmp_path, cli, scripted_scores):
    """If this fails, a reader of report.md, the model card or `hftoolkit report` cannot tell that model/ holds an
    earlier step than the last, or why training stopped."""
    from hftoolkit.report import compare_runs

    out = tmp_path / "run"
    extra = {"train.eval_steps": 2, "train.max_steps": 10, "eval.baseline": "false",
             "train.early_stopping_patience": 2}  # fmt: skip
    assert cli("train", QA, *tiny_overrides(out, **extra))[0] == 0
    note = "Published: the weights of step 4, the best periodic evaluation by exact_match (30.00); training stopped"
    assert note in (out / "report.md").read_text()
    assert note in (out / "README.md").read_text()
    assert "| step 4 (best) |" in compare_runs([out])
    assert (out / "plots" / "metric.png").is_file()


# ------------------------------------------------------------------------------------------------ pushes while training


@pytest.fixture
def stand_in_hub(monkeypatch):
    from huggingface_hub import constants

    from hftoolkit import uploads
    from tests.hub_server import StandInHub

    token = "hf_uploads_secret_token_0123456789"
    server = StandInHub(accepted_tokens={token}).start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(uploads, "BACKOFF_S", 0.01)
    monkeypatch.setattr(uploads, "MAX_RETRIES", 2)
    yield server, token
    server.stop()


def test_checkpoints_upload_in_the_background_and_failures_never_stop_training(tmp_path, cli, stand_in_hub):
    """If this fails, hub.strategy=every_save blocks or kills training on a Hub error, loses a checkpoint without
    saying so, leaks the token, or the final push is not the published (best) model."""
    server, token = stand_in_hub
    server.fail_next("create", 500, times=4)  # the first checkpoint: 1 try + 2 retries fail (reported); the
    # second: fails once, then goes through on its retry
    out = tmp_path / "run"
    extra = {"train.max_steps": 6, "train.save_steps": 2, "train.save_total_limit": 1, "train.eval_steps": 2,
             "hub.push": "true", "hub.repo_id": "alice/qa-tiny", "hub.strategy": "every_save"}  # fmt: skip
    code, _, err = cli("train", QA, *tiny_overrides(out, **extra))
    assert code == 0, err
    r = results(out)
    assert r["hub_uploads"]["failed"] == [
        {"checkpoint": "step-0000002", "reason": "HTTP 500: injected failure 500"}
    ]
    assert r["hub_uploads"]["uploaded"] == ["step-0000004", "step-0000006"]
    files = server.files("alice/qa-tiny")
    assert {
        "checkpoints/step-0000004/model.safetensors",
        "checkpoints/step-0000006/hftoolkit_state.json",
    } <= set(files)
    assert all(token.encode() not in data for data in files.values())
    published = json.loads(files["hftoolkit/results.json"])
    assert (
        published["best"] == r["best"]
        and files["model.safetensors"] == (out / "model/model.safetensors").read_bytes()
    )
    assert not list(tmp_path.glob(".run.hftoolkit-uploads-*"))  # staging cleaned up


def test_last_checkpoint_strategy_keeps_one_checkpoint_on_the_hub(tmp_path, cli, stand_in_hub):
    """If this fails, hub.strategy=checkpoint piles every checkpoint into last-checkpoint/ (or keeps a stale one)."""
    server, _ = stand_in_hub
    out = tmp_path / "run"
    extra = {"train.max_steps": 4, "train.save_steps": 2, "hub.push": "true", "hub.repo_id": "alice/qa-tiny",
             "hub.strategy": "checkpoint"}  # fmt: skip
    assert cli("train", QA, *tiny_overrides(out, **extra))[0] == 0
    files = server.files("alice/qa-tiny")
    state = json.loads(files["last-checkpoint/hftoolkit_state.json"])
    assert state["step"] == 4 and not any(name.startswith("checkpoints/") for name in files)
