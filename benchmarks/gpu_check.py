"""One prepared GPU check (one CUDA device, ≤ 8 minutes), written as ONE JSON file.

Usage: python benchmarks/gpu_check.py --out gpu_check.json   (or: bash benchmarks/gpu_check.sh --out FILE)

1. training: GPT-2-124M (hftoolkit.run.load_model + prepare_model, as every run), bf16 autocast through
   make_accelerator, the library's own step (hftoolkit.train.optimizer_step: backward_window, clipping, fused
   AdamW, schedule) on packed-style rows of random tokens; tokens/s and MFU (hftoolkit.flops) with and without
   torch.compile (model.torch_compile, compiled as prepare_model compiles it).
2. eval: benchmarks/run.py's generation comparison (b), on this GPU: hftoolkit's generate_predictions against the
   examples-style loop, on a model that stops and on one that does not (`run.py --quick --skip train flops`).
3. end to end: a short real `hftoolkit train` (bf16, packing, periodic generation eval on a subset), its
   metrics.jsonl and results.json read back.

Without a CUDA device it exits with code 2 and one line. Not part of the test suite (tests/test_gpu_check.py only
checks that exit).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", type=Path, default=Path("gpu_check.json"), help="the JSON written (default gpu_check.json)"
    )
    p.add_argument("--batch", type=int, default=16, help="training rows per step (halved until it fits)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per training row (≤ 1024)")
    p.add_argument("--steps", type=int, default=60, help="timed training steps per setting")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, allocator)")
    p.add_argument(
        "--skip", nargs="*", default=[], choices=["train", "eval", "e2e"], help="parts to leave out"
    )
    return p.parse_args(argv)


def gpt2_recipe(compile_model: bool, output_dir: str):
    from hftoolkit.config import load_recipe

    return load_recipe(
        None,
        [
            "task=generation",
            "seed=0",
            f"output_dir={output_dir}",
            "model.init={preset: gpt2, tokenizer: gpt2}",
            "model.dropout=0.0",
            f"model.torch_compile={str(compile_model).lower()}",
            "data.synthetic={num_train: 8}",  # not read: the steps run on random token ids
            "train.mixed_precision=bf16",
            "train.learning_rate=3e-4",
        ],
    )


def packed_batch(batch: int, seq_len: int, vocab: int, docs_per_row: int = 4) -> dict:
    """Random tokens, every one a target, `docs_per_row` documents per row with restarting position ids (the
    block-causal path that packing takes), plus the target positions the collators hand over."""
    import torch

    from hftoolkit.speedups import target_positions

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    doc = -(-seq_len // docs_per_row)
    data = {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": (torch.arange(seq_len) % doc).expand(batch, -1).contiguous(),
    }
    data["target_positions"] = target_positions(data["labels"])
    return data


def train_throughput(compile_model: bool, batch: int, args, workdir: str) -> dict:
    import torch

    from hftoolkit.flops import device_peak_flops, flops_per_token
    from hftoolkit.run import load_model, make_accelerator, prepare_model, resolve_recipe
    from hftoolkit.train import build_optimizer, build_scheduler, optimizer_step

    recipe = gpt2_recipe(compile_model, workdir)
    model, tokenizer = load_model(recipe, resolve_recipe(recipe), {})
    acc = make_accelerator(recipe)
    flops_token = flops_per_token(model, args.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(acc.device)
    model, packing, targets_only = prepare_model(model, recipe, acc)
    cfg = recipe.train
    optimizer = build_optimizer(model, cfg, acc.device)
    scheduler = build_scheduler(optimizer, cfg, args.warmup + args.steps + 1, acc.num_processes)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    model.train()
    data = {k: v.to(acc.device) for k, v in packed_batch(batch, args.seq_len, len(tokenizer)).items()}

    def steps(n: int):
        loss = None
        for _ in range(n):
            loss, _ = optimizer_step(
                acc, model, [data], optimizer, scheduler, cfg.max_grad_norm, targets_only
            )
        torch.cuda.synchronize()
        return loss

    start = time.perf_counter()
    steps(args.warmup)
    warmup_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss = steps(args.steps)
    elapsed = time.perf_counter() - start
    tokens_per_s = batch * args.seq_len * args.steps / elapsed
    peak = device_peak_flops(acc.device)
    return {
        "compile": compile_model,
        "params": n_params,
        "batch": batch,
        "seq_len": args.seq_len,
        "packing_probe_kept_packing": packing,
        "warmup_steps": args.warmup,
        "warmup_seconds": warmup_s,
        "steps": args.steps,
        "step_ms": 1000 * elapsed / args.steps,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_token,
        "achieved_flops": tokens_per_s * flops_token,
        "peak_bf16_flops": peak,
        "mfu": tokens_per_s * flops_token / peak if peak else None,
        "final_loss": float(loss),
        "max_memory_gib": torch.cuda.max_memory_allocated(acc.device) / 2**30,
    }


def train_part(args) -> dict:
    """Both settings; the batch is halved on out-of-memory (the same batch then serves both)."""
    import gc

    import torch

    out, batch = {}, args.batch
    for compile_model in (False, True):
        while True:
            try:
                with tempfile.TemporaryDirectory(prefix="hftoolkit-gpu-") as tmp:
                    out["compiled" if compile_model else "eager"] = train_throughput(
                        compile_model, batch, args, tmp
                    )
                break
            except torch.cuda.OutOfMemoryError:
                if batch == 1:
                    raise
            gc.collect()
            torch.cuda.empty_cache()
            batch //= 2
        print(f"[gpu train] {json.dumps(out['compiled' if compile_model else 'eager'])}", flush=True)
    return out


def eval_part(workdir: Path) -> dict:
    """benchmarks/run.py's eval comparison, run in a fresh interpreter on this GPU."""
    path = workdir / "eval.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--skip", "train", "flops"]
    proc = subprocess.run([*cmd, "--out", str(path)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "returncode": proc.returncode}
    report = json.loads(path.read_text())
    keys = [k for k in report if k.startswith("eval")]
    return {k: report[k] for k in keys} | {
        "machine": report["machine"],
        "wall_seconds": report["wall_seconds"],
    }


def e2e_part(workdir: Path) -> dict:
    """`hftoolkit train` as a user runs it: the summarization quickstart in bf16, packed, with a generation eval
    every 100 steps on 50 prompts."""
    out_dir = workdir / "run"
    cmd = [
        sys.executable, "-m", "hftoolkit", "train", str(REPO / "recipes" / "quickstart" / "summarization.yaml"),
        f"output_dir={out_dir}", "train.mixed_precision=bf16", "data.packing=true", "train.max_steps=300",
        "train.eval_steps=100", "eval.max_eval_samples_during_training=50",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    result = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "wall_seconds": wall}
    if proc.returncode != 0:
        return result | {"stderr_tail": proc.stderr[-2000:]}
    metrics = [
        json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    train = [m for m in metrics if m.get("kind") == "train"]
    return result | {
        "evals": [m for m in metrics if m.get("kind") == "eval"],
        "last_train_log": train[-1] if train else None,
        "results": json.loads((out_dir / "results.json").read_text()),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            f"error: gpu_check needs a CUDA device; torch {torch.__version__} sees none "
            f"(CUDA build: {torch.version.cuda or 'none'}); run it on a GPU machine",
            file=sys.stderr,
        )
        return 2
    if not 1 <= args.seq_len <= 1024:
        print(f"error: --seq-len {args.seq_len}: GPT-2's context is 1024 tokens", file=sys.stderr)
        return 2
    started = time.perf_counter()
    report: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    with tempfile.TemporaryDirectory(prefix="hftoolkit-gpu-") as tmp:
        if "train" not in args.skip:
            report["train"] = train_part(args)
        if "eval" not in args.skip:
            report["eval"] = eval_part(Path(tmp))
            print(f"[gpu eval] speedup {report['eval'].get('eval_speedup_vs_examples_loop')}", flush=True)
        if "e2e" not in args.skip:
            report["hftoolkit_train"] = e2e_part(Path(tmp))
            print(f"[gpu e2e] returncode {report['hftoolkit_train']['returncode']}", flush=True)
    report["wall_seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({report['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
