"""Streaming vs the map-based path: a generated text file of ≥ 2 GB streamed for 50 steps (peak RSS, training
tokens/s), against the map-based path on a slice of the same file small enough to tokenize up front.

Usage: .venv/bin/python benchmarks/streaming.py [--gb 2.05] [--steps 50] [--slice-mb 8] [--repeats 2]
                                                 [--tmp /tmp] [--out streaming.json]

Each run is a fresh `python -m hftoolkit train` process (the same recipe: generation, the tiny preset with the real
GPT-2 tokenizer, packed blocks of 128 tokens, 4 per step; eval-loss batches of 4, so that the evaluation's logits
over GPT-2's 50k-token vocabulary do not set the peak), so its peak RSS is its own (os.wait4). Runs alternate
map, stream, map, stream, ... so that the load of a shared machine falls on both sides alike; the load average is
recorded around every run. Training tokens/s is what the run logs in metrics.jsonl: tokens over the loop's wall time
between logs, so on-the-fly reading and tokenizing of the stream counts against it, while the map path tokenized
before its loop. The generated files live in a temporary folder, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the of and to in is was for on that with as by at from his her its an are were be has had which this who "
    "river city council market season players report minister school music film station county village church "
    "army war album league company island railway building water energy region village museum design history "
    "north south early later during after before under between against around across through within among "
    "found built named played served opened closed moved written released elected recorded described announced"
).split()


def paragraph(rng: random.Random) -> str:
    """~300-500 GPT-2 tokens of English-like text, in 3-6 lines."""
    lines = []
    for _ in range(rng.randint(3, 6)):
        words = rng.choices(WORDS, k=rng.randint(45, 85))
        lines.append(" ".join(words).capitalize() + " .")
    return "\n".join(lines)


def generate_corpus(path: Path, gigabytes: float, seed: int = 0) -> int:
    """Writes paragraphs separated by blank lines until the file holds `gigabytes` GB; returns its size in bytes.
    4,000 distinct paragraphs, each block of them reordered and tagged with its block number."""
    rng = random.Random(seed)
    base = [paragraph(rng) for _ in range(4000)]
    target, size, block = int(gigabytes * 1e9), 0, 0
    with path.open("w", encoding="utf-8") as f:
        while size < target:
            order = list(range(len(base)))
            rng.shuffle(order)
            text = "".join(f"Part {block}.{i} : {base[i]}\n\n" for i in order)
            f.write(text)
            size += len(text.encode("utf-8"))
            block += 1
    return path.stat().st_size


def head_slice(src: Path, dst: Path, megabytes: float) -> None:
    """The first `megabytes` MB of `src`, cut at a paragraph boundary."""
    with src.open("rb") as f:
        data = f.read(int(megabytes * 1e6))
    dst.write_bytes(data[: data.rfind(b"\n\n") + 2])


def train_once(out: Path, train_file: Path, eval_file: Path, streaming: bool, steps: int) -> dict:
    overrides = [
        f"output_dir={out}", "data.synthetic=null", f"data.train_file={train_file}",
        f"data.validation_file={eval_file}", "model.init={preset: tiny, tokenizer: gpt2}", "data.max_seq_len=128",
        "train.per_device_train_batch_size=4", "eval.per_device_eval_batch_size=4", f"train.max_steps={steps}", "train.logging_steps=5",
        "train.eval_steps=null", "eval.baseline=false", f"data.streaming={'true' if streaming else 'false'}",
    ]  # fmt: skip
    cmd = [
        sys.executable,
        "-m",
        "hftoolkit",
        "train",
        str(REPO / "recipes/quickstart/generation.yaml"),
        *overrides,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           # each run tokenizes from scratch: a datasets cache of its own, deleted with the run
           "HF_DATASETS_CACHE": str(out.parent / f"{out.name}-cache")}  # fmt: skip
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"run {out} failed:\n{stderr[-3000:]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [x["tokens_per_second"] for x in lines if x["kind"] == "train"]
    return {
        "streaming": streaming,
        "tokens_per_second_windows": [round(r) for r in rates],
        "tokens_per_second_mean": statistics.fmean(rates),
        "tokens_per_second_after_first_window": statistics.fmean(rates[1:]),
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux: kilobytes
        "wall_s": wall,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=2.05, help="size of the generated text file (GB)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--slice-mb", type=float, default=8.0, help="the map-based path's slice of the file (MB)")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, alternating")
    p.add_argument("--tmp", default=None, help="where the temporary folder goes (default: the system's)")
    p.add_argument("--out", default=None, help="write every figure as JSON")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="hftoolkit-stream-bench-", dir=args.tmp))
    try:
        corpus, piece, evals = tmp / "corpus.txt", tmp / "slice.txt", tmp / "eval.txt"
        t0 = time.perf_counter()
        size = generate_corpus(corpus, args.gb)
        print(f"generated {corpus} ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
        head_slice(corpus, piece, args.slice_mb)
        rng = random.Random(1)
        evals.write_text("\n\n".join(paragraph(rng) for _ in range(20)) + "\n", encoding="utf-8")
        runs = []
        for i in range(args.repeats):
            for streaming in (False, True):
                out = tmp / f"{'stream' if streaming else 'map'}-{i}"
                run = train_once(out, corpus if streaming else piece, evals, streaming, args.steps)
                runs.append(run)
                print(
                    f"{'stream' if streaming else 'map   '} #{i}: {run['tokens_per_second_mean']:,.0f} tokens/s "
                    f"(after the first window {run['tokens_per_second_after_first_window']:,.0f}), peak RSS "
                    f"{run['peak_rss_mb']:,.0f} MB, wall {run['wall_s']:.0f} s, load {run['load_avg_before'][0]:.1f}"
                )
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(tmp / f"{out.name}-cache", ignore_errors=True)
        side = {name: [r for r in runs if r["streaming"] == (name == "stream")] for name in ("map", "stream")}
        summary = {
            f"{name}_{key}": statistics.median(r[key] for r in rs)
            for name, rs in side.items()
            for key in (
                "tokens_per_second_mean",
                "tokens_per_second_after_first_window",
                "peak_rss_mb",
                "wall_s",
            )
        }
        summary["stream_vs_map_tokens_per_second"] = (
            summary["stream_tokens_per_second_mean"] / summary["map_tokens_per_second_mean"]
        )
        summary["stream_vs_map_after_first_window"] = (
            summary["stream_tokens_per_second_after_first_window"]
            / summary["map_tokens_per_second_after_first_window"]
        )
        print(json.dumps({k: round(v, 3) for k, v in summary.items()}, indent=1))
        if args.out:
            record = {
                "file_bytes": size, "slice_mb": args.slice_mb, "steps": args.steps, "summary": summary, "runs": runs,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            }  # fmt: skip
            Path(args.out).write_text(json.dumps(record, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
