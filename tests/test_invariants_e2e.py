"""End-to-end invariants through `hftoolkit train RECIPE k=v`, read back from the run directory
(metrics.jsonl, results.json, predictions.jsonl, checkpoints/): what a user sees when an invariant of
test_invariants.py breaks."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hftoolkit.checkpoint import list_checkpoints
from tests.conftest import REPO_ROOT, tiny_overrides

QS = REPO_ROOT / "recipes" / "quickstart"


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def read_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def one_error_line(result) -> str:
    code, out, err = result
    assert code == 2, (code, err)
    assert "Traceback" not in err + out
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ one run


@pytest.fixture(scope="module")
def spied_run(tmp_path_factory):
    """5 steps of translation with an eval every 2 steps on a budget of 3 prompts (8 in the eval set), and a
    checkpoint every step with save_total_limit=2. Every call of generation.generate_batch is recorded with
    the index of the evaluation it belongs to (the eval lines already in metrics.jsonl when it runs)."""
    import hftoolkit.generation
    import hftoolkit.train  # noqa: F401  (imports every module that generates, before patching them)
    from hftoolkit.cli import main

    out = tmp_path_factory.mktemp("spied") / "run"
    real = hftoolkit.generation.generate_batch
    calls: list[tuple[int, list[tuple[int, ...]]]] = []

    def spy(model, tokenizer, prompts, *args, **kwargs):
        metrics = out / "metrics.jsonl"
        done = sum('"eval"' in line for line in metrics.read_text().splitlines()) if metrics.exists() else 0
        calls.append((done, [tuple(p) for p in prompts]))
        return real(model, tokenizer, prompts, *args, **kwargs)

    extra = {
        "train.max_steps": 5,
        "train.logging_steps": 1,
        "train.eval_steps": 2,
        "eval.max_eval_samples_during_training": 3,
        "train.save_steps": 1,
        "train.save_total_limit": 2,
    }
    with pytest.MonkeyPatch.context() as mp:
        for module in [m for name, m in sys.modules.items() if name.startswith("hftoolkit")]:
            if getattr(module, "generate_batch", None) is real:
                mp.setattr(module, "generate_batch", spy)
        try:
            code = main(["train", str(QS / "translation.yaml"), *tiny_overrides(out, **extra)])
        finally:
            reset_accelerate()
    assert code == 0
    return out, calls


def test_periodic_evals_generate_exactly_their_budgeted_subset(spied_run):
    """With eval.max_eval_samples_during_training=3 and 8 eval rows, the periodic evals (steps 2 and 4)
    generate for exactly 3 distinct prompts, the same 3 each time, taken from the eval set; the baseline and
    the final evaluation generate for all 8, each once. Failing means periodic evals cost a full evaluation
    (or score a different subset every time), or the reported baseline/final score covers only part of the
    eval set."""
    out, calls = spied_run
    evals = [x for x in read_lines(out / "metrics.jsonl") if x["kind"] == "eval"]
    # Step 5 twice: the last step competes for the best checkpoint on the subset, then the final eval on all.
    assert [e["step"] for e in evals] == [0, 2, 4, 5, 5]
    per_eval: dict[int, list[tuple[int, ...]]] = {}
    for index, prompts in calls:
        per_eval.setdefault(index, []).extend(prompts)
    assert sorted(per_eval) == [0, 1, 2, 3, 4]
    assert [len(per_eval[i]) for i in range(5)] == [8, 3, 3, 3, 8]
    assert all(len(set(per_eval[i])) == len(per_eval[i]) for i in range(5))  # no prompt twice
    assert set(per_eval[0]) == set(per_eval[4])
    assert set(per_eval[1]) == set(per_eval[2]) == set(per_eval[3]) and set(per_eval[1]) < set(per_eval[0])
    assert len(read_lines(out / "predictions.jsonl")) == 8


def test_save_total_limit_keeps_exactly_the_newest_checkpoints(spied_run):
    """save_steps=1, save_total_limit=2, 5 steps: exactly the checkpoints of steps 4 and 5 remain (and the best
    periodic evaluation's, which is never rotated away), nothing else in checkpoints/ (no leftover temp folder). Failing means old checkpoints fill the disk, or the
    rotation deletes the checkpoint a resume needs."""
    out, _ = spied_run
    kept = list_checkpoints(out / "checkpoints")
    # The best periodic evaluation's checkpoint is kept besides the newest 2.
    best = json.loads((out / "results.json").read_text())["best"]["step"]
    assert [int(re.findall(r"\d+", p.name)[-1]) for p in kept] == sorted({4, 5, best})
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(p.name for p in kept)


# ------------------------------------------------------------------------------------------------ learning


def test_a_short_run_learns_to_summarize_and_to_stop(tmp_path, cli):
    """60 steps of the summarization quickstart: the eval loss falls from ~6.8 to below 3.5, ROUGE-L rises
    from 0 and most completions end by themselves (EOS) instead of running into max_new_tokens. Failing means
    the model is trained on the wrong tokens (prompt, padding, unshifted labels), packed examples leak into
    each other, or the EOS label is lost, so fine-tuned models never stop."""
    out = tmp_path / "run"
    extra = {
        "train.max_steps": 60,
        "train.logging_steps": 20,
        "data.synthetic.num_train": 512,
        "data.synthetic.num_eval": 16,
        "model.init.vocab_size": 1024,
        "train.per_device_train_batch_size": 32,
        "eval.per_device_eval_batch_size": 16,
        "eval.max_new_tokens": "null",
    }
    code, _, err = cli("train", QS / "summarization.yaml", *tiny_overrides(out, **extra))
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    base, final = results["baseline"], results["final"]
    assert base["rougeL"] < 2 and base["stopped_pct"] < 10
    assert final["eval_loss"] < 3.5 < base["eval_loss"] - 2
    assert final["rougeL"] > 8
    assert final["stopped_pct"] >= 60
    preds = read_lines(out / "predictions.jsonl")
    assert len(preds) == 16
    assert sum(p["stopped"] for p in preds) == round(final["stopped_pct"] * 16 / 100)
    assert sum(bool(p["prediction"]) for p in preds) >= 12
    assert max(p["score"] for p in preds) > 30


# ------------------------------------------------------------------------------------------------ errors


def data_file_overrides(tmp_path: Path, train_file: Path) -> list[str]:
    return tiny_overrides(tmp_path / "out", **{"data.synthetic": "null", "data.train_file": train_file})


def test_bad_extension_is_the_documented_line(tmp_path, cli):
    """A data file with an unsupported extension: exactly the one line that names the key, the path, the
    extension and the supported ones, exit code 2. Failing means a user gets a datasets traceback or a message
    that does not say what to change."""
    path = tmp_path / "rows.xml"
    path.write_text("<rows/>\n")
    line = one_error_line(cli("train", QS / "qa.yaml", *data_file_overrides(tmp_path, path)))
    supported = ".txt, .json, .jsonl, .csv, .parquet"
    assert line == f"error: data.train_file: {path}: unsupported extension '.xml' (use {supported})"


@pytest.mark.parametrize(
    "name, text",
    [("rows.jsonl", ""), ("rows.csv", "context,question,answers\n")],
    ids=["jsonl-without-rows", "csv-header-only"],
)
def test_empty_train_file_says_the_split_is_empty(tmp_path, cli, name, text):
    """An empty training file (no rows; a CSV with only its header) is the README's one line
    `data: the train split is empty` (the file name is chosen not to contain the word)."""
    path = tmp_path / name
    path.write_text(text)
    line = one_error_line(cli("train", QS / "qa.yaml", *data_file_overrides(tmp_path, path)))
    assert line.startswith("error: data: the train split is empty"), line


# ------------------------------------------------------------------------------------------------ processes


def launch_2proc(*args: str) -> None:
    """`ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m hftoolkit
    ARGS` on a free port (as tests/test_distributed.py does)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    config = REPO_ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["--main_process_port", str(port), "-m", "hftoolkit", *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.multiproc
def test_two_processes_of_b_have_the_gradient_of_one_process_of_2b(tmp_path, cli):
    """1 process × 8 examples and 2 processes × 4 (real gloo DDP): the PRE-clip gradient norm logged at every
    step is the same (clipping at 1e6 never engages, so nothing hides a factor), and so is the loss; the
    baseline evaluation of the identical initial weights gives the same eval loss and scores, from 7 rows
    sharded unevenly (accelerate pads the shorter shard with duplicates), and 7 predictions in the same order
    although one rank generates a batch twice (ranks generate in lockstep). Failing means N processes train
    with 1/N (or N×) the gradient of one big batch, normalise the loss by their own target tokens only, or
    count duplicated eval rows or predictions."""
    common = {
        "model.dropout": 0.0,
        "train.max_steps": 3,
        "train.logging_steps": 1,
        "train.max_grad_norm": 1.0e6,
        "data.synthetic.num_eval": 7,
        "eval.per_device_eval_batch_size": 3,
        "eval.batch_tokens": 1,  # one prompt per generation batch: 7 batches, so a rank repeats one
    }
    qa = str(QS / "qa.yaml")
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = cli("train", qa, *tiny_overrides(one, **common))
    assert code == 0, err
    launch_2proc("train", qa, *tiny_overrides(two, **common, **{"train.per_device_train_batch_size": 4}))

    lines = {d: read_lines(d / "metrics.jsonl") for d in (one, two)}
    train = {d: [x for x in lines[d] if x["kind"] == "train"] for d in (one, two)}
    assert [x["step"] for x in train[two]] == [x["step"] for x in train[one]] == [1, 2, 3]
    norms = {d: [x["grad_norm"] for x in train[d]] for d in (one, two)}
    assert all(n is not None and n > 0 for n in norms[one])
    assert norms[two] == pytest.approx(norms[one], rel=1e-4)
    assert [x["loss"] for x in train[two]] == pytest.approx([x["loss"] for x in train[one]], rel=1e-4)

    baseline = {d: next(x for x in lines[d] if x["kind"] == "eval" and x["step"] == 0) for d in (one, two)}
    assert baseline[two].keys() == baseline[one].keys()
    for key, value in baseline[one].items():
        assert baseline[two][key] == pytest.approx(value, abs=2e-4), key
    preds = {d: read_lines(d / "predictions.jsonl") for d in (one, two)}
    assert len(preds[two]) == 7
    assert [p["prompt"] for p in preds[two]] == [p["prompt"] for p in preds[one]]
