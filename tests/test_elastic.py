"""Elastic resume: a checkpoint written by N processes resumes on M (2→1 and 1→2) with the global batch kept
(the accumulation adapted), the same global data position and learning-rate point, and the straight run's losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from tests.test_distributed import launch_2proc
from tests.test_resume import cut_back, reset_accelerate, train_losses

QA = "recipes/quickstart/qa.yaml"
# 4 examples per device; 1 process accumulates 2 micro-batches, 2 processes 1: 8 examples per step either way.
# No dropout: the random state is reseeded on another process count, so only a deterministic run can match.
COMMON = {"model.dropout": 0.0, "train.logging_steps": 1, "eval.baseline": "false", "train.save_steps": 2,
          "train.per_device_train_batch_size": 4, "train.max_steps": 4, "eval.max_new_tokens": 4}  # fmt: skip


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """1 process, accumulation 2, 4 uninterrupted steps."""
    from hftoolkit.cli import main

    out = tmp_path_factory.mktemp("straight") / "run"
    try:
        assert (
            main(["train", QA, *tiny_overrides(out, **COMMON, **{"train.gradient_accumulation_steps": 2})])
            == 0
        )
    finally:
        reset_accelerate()
    return out


@pytest.mark.multiproc
def test_two_processes_resume_on_one(straight, tmp_path, cli):
    """If this fails, a job pre-empted on 2 GPUs cannot come back on 1, or comes back at another data position,
    learning rate or global batch (its losses part from the straight run's)."""
    two = tmp_path / "two"
    launch_2proc("train", QA, *tiny_overrides(two, **COMMON, **{"train.gradient_accumulation_steps": 1}))
    resumed = tmp_path / "resumed"
    cut_back(two, resumed, 2)
    args = tiny_overrides(resumed, **COMMON, **{"train.gradient_accumulation_steps": 1})
    code, printed, err = cli("train", QA, *args, "train.resume_from_checkpoint=latest")
    assert code == 0, err
    assert (
        "resuming a checkpoint of 2 process(es) on 1: gradient_accumulation_steps 1 → 2 keeps the global batch"
        in printed
    )
    assert train_losses(resumed) == pytest.approx(train_losses(straight), rel=1e-4)
    assert len(train_losses(resumed)) == 4
    elastic = json.loads((resumed / "results.json").read_text())["elastic"]
    assert elastic == {"from_processes": 2, "to_processes": 1, "from_gradient_accumulation_steps": 1,
                       "to_gradient_accumulation_steps": 2, "global_batch": 8}  # fmt: skip


@pytest.mark.multiproc
def test_one_process_resumes_on_two(straight, tmp_path):
    """If this fails, a job cannot grow from 1 GPU to 2 on resume, or the 2 processes do not continue where the
    one stopped (same examples, same learning rate, same losses)."""
    resumed = tmp_path / "resumed"
    cut_back(straight, resumed, 2)
    args = tiny_overrides(resumed, **COMMON, **{"train.gradient_accumulation_steps": 2})
    launch_2proc("train", QA, *args, "train.resume_from_checkpoint=latest")
    assert train_losses(resumed) == pytest.approx(train_losses(straight), rel=1e-4)
    assert (
        json.loads((resumed / "results.json").read_text())["elastic"]["to_gradient_accumulation_steps"] == 1
    )


def test_a_global_batch_that_cannot_be_kept_is_one_line(straight, tmp_path, cli):
    """If this fails, a resume on a process count that cannot keep the global batch trains with another one."""
    from accelerate.utils import DistributedType

    from hftoolkit.checkpoint import adapt_to_process_count
    from hftoolkit.config import load_recipe
    from hftoolkit.errors import UserError

    class ThreeProcesses:  # what adapt_to_process_count reads of an Accelerator on 3 GPUs
        num_processes, gradient_accumulation_steps, distributed_type = 3, 2, DistributedType.MULTI_GPU

        def print(self, *args):
            pass

    recipe = load_recipe(
        QA, [f"{k}={v}" for k, v in {**COMMON, "train.gradient_accumulation_steps": 2}.items()]
    )
    checkpoint = straight / "checkpoints" / "step-0000002"
    with pytest.raises(
        UserError,
        match=r"saved by 1 process\(es\) with a global batch of 8 \(4 per device × 2 "
        r"accumulation × 1\); 3 process\(es\) cannot keep it: resume on a process count that divides 2",
    ):
        adapt_to_process_count(recipe, ThreeProcesses(), checkpoint)
