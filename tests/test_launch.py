"""Launching beyond one machine: two "machines" on localhost train like one process, and the Slurm / torchrun
templates in recipes/launch/ produce the launcher command lines they promise (rendered with a fake cluster)."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, tiny_overrides
from tests.test_distributed import free_port

SBATCH = REPO_ROOT / "recipes/launch/slurm_multi_node.sbatch"
TORCHRUN = REPO_ROOT / "recipes/launch/torchrun_multi_node.sh"
RECIPE = "recipes/summarization/gpt2_xsum.yaml"


def fake_commands(tmp_path: Path, scripts: dict[str, str]) -> dict:
    """An environment whose PATH starts with executables named after `scripts` (bash bodies)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("script", [SBATCH, TORCHRUN], ids=lambda p: p.name)
def test_templates_are_valid_bash_and_say_how_to_run_them(script):
    """If this fails, a template has a syntax error, or its first lines do not say how to submit or run it."""
    subprocess.run(["bash", "-n", str(script)], check=True)
    head = "\n".join(script.read_text().splitlines()[:3])
    assert ("sbatch" if script.suffix == ".sbatch" else "bash recipes/launch/") in head


def test_slurm_template_runs_one_accelerate_launch_per_node(tmp_path):
    """2 nodes × 8 GPUs: each node's task runs `accelerate launch` with its machine_rank, the first node as
    rendezvous and 16 processes in all; the flags are ones accelerate's own parser accepts. Failing means a submitted
    job would start ranks that never meet (wrong rank, address or process count)."""
    from accelerate.commands.launch import launch_command_parser

    calls = tmp_path / "calls.txt"
    env = fake_commands(tmp_path, {
        "scontrol": 'echo node-a; echo node-b\n',
        # One task per node, as srun --ntasks-per-node=1 on 2 nodes: SLURM_NODEID set per task.
        "srun": 'while [ "$1" != bash ]; do shift; done\nfor n in 0 1; do SLURM_NODEID=$n "$@"; done\n',
        "accelerate": f'printf "%s\\n" "$(printf "%q " "$@")" >> {calls}\n',
    })  # fmt: skip
    env.update(SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8")
    subprocess.run(["bash", str(SBATCH), RECIPE, "train.max_steps=5"], cwd=REPO_ROOT, env=env, check=True)
    lines = [shlex.split(line) for line in calls.read_text().splitlines()]
    expected = "launch --config_file recipes/accelerate/multi_node.yaml --num_machines 2 --num_processes 16"
    for rank, argv in enumerate(lines):
        assert argv == [*expected.split(), "--machine_rank", str(rank), "--main_process_ip", "node-a",
                        "--main_process_port", "29500", "-m", "hftoolkit", "train", RECIPE,
                        "train.resume_from_checkpoint=latest", "train.max_steps=5"]  # fmt: skip
        parsed = launch_command_parser().parse_args(argv[1:])
        assert (parsed.machine_rank, parsed.num_processes, parsed.main_process_ip) == (rank, 16, "node-a")
        assert parsed.module and parsed.training_script == "hftoolkit"
    assert len(lines) == 2


def test_torchrun_template_runs_torchrun_with_the_node_rank(tmp_path):
    """If this fails, the torchrun way passes torchrun flags it does not accept, or not the node's rank."""
    from torch.distributed.run import get_args_parser

    calls = tmp_path / "calls.txt"
    env = fake_commands(tmp_path, {"torchrun": f'printf "%q " "$@" > {calls}\n'})
    env.update(NNODES="2", NODE_RANK="1", NPROC_PER_NODE="8", MASTER_ADDR="node-a")
    subprocess.run(["bash", str(TORCHRUN), RECIPE, "train.max_steps=5"], cwd=REPO_ROOT, env=env, check=True)
    argv = shlex.split(calls.read_text())
    parsed = get_args_parser().parse_args(argv)
    assert (parsed.nnodes, parsed.node_rank, parsed.nproc_per_node, parsed.master_addr) == (
        "2",
        1,
        "8",
        "node-a",
    )
    assert parsed.module and parsed.training_script == "hftoolkit"
    assert parsed.training_script_args == [
        "train",
        RECIPE,
        "train.resume_from_checkpoint=latest",
        "train.max_steps=5",
    ]


def train_losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


@pytest.mark.multiproc
def test_two_machines_on_localhost_train_like_one_process(tmp_path, cli):
    """`accelerate launch --num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1`, one CPU process per
    "machine" (gloo), 4 examples each, logs the losses of one process with 8. Failing means a multi-node job shards,
    normalises or all-reduces differently from one process with the same global batch."""
    common = {
        "model.dropout": 0.0,
        "train.logging_steps": 1,
        "eval.baseline": "false",
        "data.packing": "false",
    }
    one = tmp_path / "one"
    assert cli("train", "recipes/quickstart/qa.yaml", *tiny_overrides(one, **common))[0] == 0  # 8 per step
    two = tmp_path / "two"
    args = tiny_overrides(two, **common, **{"train.per_device_train_batch_size": 4})
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    port = str(free_port())
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml",
              "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
              "--main_process_port", port]  # fmt: skip
    machines = [
        subprocess.Popen([*launch, "--machine_rank", str(rank), "-m", "hftoolkit", "train", "recipes/quickstart/qa.yaml",
                          *args], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for rank in (1, 0)
    ]  # fmt: skip
    for proc in machines:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]
    assert train_losses(two) == pytest.approx(train_losses(one), rel=1e-4)
    assert len(train_losses(two)) == 4


@pytest.mark.multiproc
def test_an_fsdp_config_on_cpu_says_it_runs_as_ddp(tmp_path):
    """accelerate (1.x) selects FSDP only on accelerators: with ACCELERATE_USE_CPU=1 an FSDP config becomes plain
    DDP (MULTI_CPU) without a word. If this fails, a user who tries recipes/accelerate/fsdp.yaml on CPU believes the
    parameters were sharded."""
    config = tmp_path / "fsdp_cpu.yaml"
    text = (REPO_ROOT / "recipes/accelerate/fsdp.yaml").read_text()
    text = text.replace("num_processes: 8", "num_processes: 2").replace(
        "mixed_precision: bf16", "mixed_precision: 'no'"
    )
    config.write_text(text)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
           str(free_port()), "-m", "hftoolkit", "train", "recipes/quickstart/qa.yaml",
           *tiny_overrides(tmp_path / "run", **{"train.max_steps": 1, "eval.baseline": "false"})]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "FSDP was asked for, but accelerate runs FSDP on GPUs/accelerators only; this run is MULTI_CPU"
        in proc.stdout
    )
