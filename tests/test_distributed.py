"""2-process data parallelism on CPU (real gloo DDP through `accelerate launch`) against 1 process.

The 2-process run goes through recipes/accelerate/cpu_2proc.yaml with ACCELERATE_USE_CPU=1, exactly as its header
says. A launch costs ~20-30 s on 2 cores (mostly importing torch/transformers in each process), so there is one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, tiny_overrides

QA = "recipes/quickstart/qa.yaml"
CPU_2PROC = "recipes/accelerate/cpu_2proc.yaml"
# 7 eval rows in generation batches of a few rows (a 200-token budget): ranks get uneven shards, the short one
# repeats a batch (sharded models generate in lockstep), and the gathered predictions must drop the duplicates. Unpacked batches: the sampler groups lengths, which only
# matches across world sizes when it groups by the global batch (run.py). No dropout: the runs must be comparable.
COMMON = {
    "model.dropout": 0.0,
    "train.logging_steps": 1,
    "eval.baseline": "false",
    "data.synthetic.num_eval": 7,
    "eval.per_device_eval_batch_size": 3,
    "eval.batch_tokens": 200,
    "data.packing": "false",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_2proc(*args: str) -> float:
    """`ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m hftoolkit ARGS`;
    returns the wall time in seconds."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_2PROC]
    # A free port rather than the file's fixed one: other test sessions may run on the same machine.
    cmd = [*launch, "--main_process_port", str(free_port()), "-m", "hftoolkit", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.perf_counter() - start


@pytest.mark.multiproc
def test_two_processes_train_and_score_like_one(tmp_path, cli, record_property):
    """2 processes × 4 examples and 1 process × 8 log the same losses and learning rates, end with the same
    weights (up to float noise amplified by Adam) and the same eval scores; the 2-process evaluation writes the
    same predictions.jsonl and scores as 1 process on the same weights. Failing means the ranks do not see the
    examples one process would see in a step (sharding / length grouping), the loss is not normalised over all
    ranks' target tokens, gradients are not averaged, the LR schedule runs at another pace on N ranks, or
    gather_for_metrics keeps the duplicates that pad the last eval batches."""
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = cli("train", QA, *tiny_overrides(one, **COMMON))
    assert code == 0, err
    wall = launch_2proc(
        "train", QA, *tiny_overrides(two, **COMMON, **{"train.per_device_train_batch_size": 4})
    )
    record_property("two_process_train_wall_s", round(wall, 1))  # in --junitxml reports

    lines = {d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)}
    train = {d: [x for x in ls if x["kind"] == "train"] for d, ls in lines.items()}
    assert [x["step"] for x in train[two]] == [1, 2, 3, 4]
    assert [x["loss"] for x in train[two]] == pytest.approx([x["loss"] for x in train[one]], rel=1e-4)
    assert [x["learning_rate"] for x in train[two]] == pytest.approx([x["learning_rate"] for x in train[one]])
    w1, w2 = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=5e-4, rtol=1e-3)
    r1, r2 = (json.loads((d / "results.json").read_text())["final"] for d in (one, two))
    assert r2.keys() == r1.keys()
    assert r2["eval_loss"] == pytest.approx(r1["eval_loss"], abs=1e-3)
    assert (r2["exact_match"], r2["f1"]) == (r1["exact_match"], r1["f1"])
    assert len((two / "predictions.jsonl").read_text().splitlines()) == 7

    # Scoring: the 2-process run's final evaluation (sharded generation + gather_for_metrics, as under
    # `accelerate launch -m hftoolkit eval`) == a 1-process `hftoolkit eval` of the same weights, prediction for
    # prediction. (One launch fewer than running `eval` under accelerate launch: each costs ~20 s here.)
    scored = tmp_path / "eval"
    code, _, err = cli(
        "eval",
        QA,
        *tiny_overrides(scored, **COMMON),
        "model.init=null",
        f"model.name_or_path={two / 'model'}",
    )
    assert code == 0, err
    p1, p2 = ((d / "predictions.jsonl").read_text().splitlines() for d in (scored, two))
    assert len(p2) == 7 and p2 == p1  # no duplicate from the padded last batches, same order, same text
    s1 = json.loads((scored / "results.json").read_text())["final"]
    assert r2 == s1


def test_a_run_does_not_inherit_an_earlier_accelerators_precision(tmp_path):
    """accelerate keeps its state process-wide: after an Accelerator(mixed_precision="bf16") (what TRL's SFTTrainer
    builds by default), a recipe that leaves train.mixed_precision unset must still get its own default, fp32."""
    from accelerate import Accelerator

    from hftoolkit.config import load_recipe
    from hftoolkit.run import make_accelerator

    assert Accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"
    recipe = load_recipe(None, ["task=generation", f"output_dir={tmp_path}", "data.synthetic={num_train: 8}"])
    assert recipe.train.mixed_precision is None
    assert make_accelerator(recipe).mixed_precision == "no"
