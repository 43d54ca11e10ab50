"""`hftoolkit plan` on every quickstart recipe; TensorBoard tracking and push-at-end through a training run."""

from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_overrides

QUICKSTARTS = ["generation", "summarization", "translation", "qa"]


@pytest.mark.parametrize("task", QUICKSTARTS)
def test_plan_each_quickstart(tmp_path, cli, task):
    """plan shows the masked example, lengths, steps, memory and the reference metric check, writes a histogram,
    and trains nothing (no model/, no metrics.jsonl)."""
    out = tmp_path / "plan"
    code, stdout, err = cli(
        "plan",
        f"recipes/quickstart/{task}.yaml",
        f"output_dir={out}",
        "data.synthetic.num_train=200",
        "--no-color",
    )
    assert code == 0, err
    for words in (
        "changed from the defaults",
        "token lengths",
        "examples per step",
        "memory per device",
        "total ≈",
    ):
        assert words in stdout
    if task != "generation":
        assert "[[" in stdout and "]]" in stdout  # the loss-masked prompt is marked
        assert "metric check" in stdout and "100.0" in stdout  # references scored against themselves
    assert (out / "plan" / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "model").exists() and not (out / "metrics.jsonl").exists()


def test_plan_reports_truncation(tmp_path, cli):
    """A max_seq_len that cuts sources shows up in plan's counts before any GPU time is spent."""
    code, stdout, err = cli(
        "plan",
        "recipes/quickstart/summarization.yaml",
        f"output_dir={tmp_path}",
        "data.synthetic.num_train=50",
        "data.max_seq_len=24",
        "--no-color",
    )
    assert code == 0, err
    line = next(x for x in stdout.splitlines() if "sources truncated" in x)
    assert "sources truncated: 0," not in line


def test_tensorboard_tracking(tmp_path, cli):
    """report_to=tensorboard writes event files through accelerate's tracker."""
    out = tmp_path / "run"
    code, _, err = cli(
        "train",
        "recipes/quickstart/generation.yaml",
        *tiny_overrides(out, **{"report_to": "tensorboard", "train.max_steps": 2, "train.logging_steps": 1}),
    )
    assert code == 0, err
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"]


def test_push_at_end_of_training(tmp_path, cli, monkeypatch):
    """hub.push=true pushes the finished run to the Hub (here a local stand-in), with no token in any file."""
    from huggingface_hub import constants

    from tests.hub_server import StandInHub

    token = "hf_push_at_end_secret_42"
    server = StandInHub(accepted_tokens={token}).start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", token)
        out = tmp_path / "run"
        code, _, err = cli(
            "train",
            "recipes/quickstart/qa.yaml",
            *tiny_overrides(
                out, **{"train.max_steps": 1, "hub.push": "true", "hub.repo_id": "alice/qa-tiny"}
            ),
        )
        assert code == 0, err
        files = server.files("alice/qa-tiny")
        assert {
            "model.safetensors",
            "config.json",
            "README.md",
            "hftoolkit/config.yaml",
            "hftoolkit/results.json",
        } <= set(files)
        assert all(token.encode() not in data for data in files.values())
        assert json.loads(files["hftoolkit/results.json"])["final"]
    finally:
        server.stop()
