"""Shared pytest fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# One intra-op thread per process, set before torch is imported: the test models are tiny (threads only add
# overhead), and the 2-process tests put two ranks on two cores, where 2 OpenMP threads each spin-wait for a
# core the other rank holds (measured: a 2-layer forward/backward went from 3 ms to 560 ms under contention).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tokenize-once cache of this test session (and of the processes its tests launch), never ~/.cache.
if "HFTOOLKIT_CACHE" not in os.environ:
    os.environ["HFTOOLKIT_CACHE"] = tempfile.mkdtemp(prefix="hftoolkit-test-cache-")
    atexit.register(shutil.rmtree, os.environ["HFTOOLKIT_CACHE"], True)

import json
from pathlib import Path

import pytest
import yaml

# ---------------------------------------------------------------------------------------------------------------
# fake_run_dir: a finished summarization run directory (layout of docs/run-directory.md) with a real, tiny GPT-2.

FAKE_RUN_BASELINE = {
    "rouge1": 5.0,
    "rouge2": 1.0,
    "rougeL": 4.5,
    "rougeLsum": 4.75,
    "eval_loss": 5.5,
    "perplexity": 244.69,
}
FAKE_RUN_FINAL = {
    "rouge1": 30.25,
    "rouge2": 12.5,
    "rougeL": 28.0,
    "rougeLsum": 28.5,
    "eval_loss": 2.25,
    "perplexity": 9.49,
}
FAKE_RUN_PROMPT_TEMPLATE = "{document}\nTL;DR:"


def _build_fake_run(root: Path) -> None:
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    sentences = ["the cat sat on the mat", "a dog ran in the park", "summaries are short", "TL;DR: it rained"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        sentences * 3, vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    eos = tokenizer.eos_token_id
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=300, n_positions=64, bos_token_id=eos, eos_token_id=eos
    )
    transformers.set_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    generation = {
        "task": "summarization",
        "prompt_template": FAKE_RUN_PROMPT_TEMPLATE,
        "stop_strings": ["\n"],
        "max_new_tokens": 8,
        "num_beams": 1,
    }
    (model_dir / "hftoolkit.json").write_text(json.dumps(generation, indent=2))

    recipe = {
        "task": "summarization",
        "seed": 42,
        "output_dir": str(root),
        "model": {"name_or_path": "openai-community/gpt2", "init": None},
        "data": {
            "dataset_name": "EdinburghNLP/xsum",
            "dataset_config_name": None,
            "train_file": None,
            "validation_file": None,
            "max_seq_len": 64,
            "packing": True,
            "text_column": "document",
            "summary_column": "summary",
        },
        "train": {
            "learning_rate": 5.0e-4,
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 2,
            "num_train_epochs": 1,
            "max_steps": 10,
            "warmup_ratio": 0.1,
            "logging_steps": 1,
            "eval_steps": 5,
        },
        "eval": {"metrics": ["rouge"], "max_new_tokens": 8, "num_beams": 1},
        "hub": {"push": False, "repo_id": None, "private": False, "revision": None},
        "report_to": [],
    }
    (root / "config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    lines = []
    for step in range(1, 11):
        lines.append(
            {
                "kind": "train",
                "step": step,
                "epoch": step / 10,
                "loss": 6.0 - 0.35 * step,
                "learning_rate": 5.0e-4,
                "grad_norm": 1.0,
                "tokens_per_second": 1000.0 + 10 * step,
                "target_tokens_per_second": 400.0 + 5 * step,
                "mfu": None,
            }
        )
        if step == 5:
            lines.append(
                {
                    "kind": "eval",
                    "step": 5,
                    "eval_loss": 3.5,
                    "perplexity": 33.12,
                    "rougeL": 15.0,
                    "rouge1": 17.0,
                }
            )
    lines.insert(0, {"kind": "eval", "step": 0, **FAKE_RUN_BASELINE})
    lines.append({"kind": "eval", "step": 10, **FAKE_RUN_FINAL})
    (root / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    results = {
        "baseline": FAKE_RUN_BASELINE,
        "final": FAKE_RUN_FINAL,
        "eval_dataset": {
            "name": "EdinburghNLP/xsum",
            "config": None,
            "split": "validation",
            "num_examples": 60,
        },
    }
    (root / "results.json").write_text(json.dumps(results, indent=2))

    predictions = [
        {
            "prompt": f"document number {i} about the cat\nTL;DR:",
            "references": [f"summary {i}"],
            "prediction": f"prediction {i}",
            "score": float((i * 37) % 100),
        }
        for i in range(60)
    ]
    (root / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))

    checkpoint = root / "checkpoints" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "optimizer.bin").write_bytes(b"optimizer state must never be uploaded")


@pytest.fixture
def fake_run_dir(tmp_path, tmp_path_factory) -> Path:
    """A finished summarization run (config.yaml, metrics.jsonl, results.json, predictions.jsonl, model/ with a
    1-layer GPT-2 and a 300-token BPE tokenizer, checkpoints/). Built once per session, copied per test."""
    template = tmp_path_factory.getbasetemp() / "fake_run_template"
    if not (template / "results.json").is_file():
        staging = tmp_path_factory.mktemp("fake_run_build")
        _build_fake_run(staging)
        shutil.rmtree(template, ignore_errors=True)
        staging.rename(template)
    run_dir = tmp_path / "run"
    shutil.copytree(template, run_dir)
    return run_dir


# ---------------------------------------------------------------------------------------------------------------
# Core fixtures: offline env, accelerate state reset, a tiny recipe, an in-process CLI runner.


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reset_accelerate_state():
    """Accelerator state is a process-wide singleton; each test starts from a clean one. The same for the root
    logger's handlers: `hftoolkit train` sets one up on the stderr of the test that first runs it (capsys's), which a
    later test would log into after it was closed ("--- Logging error ---")."""
    import logging

    handlers = list(logging.getLogger().handlers)
    yield
    logging.getLogger().handlers[:] = handlers
    from hftoolkit.run import reset_accelerate_state

    reset_accelerate_state()


def tiny_overrides(out: Path, **extra) -> list[str]:
    """Overrides that make any quickstart recipe train in seconds: few rows, few steps, a tiny tokenizer."""
    values = {
        "output_dir": str(out),
        "data.synthetic.num_train": 64,
        "data.synthetic.num_eval": 8,
        "model.init.vocab_size": 400,
        "train.max_steps": 4,
        "train.logging_steps": 2,
        "train.per_device_train_batch_size": 8,
        "eval.per_device_eval_batch_size": 8,
        "eval.max_new_tokens": 8,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def cli(capsys):
    """Run `hftoolkit ARGS` in-process; returns (exit code, stdout, stderr)."""
    from hftoolkit.cli import main

    def run(*args: str):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse errors and --help
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from hftoolkit.modeling import gpt2_tokenizer

    return gpt2_tokenizer()


def tiny_gpt2(vocab_size: int = 128, n_positions: int = 64, seed: int = 0, n_layer: int = 2):
    import torch
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=n_layer, n_head=2,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
