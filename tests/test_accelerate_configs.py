"""recipes/accelerate/*.yaml: each launch config loads with accelerate's own loader and says how to run it."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.conftest import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "recipes" / "accelerate"
# file: (distributed_type, total processes, machines)
EXPECTED = {
    "single_gpu.yaml": ("NO", 1, 1),
    "multi_gpu.yaml": ("MULTI_GPU", 8, 1),
    "fsdp.yaml": ("FSDP", 8, 1),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8, 1),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 8, 1),
    "multi_node.yaml": ("MULTI_GPU", 16, 2),
    # MULTI_GPU on purpose: the multi-process launcher plus ACCELERATE_USE_CPU=1 gives 2 CPU ranks (see the file).
    "cpu_2proc.yaml": ("MULTI_GPU", 2, 1),
}


def test_the_expected_launch_configs_ship():
    """recipes/accelerate/ holds exactly the documented launch configs (a new one needs an entry above)."""
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config_loads_with_accelerate(name):
    """`accelerate launch --config_file` reads the file (unknown top-level keys are errors there), with the expected
    distributed type and process count, and every fsdp_config/deepspeed_config key is an `accelerate launch`
    option (accelerate copies them onto its arguments and would silently ignore a misspelt one)."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(CONFIG_DIR / name))
    assert isinstance(config, ClusterConfig)
    distributed_type, processes, machines = EXPECTED[name]
    assert config.distributed_type.value == distributed_type
    assert (config.num_processes, config.num_machines) == (processes, machines)
    options = {action.dest for action in launch_command_parser()._actions}
    for key in config.fsdp_config:
        assert (key if key.startswith("fsdp_") else "fsdp_" + key) in options, f"{name}: fsdp_config.{key}"
    for key in config.deepspeed_config:
        assert key in options, f"{name}: deepspeed_config.{key}"
    if config.distributed_type.value == "DEEPSPEED":
        # Setting it here would override the recipe's train.gradient_accumulation_steps through the environment.
        assert "gradient_accumulation_steps" not in config.deepspeed_config
        if config.deepspeed_config["zero_stage"] == 3:
            assert (
                config.deepspeed_config["zero3_save_16bit_model"] is True
            )  # model/ needs the gathered weights
    if distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "GPT2Block"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config_opens_with_its_command(name):
    """The file starts with the exact command that uses it, naming this file and a recipe that exists."""
    text = (CONFIG_DIR / name).read_text(encoding="utf-8")
    assert text.startswith("# Run")
    header = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    commands = [line for line in header if "accelerate launch --config_file" in line]
    assert commands, name
    for line in commands:
        argv = shlex.split(line[line.index("accelerate launch") :].split("   #")[0])
        assert argv[argv.index("--config_file") + 1] == f"recipes/accelerate/{name}"
        assert argv[argv.index("-m") + 1 : argv.index("-m") + 3] == ["hftoolkit", "train"]
        assert (REPO_ROOT / argv[argv.index("-m") + 3]).is_file(), line
    if name == "cpu_2proc.yaml":
        assert re.search(
            r"ACCELERATE_USE_CPU=1 (OMP_NUM_THREADS=1 )?accelerate launch --config_file", commands[0]
        )
