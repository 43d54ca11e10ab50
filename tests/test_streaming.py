"""Streaming (data.streaming): byte ranges read every row once, a resumed stream trains exactly like a straight one,
packed streamed batches keep their examples apart, bad rows are found on the fly, and 2 processes read disjoint
shares (2 real processes through accelerate launch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hftoolkit import streaming
from tests.conftest import REPO_ROOT, tiny_overrides
from tests.test_distributed import CPU_2PROC, free_port, launch_2proc
from tests.test_resume import cut_back, reset_accelerate, train_losses

QA = str(REPO_ROOT / "recipes/quickstart/qa.yaml")
GEN = str(REPO_ROOT / "recipes/quickstart/generation.yaml")
EOS_TEXT = "<|endoftext|>"


def paragraph_file(path: Path) -> Path:
    """Paragraphs as people write them: blank and whitespace-only separator lines (several in a row), multi-line
    paragraphs, long lines, non-ASCII text, a leading blank line and no final newline."""
    parts = ["\n"]
    for i in range(60):
        lines = [
            f"paragraph {i} line {j} " + "word " * ((i * 7 + j * 3) % 23) + "é ü" for j in range(1 + i % 4)
        ]
        parts.append("\n".join(lines) + "\n")
        parts.append(["\n", "  \n", "\t\n\n", " \n \n"][i % 4])
    parts.append("the last paragraph, without a final newline")
    path.write_text("".join(parts), encoding="utf-8")
    return path


def json_lines_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + ("\n\n" if i % 5 == 0 else "\n") for i, r in enumerate(rows)))
    return path


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 997])
def test_byte_ranges_read_every_row_once(tmp_path, n):
    """The rows of n byte ranges of a file, in range order == the file's rows read whole (paragraphs: as the map path
    splits a .txt, data._load_paragraphs; JSON lines: json.loads per non-blank line). Failing means a row that
    crosses a range boundary is read twice or by no range: processes would train on duplicated or missing rows."""
    from hftoolkit.data import _load_paragraphs

    txt = paragraph_file(tmp_path / "corpus.txt")
    expected = _load_paragraphs({"train": str(txt)})["train"]["text"]
    got = [r["text"] for r in streaming._read_ranges(streaming.byte_ranges(txt, "paragraphs", n))]
    assert got == expected

    rows = [{"text": f"row {i} " + "x" * (i % 17)} for i in range(50)]
    jsonl = json_lines_file(tmp_path / "rows.jsonl", rows)
    got = [
        {k: v for k, v in r.items() if k != streaming.OFFSET}
        for r in streaming._read_ranges(streaming.byte_ranges(jsonl, "lines", n))
    ]
    assert got == rows


# ------------------------------------------------------------------------------------------------ resume

# Small tokenization chunks and shuffle buffer, so that the 10 steps cross chunk boundaries, a pass boundary (64 rows,
# 80 examples) and a buffer in every state; the checkpoint at step 3 lies inside a chunk. Dropout stays on.
RESUME = {
    "data.streaming": "true",
    "data.shuffle_buffer_size": 16,
    "train.per_device_train_batch_size": 4,
    "train.gradient_accumulation_steps": 2,
    "train.max_steps": 10,
    "train.save_steps": 3,
    "train.save_total_limit": "null",
    "train.logging_steps": 1,
    "eval.baseline": "false",
}


def parquet_qa(folder: Path) -> list[str]:
    """The synthetic QA rows as a parquet training file (streamed by datasets' builder, not by byte ranges)."""
    from datasets import load_dataset

    from hftoolkit.synthetic import make_dataset_files

    files = make_dataset_files("qa", folder, 64, 8)
    load_dataset("json", data_files=str(files["train"]), split="train").to_parquet(folder / "train.parquet")
    return ["data.synthetic=null", f"data.train_file={folder / 'train.parquet'}",
            f"data.validation_file={files['validation']}"]  # fmt: skip


@pytest.mark.parametrize(
    "recipe,files",
    [(QA, None), (GEN, None), (QA, parquet_qa)],
    ids=["qa", "generation_documents", "qa_parquet"],
)
def test_resumed_stream_trains_like_the_straight_run(recipe, files, tmp_path, cli, monkeypatch):
    """10 straight steps == the same run stopped after its checkpoint at step 3 and resumed: the same logged loss at
    every step (read from the two runs' metrics.jsonl) and the same final weights; for byte-range shards of JSON
    lines (the synthetic set), packed generation documents, and a parquet file read by datasets' builder. Failing
    means the checkpoint does not hold the stream's position (source, shuffle buffer, random state, examples used of
    the current chunk)."""
    monkeypatch.setattr(streaming, "CHUNK_ROWS", 10)
    extra = files(tmp_path) if files else []
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, _, err = cli("train", recipe, *tiny_overrides(straight, **RESUME), *extra)
    assert code == 0, err
    reset_accelerate()
    cut_back(straight, resumed, 3)
    code, out, err = cli(
        "train", recipe, *tiny_overrides(resumed, **RESUME), *extra, "train.resume_from_checkpoint=latest"
    )
    assert code == 0, err
    assert "at step 3" in out
    assert len(train_losses(straight)) == 10
    assert train_losses(resumed) == pytest.approx(train_losses(straight), rel=1e-6)
    w_ref, w_res = (load_file(d / "model" / "model.safetensors") for d in (straight, resumed))
    for k in w_ref:
        torch.testing.assert_close(w_res[k], w_ref[k], atol=1e-6, rtol=0)
    data = json.loads((straight / "results.json").read_text())["data"]["train"]
    assert data["streamed"] and data["passes"][0] >= 1  # after step 3 the stream went on into its next pass


def test_a_dataset_folder_streams_like_a_hub_dataset(tmp_path, cli):
    """data.dataset_name (here a local folder with train/validation files, which datasets resolves like a Hub repo):
    the training split streams, the validation split is materialised for evaluation."""
    from hftoolkit.synthetic import make_dataset_files

    make_dataset_files("qa", tmp_path / "ds", 64, 8)
    stream = ["data.synthetic=null", f"data.dataset_name={tmp_path / 'ds'}", "data.streaming=true"]
    code, _, err = cli("train", QA, *tiny_overrides(tmp_path / "run"), *stream, "eval.baseline=false")
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data"]["train"]["rows"] >= 32 and results["eval_dataset"]["num_examples"] == 8


# ------------------------------------------------------------------------------------------------ packing


def test_packed_stream_batches_keep_examples_apart(gpt2_tokenizer, tmp_path):
    """A streamed packed batch: every segment (position ids restarting at 0) decodes to exactly one row of the
    file rendered by hand (prompt, answer, EOS), the first token of a segment is no target, and the packed rows'
    summed token losses == each segment run alone through the stock model. Failing means streamed examples are
    glued together or attend to each other."""
    from hftoolkit.config import load_recipe
    from hftoolkit.evaluation import token_losses
    from hftoolkit.modeling import create_model
    from hftoolkit.tasks import get_task

    rows = [
        {
            "context": f"Ann {i} lives in Oslo .",
            "question": f"Where does Ann {i} live ?",
            "answers": {"text": ["Oslo"]},
        }
        for i in range(12)
    ]
    path = json_lines_file(tmp_path / "qa.jsonl", rows)
    recipe = load_recipe(QA, [f"data.train_file={path}", "data.synthetic=null", "data.streaming=true"])
    task = get_task("qa")
    task.resolve(recipe.data)
    gpt2_tokenizer.pad_token = gpt2_tokenizer.eos_token
    source = streaming.train_source(recipe, 1)
    stream = streaming.TrainStream(
        source.dataset, task, gpt2_tokenizer, recipe.data, seed=0, rank=0, world_size=1, batch_size=6,
        packing=True, device=torch.device("cpu"), where=source.where, path=source.path,
    )  # fmt: skip
    batch = next(iter(stream))
    rendered = {f"{r['context']}\nQuestion: {r['question']}\nAnswer: Oslo{EOS_TEXT}" for r in rows}
    model = create_model("tiny", gpt2_tokenizer, n_positions=128, seed=0).eval()
    segments = []
    for r in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][r] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        for a, b in zip(starts, starts[1:], strict=False):
            ids = batch["input_ids"][r, a:b]
            if (batch["labels"][r, a:b] != -100).any():  # not the trailing padding
                segments.append((r, ids, batch["labels"][r, a:b]))
    assert len(segments) == 6 and batch["input_ids"].shape[0] < 6  # several examples per row
    for _, ids, labels in segments:
        assert gpt2_tokenizer.decode(ids) in rendered
        assert labels[0] == -100 and labels[-1] == gpt2_tokenizer.eos_token_id
    with torch.no_grad():
        packed, _ = token_losses(model, batch)
        alone = torch.zeros_like(packed)
        for r, ids, labels in segments:
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
            for t in range(len(ids) - 1):
                if labels[t + 1] != -100:
                    alone[r] -= logp[t, labels[t + 1]]
    torch.testing.assert_close(packed.float(), alone, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------ bad rows, plan

SQUAD_ROW = {
    "context": "Ann lives in Oslo .",
    "question": "Where does Ann live ?",
    "answers": {"text": ["Oslo"]},
}


def messy_stream(tmp_path: Path, bad_lines: set[int], n: int = 1200) -> list[str]:
    """A QA JSON-lines file of n rows whose lines `bad_lines` (1-based) have a whitespace-only question, streamed in
    file order (a shuffle buffer of 1 row)."""
    rows = [dict(SQUAD_ROW, question=" " if i + 1 in bad_lines else SQUAD_ROW["question"]) for i in range(n)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text(json.dumps(SQUAD_ROW) + "\n")
    return [
        *tiny_overrides(tmp_path / "run"), "data.synthetic=null", f"data.train_file={tmp_path / 'train.jsonl'}",
        f"data.validation_file={tmp_path / 'eval.jsonl'}", "data.streaming=true", "data.shuffle_buffer_size=1",
        "eval.baseline=false", "train.max_steps=1",
    ]  # fmt: skip


def test_bad_rows_are_dropped_and_counted_on_the_fly(tmp_path, cli):
    """Unusable rows in a stream: dropped and counted (results.json → data.train.bad_rows: the 2 bad rows among
    the 1,002 rows the first chunk read); data.bad_rows=error names the first one's line; more than
    data.max_bad_rows_share of the rows read (checked at each bad row from 1,000 rows on) is an error. Failing means bad rows are
    trained on, miscounted, or the recipe's bad_rows policy is ignored when streaming."""
    code, _, err = cli("train", QA, *messy_stream(tmp_path, {3, 700}))
    assert code == 0, err
    train = json.loads((tmp_path / "run" / "results.json").read_text())["data"]["train"]
    assert train["bad_rows"] == {"whitespace-only question": 2}
    assert train["rows"] == 1002 and train["examples"] == 1000

    code, _, err = cli("train", QA, *messy_stream(tmp_path, {3, 700}), "train.overwrite_output_dir=true",
                       "data.bad_rows=error")  # fmt: skip
    assert code == 2
    assert (
        "error: data: 1 unusable train row(s) in" in err
        and "(whitespace-only question; rows at line 3)" in err
    )

    code, _, err = cli(
        "train", QA, *messy_stream(tmp_path, set(range(5, 1201, 10))), "train.overwrite_output_dir=true"
    )
    assert code == 2
    # Every 10th row is bad; the share is checked at each bad row from the 1,000th row read on: line 1005 is the
    # first, the 101st bad row.
    assert "error: data: 101 of 1005 train rows in" in err and "rows at line 1005 and before" in err
    assert "more than data.max_bad_rows_share=0.05" in err


def test_plan_reads_only_the_head_of_the_stream(tmp_path, cli):
    """`plan` on a streaming recipe says its lengths come from the stream's head and that max_steps is the run."""
    code, out, err = cli("plan", QA, *tiny_overrides(tmp_path / "o"), "data.streaming=true")
    assert code == 0, err
    assert "streaming: the lengths below are those of the stream's first 64 rows" in out
    assert "train.max_steps=4 steps" in out


# ------------------------------------------------------------------------------------------------ 2 processes

SHARE_SCRIPT = """
import json, sys, torch
from accelerate import Accelerator
from hftoolkit import streaming
from hftoolkit.config import load_recipe
from hftoolkit.modeling import gpt2_tokenizer
from hftoolkit.tasks import get_task

acc = Accelerator()
recipe = load_recipe(sys.argv[1], sys.argv[3:])
task = get_task(recipe.task)
task.resolve(recipe.data)
tok = gpt2_tokenizer()
tok.pad_token = tok.eos_token
source = streaming.train_source(recipe, acc.num_processes)
stream = streaming.TrainStream(
    source.dataset, task, tok, recipe.data, seed=0, rank=acc.process_index, world_size=acc.num_processes,
    batch_size=1, packing=False, device=torch.device("cpu"), where=source.where, path=source.path,
)
texts = []
for batch in stream:  # one example per batch, until the second pass begins
    if stream.pass_index > 0:
        break
    texts.append(tok.decode(batch["input_ids"][0]))
with open(f"{sys.argv[2]}/share_{acc.process_index}.json", "w") as f:
    json.dump(texts, f)
"""


@pytest.mark.multiproc
def test_two_processes_stream_disjoint_shares(tmp_path):
    """2 processes (accelerate launch, gloo): over one pass, each process's examples decode to paragraphs of the
    file, the two shares do not overlap and together are every paragraph exactly once. Failing means processes
    train on the same rows (no split by node, or accelerate sharding the split stream again) or lose some."""
    from hftoolkit.data import _load_paragraphs

    txt = paragraph_file(tmp_path / "corpus.txt")
    script = tmp_path / "shares.py"
    script.write_text(SHARE_SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_2PROC,
           "--main_process_port", str(free_port()), str(script), GEN, str(tmp_path),
           "data.synthetic=null", f"data.train_file={txt}", "data.streaming=true", "data.max_seq_len=1024"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shares = [json.loads((tmp_path / f"share_{r}.json").read_text()) for r in (0, 1)]
    paragraphs = _load_paragraphs({"train": str(txt)})["train"]["text"]
    assert all(shares)
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(p + EOS_TEXT for p in paragraphs)


@pytest.mark.multiproc
def test_two_process_streaming_run_trains(tmp_path):
    """`accelerate launch` of 2 processes on a streamed recipe trains to train.max_steps (neither process waits for
    the other at the end of its share), each over its half of the rows, and results.json counts both processes."""
    out = tmp_path / "run"
    launch_2proc("train", QA, *tiny_overrides(out, **{"data.streaming": "true", "eval.baseline": "false",
                                                       "train.max_steps": 12, "data.shuffle_buffer_size": 8}))  # fmt: skip
    train = json.loads((out / "results.json").read_text())["data"]["train"]
    assert train["processes"] == 2 and len(train["passes"]) == 2
    # Each process trains on 12 steps × 8 = 96 examples from its own byte ranges, about 32 of the 64 rows: 2-3
    # complete passes over its share (a process reading all 64 rows would have completed 1).
    assert min(train["passes"]) >= 2
    assert len(train_losses(out)) == 6  # logging every 2 steps


def test_eval_sets_beside_a_stream(tmp_path, cli):
    """data.eval_sets replace the stream's validation split, each set loaded whole as without streaming."""
    from tests.test_mixture import eval_set_files

    first, second = eval_set_files(tmp_path)
    sets = (
        f"data.eval_sets={{first: {{validation_file: {first}}}, "
        f"second: {{validation_file: {second}, text_column: body, summary_column: tldr, max_eval_samples: 10}}}}"
    )
    code, out, err = cli(
        "plan",
        "recipes/quickstart/summarization.yaml",
        *tiny_overrides(tmp_path / "o"),
        "data.streaming=true",
        sets,
    )
    assert code == 0, err[-2000:]
    assert "eval set first: 12 rows" in out and "eval set second: 10 rows" in out
