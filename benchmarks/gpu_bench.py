"""GPU training throughput of hftoolkit's step on a GPT-2-124M-shape model: tokens/s and MFU.

Usage: python benchmarks/gpu_bench.py --steps 300 --out gpu.json
       python benchmarks/gpu_bench.py --steps 300 --compile --batch 16 --seq-len 1024 --docs-per-row 4

The step is the library's own: hftoolkit.modeling.create_model("gpt2", real GPT-2 tokenizer), the AdamW of
hftoolkit.train.build_optimizer (fused on CUDA), hftoolkit.train.backward_window under an accelerate Accelerator with
bf16 mixed precision, gradient clipping at 1.0; TF32 on for the fp32 matmuls that remain. MFU is model FLOPs
(hftoolkit.flops.flops_per_token: 6·N + 12·L·H·Q·T per token) × tokens/s over the device's dense bf16 peak from
hftoolkit.flops.PEAK_BF16. Batches are random token ids, every token a target; --docs-per-row > 1 restarts the
position ids inside each row, as packing does, so the block-causal mask path is measured too.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="timed optimizer steps (default 300)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation, allocator)")
    p.add_argument("--batch", type=int, default=16, help="rows per step (halved until it fits)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per row (≤ 1024)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model as hftoolkit does")
    p.add_argument(
        "--static-shapes",
        action="store_true",
        help="with --compile: dynamic=False (hftoolkit uses dynamic=True)",
    )
    p.add_argument("--docs-per-row", type=int, default=1, help="documents per row (position ids restart)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    return p.parse_args(argv)


def run(args, batch: int) -> dict:
    import torch
    from accelerate import Accelerator

    from hftoolkit.config import TrainConfig
    from hftoolkit.flops import device_peak_flops, flops_per_token
    from hftoolkit.modeling import create_model, gpt2_tokenizer, set_dropout
    from hftoolkit.speedups import speed_up, target_positions
    from hftoolkit.train import backward_window, build_optimizer

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    acc = Accelerator(mixed_precision="bf16")
    tokenizer = gpt2_tokenizer()
    model = create_model("gpt2", tokenizer, seed=0)
    set_dropout(model, 0.0)
    speed_up(model)  # as every hftoolkit run does: fused GELU, LM head at target positions (here: all)
    flops_token = flops_per_token(model, args.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(acc.device)
    optimizer = build_optimizer(model, TrainConfig(learning_rate=3e-4), acc.device)
    if args.compile:
        model = torch.compile(model, dynamic=not args.static_shapes)
    model, optimizer = acc.prepare(model, optimizer)
    model.train()

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (batch, args.seq_len), generator=gen)
    doc = -(-args.seq_len // args.docs_per_row)
    positions = (torch.arange(args.seq_len) % doc).expand(batch, -1)
    data = {"input_ids": ids, "labels": ids.clone()}
    data["target_positions"] = target_positions(data["labels"])  # as the collators hand them over
    if args.docs_per_row > 1:
        data["position_ids"] = positions
    data = {k: v.to(acc.device) for k, v in data.items()}

    def step():
        loss = backward_window(acc, model, [data], targets_only=True)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens_per_s = batch * args.seq_len * args.steps / elapsed
    peak = device_peak_flops(acc.device)
    return {
        "device": torch.cuda.get_device_name(acc.device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "GPT-2 124M shape (12×768, 50257 vocab), dropout 0",
        "params": n_params,
        "batch": batch,
        "seq_len": args.seq_len,
        "docs_per_row": args.docs_per_row,
        "compile": args.compile,
        "compile_dynamic": args.compile and not args.static_shapes,
        "precision": "bf16 autocast (accelerate), TF32 matmuls, fused AdamW",
        "warmup_steps": args.warmup,
        "warmup_seconds": warmup_s,
        "steps": args.steps,
        "seconds": elapsed,
        "step_ms": 1000 * elapsed / args.steps,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_token,
        "achieved_flops": tokens_per_s * flops_token,
        "peak_bf16_flops": peak,
        "mfu": tokens_per_s * flops_token / peak if peak else None,
        "final_loss": float(loss),
        "max_memory_gib": torch.cuda.max_memory_allocated(acc.device) / 2**30,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("error: gpu_bench.py needs torch (pip install torch)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            f"error: gpu_bench.py needs a CUDA device; torch {torch.__version__} sees none "
            f"(built with CUDA {torch.version.cuda or 'none'}); run it on a GPU machine",
            file=sys.stderr,
        )
        return 2
    if not 1 <= args.seq_len <= 1024:
        print(f"error: --seq-len {args.seq_len}: GPT-2's context is 1024 tokens", file=sys.stderr)
        return 2
    batch = args.batch
    while True:
        try:
            result = run(args, batch)
            break
        except torch.cuda.OutOfMemoryError:
            pass
        # Outside the except block, so the failed attempt's tensors (held by the traceback) can be freed.
        if batch == 1:
            print("error: out of memory even at --batch 1; lower --seq-len", file=sys.stderr)
            return 1
        gc.collect()
        torch.cuda.empty_cache()
        print(f"batch {batch} does not fit; retrying with {batch // 2}", file=sys.stderr)
        batch //= 2
    peak = result["peak_bf16_flops"]
    mfu = (
        f"{result['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s bf16"
        if peak
        else "MFU n/a (device not in PEAK_BF16)"
    )
    print(
        f"{result['device']}: B={result['batch']} T={result['seq_len']} compile={result['compile']} | "
        f"{result['tokens_per_s']:,.0f} tokens/s, {result['step_ms']:.1f} ms/step, "
        f"{result['achieved_flops'] / 1e12:.1f} TFLOP/s = {mfu} | loss {result['final_loss']:.3f} | "
        f"{result['max_memory_gib']:.1f} GiB"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
