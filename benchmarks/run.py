"""Side-by-side speed benchmarks: hftoolkit against what a user would otherwise run, on one machine, in one run.

Usage: python benchmarks/run.py [--quick | --smoke] [--out FILE.json] [--skip train eval flops] [--datasets ...]

a. training examples/s: hftoolkit's own setup and step, called from the library (make_accelerator,
   prepare_model, build_train_loader with the packing collator, build_optimizer, build_scheduler, then
   epoch_windows → optimizer_step) against transformers.Trainer with DataCollatorForSeq2Seq (dynamic padding,
   label_pad_token_id=-100), and against TRL's SFTTrainer (pre-tokenized prompt-completion data,
   completion_only_loss; padded, and padding-free) when trl is installed (the `bench` extra). Same model init,
   same tokenized examples in the same order, same batch, same AdamW/lr/schedule/clipping, dropout 0, no eval.
b. generation-based eval: the generation setup of a run (build_generation_eval: decoding, prompts, token
   budget) and generate_predictions (continuous batching), against an examples-style loop (dataset order,
   left-padded batches, model.generate, cut at the stop string afterwards). Same model, same prompt token ids,
   same max_new_tokens, greedy, fp32. Twice: on the one-epoch model of (a), which rarely stops (the worst case), and on that model trained
   on over the eval rows until its completions end at lengths spread like the references' (the headline).
c. CPU FLOP/s of a GPT-2-124M-shape training step against the fp32 matmul peak measured in the same run.

Not part of the test suite. See benchmarks/README.md for what each number means and the last measured figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"

# What each mode runs. `quick` takes about 15 minutes on an idle 2-core machine with TRL installed; `full` is
# the same with more data and the 6-layer preset; `smoke` only checks that every path runs (about two minutes).
SETTINGS = {
    "smoke": {
        "preset": "tiny",
        "max_seq_len": 256,
        "train_examples": {"scitldr": 24, "multi30k": 32, "qa": 32},
        "batch_size": 8,
        "train_repeats": 1,
        "learning_rate": 1e-3,
        "eval_model_epochs": {"scitldr": 2, "multi30k": 2, "qa": 2},
        "eval_prompts": {"scitldr": 16, "multi30k": 16, "qa": 16},
        "eval_batch_size": 8,
        "eval_repeats": 1,
        "flops": {"batch": 1, "seq_len": 64, "steps": 1, "levers": True},
    },
    "quick": {
        "preset": "tiny",
        "max_seq_len": 512,
        "train_examples": {"scitldr": 96, "multi30k": 256, "qa": 256},
        "batch_size": 16,
        "train_repeats": 2,
        "learning_rate": 2e-3,
        "eval_model_epochs": {"scitldr": 40, "multi30k": 20, "qa": 20},
        "eval_prompts": {"scitldr": 128, "multi30k": 256, "qa": 256},
        "eval_batch_size": 16,
        "eval_repeats": 3,
        "flops": {"batch": 4, "seq_len": 256, "steps": 5, "levers": True},
    },
    "full": {
        "preset": "small",
        "max_seq_len": 512,
        "train_examples": {"scitldr": 512, "multi30k": 1014 - 200, "qa": 2000},
        "batch_size": 16,
        "train_repeats": 2,
        "learning_rate": 5e-4,
        "eval_model_epochs": {"scitldr": 40, "multi30k": 20, "qa": 20},
        "eval_prompts": {"scitldr": 100, "multi30k": 200, "qa": 500},
        "eval_batch_size": 16,
        "eval_repeats": 3,
        "flops": {"batch": 4, "seq_len": 256, "steps": 5, "levers": True},
    },
}

LAST_STEPS = 5  # the final training loss is the mean of the last LAST_STEPS optimizer steps' losses


# --------------------------------------------------------------------------------------------- data


@dataclass
class Bench:
    """One dataset: raw rows for training and for evaluation prompts, and the recipe overrides that read them."""

    name: str
    task: str
    overrides: list[str]
    train_rows: list[dict]
    eval_rows: list[dict]


def load_benches(settings: dict) -> list[Bench]:
    """The real datasets under ../shared/data (skipped with a message when absent) and synthetic QA."""
    from hftoolkit import synthetic
    from hftoolkit.rundir import read_jsonl

    n_train, n_eval = settings["train_examples"], settings["eval_prompts"]
    benches = []
    scitldr = DATA / "summarization" / "scitldr_a_dev.jsonl"
    if scitldr.is_file():
        rows = read_jsonl(scitldr)
        n = min(n_train["scitldr"], len(rows) - n_eval["scitldr"])
        benches.append(
            Bench(
                "scitldr",
                "summarization",
                [
                    f"data.train_file={scitldr.resolve()}",
                    "data.text_column=source",
                    "data.summary_column=target",
                ],
                rows[:n],
                rows[n : n + n_eval["scitldr"]],
            )
        )
    else:
        print(f"skipping scitldr: {scitldr} not found")
    multi30k = DATA / "translation" / "multi30k_val.jsonl"
    if multi30k.is_file():
        rows = read_jsonl(multi30k)
        n = min(n_train["multi30k"], len(rows) - n_eval["multi30k"])
        benches.append(
            Bench(
                "multi30k",
                "translation",
                [f"data.train_file={multi30k.resolve()}", "data.source_lang=en", "data.target_lang=de"],
                rows[:n],
                rows[n : n + n_eval["multi30k"]],
            )
        )
    else:
        print(f"skipping multi30k: {multi30k} not found")
    train = synthetic.make_examples("qa", n_train["qa"], seed=0)
    evals = synthetic.make_validation_examples("qa", n_eval["qa"], seed=0, exclude=train)
    benches.append(Bench("qa", "qa", [f"data.synthetic={{num_train: {len(train)}}}"], train, evals))
    return benches


def make_recipe(bench: Bench, settings: dict, output_dir: str):
    """A real hftoolkit recipe (validated as `hftoolkit train` would) for this dataset and mode."""
    from hftoolkit.config import load_recipe

    return load_recipe(
        None,
        [
            f"task={bench.task}",
            "seed=42",
            f"output_dir={output_dir}",
            f"model.init={{preset: {settings['preset']}, tokenizer: gpt2}}",
            "model.dropout=0.0",
            *bench.overrides,
            f"data.max_seq_len={settings['max_seq_len']}",
            "data.packing=true",
            f"train.learning_rate={settings['learning_rate']}",
            f"train.per_device_train_batch_size={settings['batch_size']}",
            "train.gradient_accumulation_steps=1",
            "train.num_train_epochs=1",
            "train.lr_scheduler_type=linear",
            "train.warmup_ratio=0.0",
            "train.weight_decay=0.0",
            "train.max_grad_norm=1.0",
            f"eval.per_device_eval_batch_size={settings['eval_batch_size']}",
        ],
    )


def new_model(recipe, task):
    """The model as a run loads it (hftoolkit.run.load_model): the same initial weights every call (create_model
    seeds torch itself), dropout 0."""
    from hftoolkit.run import load_model

    return load_model(recipe, task, {})[0]  # {}: no splits needed (the GPT-2 BPE is not trained)


class Prepared(NamedTuple):
    """One dataset set up as a run sets it up; shared by both training sides, the diagnostics and the eval."""

    recipe: Any
    task: Any
    tokenizer: Any
    train_ds: Any  # tokenized training examples (packing on)
    stats: Any


def tokenize_bench(bench: Bench, settings: dict, tokenizer, workdir: Path) -> Prepared:
    from datasets import Dataset

    from hftoolkit.data import tokenize_split
    from hftoolkit.run import resolve_recipe

    recipe = make_recipe(bench, settings, str(workdir / f"{bench.name}-ours"))
    task, data = resolve_recipe(recipe), recipe.data
    rows = Dataset.from_list(bench.train_rows)
    train_ds, stats = tokenize_split(task, tokenizer, rows, data, data.max_seq_len, data.packing)
    return Prepared(recipe, task, tokenizer, train_ds, stats)


# --------------------------------------------------------------------------------------------- a. training


def padded_tokens(lengths: list[int], batch_size: int) -> int:
    """Tokens a right-padding collator computes on: each batch padded to its longest example."""
    return sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size])
        for i in range(0, len(lengths), batch_size)
    )


def train_hftoolkit(recipe, model, train_ds, tokenizer, epoch: int = 0) -> dict:
    """One epoch of hftoolkit's training step, set up and called through the library as hftoolkit.train.train
    does (minus logging, eval and checkpoints): the Accelerator, the model prepared as prepare_run prepares it
    (packing probe, speed_up), the packed train loader, the optimizer and schedule, then epoch_windows →
    optimizer_step. The Trainer side gets the stock model."""
    from accelerate.utils import set_seed

    from hftoolkit.checkpoint import Progress
    from hftoolkit.data import build_train_loader, steps_per_epoch
    from hftoolkit.run import make_accelerator, prepare_model
    from hftoolkit.train import build_optimizer, build_scheduler, epoch_windows, optimizer_step

    cfg, data = recipe.train, recipe.data
    acc = make_accelerator(recipe)  # its own accelerate state: an earlier TRL run's bf16 does not carry over
    assert acc.mixed_precision == "no", acc.mixed_precision  # every side trains in fp32
    model, packing, targets_only = prepare_model(model, recipe, acc)
    assert packing, "the packing probe turned packing off: the comparison below assumes packed batches"
    batch = cfg.per_device_train_batch_size
    loader = build_train_loader(
        train_ds, batch, recipe.seed, packing, tokenizer.pad_token_id, data.max_seq_len, acc.num_processes
    )
    total_steps = steps_per_epoch(len(train_ds), batch, acc.num_processes, cfg.gradient_accumulation_steps)
    optimizer = build_optimizer(model, cfg, acc.device)
    scheduler = build_scheduler(optimizer, cfg, total_steps, acc.num_processes)
    model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
    set_seed(recipe.seed)
    model.train()
    losses, computed, real = [], 0, 0
    clock = Clock()
    for window in epoch_windows(loader, Progress(epoch=epoch), cfg.gradient_accumulation_steps):
        loss, _ = optimizer_step(acc, model, window, optimizer, scheduler, cfg.max_grad_norm, targets_only)
        losses.append(loss)
        computed += sum(b["input_ids"].numel() for b in window)
        real += sum(int(b["num_tokens"]) for b in window)
        clock.step_done()
    return clock.result() | {
        "steps": len(losses),
        "losses": torch.stack(losses).tolist(),
        "computed_tokens": computed,
        "real_tokens": real,
        "model": acc.unwrap_model(model),
    }


class Clock:
    """Wall and process-CPU time from the end of the first optimizer step to the end of the last one.

    The first step is left out on both sides: it pays one-off costs (allocator growth, optimizer state) that a
    few-dozen-step run would otherwise over-weight. CPU time is reported too: on a shared machine it moves less
    with other people's load than wall time does.
    """

    def __init__(self):
        self.marks = [time.perf_counter()]
        self.cpu_start = self.cpu_end = None

    def step_done(self):
        self.marks.append(time.perf_counter())
        if len(self.marks) == 2:
            self.cpu_start = time.process_time()
        self.cpu_end = time.process_time()

    def result(self) -> dict:
        return {
            "seconds": self.marks[-1] - self.marks[1],
            "cpu_seconds": self.cpu_end - self.cpu_start,
            "seconds_with_first_step": self.marks[-1] - self.marks[0],
            # Per-step durations (data loading + collation + step), steps 2..N.
            "step_seconds": [b - a for a, b in zip(self.marks[1:-1], self.marks[2:], strict=True)],
        }


def step_recorder():
    """A TrainerCallback that keeps per-step losses and the same clock as our side (the setup before step 1 is
    left out too). Used by the Trainer and the TRL side alike."""
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def __init__(self):
            self.losses, self.clock = [], None

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.clock = Clock()

        def on_step_end(self, args, state, control, **kwargs):
            self.clock.step_done()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Record()


def trainer_arguments(recipe, output_dir: str) -> dict:
    """The TrainingArguments both baselines share: our batch, optimizer settings, schedule and clipping."""
    cfg = recipe.train
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=0,
        max_grad_norm=cfg.max_grad_norm,
        # Our sampler's order, fed in sequence: both sides see the same batches, so their losses compare step by
        # step. Trainer's default RandomSampler only changes which examples share a batch, not the padding rate.
        train_sampling_strategy="sequential",
        logging_strategy="steps",
        logging_steps=1,  # a per-step loss for the final-loss comparison; one .item() per step on CPU
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=recipe.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def baseline_result(
    trainer, record, train_ds, order: list[int], batch: int, computed: int | None = None
) -> dict:
    from transformers.trainer_callback import PrinterCallback

    assert trainer.accelerator.mixed_precision == "no", trainer.accelerator.mixed_precision  # fp32, as ours
    trainer.remove_callback(PrinterCallback)  # no per-step log lines on stdout
    trainer.train()
    lengths = [len(train_ds[i]["input_ids"]) for i in order]
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    return record.clock.result() | {
        "steps": trainer.state.global_step,
        "losses": record.losses,
        "computed_tokens": computed if computed is not None else padded_tokens(lengths, batch),
        "real_tokens": sum(lengths),
        "optimizer": type(opt).__name__ + f"(fused={trainer.args.optim == 'adamw_torch_fused'})",
    }


def train_hf_trainer(recipe, model, train_ds, tokenizer, order: list[int], output_dir: str) -> dict:
    """transformers.Trainer as a user sets it up for prompt-masked causal LM: DataCollatorForSeq2Seq pads
    input_ids with the pad token and labels with -100, per batch, to the batch's longest example."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    record = step_recorder()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**trainer_arguments(recipe, output_dir)),
        train_dataset=train_ds.select(order),
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        processing_class=tokenizer,
        callbacks=[record],
    )
    return baseline_result(trainer, record, train_ds, order, recipe.train.per_device_train_batch_size)


def trl_version() -> str | None:
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def prompt_completion_dataset(train_ds, order: list[int]):
    """Our tokenized examples as TRL's pre-tokenized prompt-completion data: input_ids plus completion_mask (1 on
    the completion: where our labels are targets), in our sampler's order. TRL turns the mask into labels itself
    (completion_only_loss), so both sides train on the same tokens and targets."""
    from datasets import Dataset

    rows = train_ds.select(order)
    return Dataset.from_dict(
        {
            "input_ids": rows["input_ids"],
            "completion_mask": [[int(t != -100) for t in labels] for labels in rows["labels"]],
        }
    )


def train_trl(
    recipe, model, train_ds, tokenizer, order: list[int], output_dir: str, padding_free=False
) -> dict:
    """TRL's SFTTrainer as its docs set up prompt-completion SFT: completion_only_loss, no packing (it would
    change the examples per step, see trl_packing_check). Without padding_free each batch is right-padded to its
    longest example; with it, the batch's examples are laid end to end in one row with restarting position ids
    (documented for FlashAttention; trl_packing_check shows it keeps GPT-2's examples apart with SDPA too). Its
    default fused LM head scores target positions only, like ours."""
    from trl import SFTConfig, SFTTrainer

    record = step_recorder()
    args = SFTConfig(
        **trainer_arguments(recipe, output_dir),
        completion_only_loss=True,
        # Our examples are already cut to max_seq_len; TRL refuses a max_length it would not enforce (padding-free).
        max_length=None if padding_free else recipe.data.max_seq_len,
        packing=False,
        padding_free=padding_free,
        # SFTConfig defaults to bf16=True (bf16 autocast, on CPU too); every side here trains in fp32.
        bf16=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=prompt_completion_dataset(train_ds, order),
        processing_class=tokenizer,
        callbacks=[record],
    )
    lengths = [len(train_ds[i]["input_ids"]) for i in order]
    computed = sum(lengths) if padding_free else None  # one row per batch, no padding
    return baseline_result(
        trainer, record, train_ds, order, recipe.train.per_device_train_batch_size, computed
    )


def train_trl_padding_free(recipe, model, train_ds, tokenizer, order: list[int], output_dir: str) -> dict:
    return train_trl(recipe, model, train_ds, tokenizer, order, output_dir, padding_free=True)


def trl_packing_check(prepared: Prepared) -> dict:
    """What TRL's packing / padding-free options do to GPT-2 with SDPA, by the logits check of
    hftoolkit.speedups.packing_keeps_examples_apart: two real examples go through TRL's own packing
    (trl.pack_dataset) and collator, and the second example's logits in the packed row are compared with the
    same example run alone. False means packed examples attend to each other: that option trains on a different
    model input and is left out of the comparison."""
    from datasets import Dataset
    from trl import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    recipe, task, tokenizer, train_ds, _ = prepared
    model = new_model(recipe, task).eval()
    first, second = train_ds[0]["input_ids"], train_ds[1]["input_ids"]
    pad = tokenizer.pad_token_id
    examples = Dataset.from_dict({"input_ids": [first, second]})
    options = {
        # Each: (packed rows, whether the collator flattens them with restarting position ids)
        "padding_free": (examples, True),
        "packing_bfd": (pack_dataset(examples, len(first) + len(second), "bfd"), True),
        "packing_wrapped": (pack_dataset(examples, len(first) + len(second), "wrapped"), False),
    }
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([second])).logits[0].float()
        out = {}
        for name, (rows, padding_free) in options.items():
            batch = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=padding_free)(list(rows))
            batch.pop("labels")
            # use_cache=False as SFTTrainer.compute_loss passes it: without it GPT-2 ignores the restarting
            # position ids and every option would fail the check.
            logits = model(**batch, use_cache=False).logits.reshape(-1, alone.shape[-1]).float()
            flat = batch["input_ids"].reshape(-1).tolist()
            start = next(k for k in range(len(flat)) if flat[k : k + len(second)] == second)
            packed = logits[start : start + len(second)]
            out[name] = bool(
                torch.allclose(packed, alone, rtol=1e-3, atol=1e-4 * max(1.0, alone.abs().max().item()))
            )
    print(f"[trl packing check] examples kept apart (GPT-2, SDPA): {json.dumps(out)}", flush=True)
    return {"examples_kept_apart": out, "lengths": [len(first), len(second)]}


def summarize_side(result: dict, n_timed: int) -> dict:
    """n_timed: examples in steps 2..N (the timed ones; both sides see the same batches)."""
    last = result["losses"][-LAST_STEPS:]
    return {
        "examples_per_s": n_timed / result["seconds"],
        "examples_per_cpu_s": n_timed / result["cpu_seconds"],
        "seconds": result["seconds"],
        "cpu_seconds": result["cpu_seconds"],
        "seconds_with_first_step": result["seconds_with_first_step"],
        "steps": result["steps"],
        "real_tokens": result["real_tokens"],
        "computed_tokens": result["computed_tokens"],
        "padding_fraction": 1 - result["real_tokens"] / result["computed_tokens"],
        "final_loss": statistics.fmean(last),
        "first_loss": result["losses"][0],
    }


def combine_runs(runs: list[dict]) -> dict:
    """Repeated runs of one side (identical work): the per-step minimum across runs, so a burst of someone else's
    load during one run does not count; raw per-run totals are kept alongside."""
    steps = [min(column) for column in zip(*(r["step_seconds"] for r in runs), strict=True)]
    return runs[-1] | {
        "seconds": sum(steps),
        "step_seconds": steps,
        "cpu_seconds": min(r["cpu_seconds"] for r in runs),
        "run_seconds": [r["seconds"] for r in runs],
    }


def bench_training(bench: Bench, prepared: Prepared, settings: dict, workdir: Path, shift: int):
    """(a) for one dataset → (figures, the model hftoolkit's last run trained)."""
    from hftoolkit.data import build_train_loader

    recipe, task, tokenizer, train_ds, stats = prepared
    lengths = [len(ids) for ids in train_ds["input_ids"]]
    batch = recipe.train.per_device_train_batch_size
    # The order hftoolkit's sampler draws for epoch 0 (packing: plain seeded shuffle); Trainer gets the same.
    pad, row_len = tokenizer.pad_token_id, recipe.data.max_seq_len
    order = list(build_train_loader(train_ds, batch, recipe.seed, True, pad, row_len).sampler)

    baselines = {"hf_trainer": train_hf_trainer}
    if trl_version():
        baselines |= {"trl": train_trl, "trl_padding_free": train_trl_padding_free}

    def run(side: str) -> dict:
        model = new_model(recipe, task)
        if side in baselines:
            return baselines[side](
                recipe, model, train_ds, tokenizer, order, str(workdir / f"{bench.name}-{side}")
            )
        return train_hftoolkit(recipe, model, train_ds, tokenizer)

    # A B C C B A (or rotated): every side sees the same drift in the machine's load; which goes first rotates
    # across datasets.
    sides = ["hftoolkit", *baselines]
    sides = sides[shift % len(sides) :] + sides[: shift % len(sides)]
    sequence = [
        side for r in range(settings["train_repeats"]) for side in (sides if r % 2 == 0 else sides[::-1])
    ]
    runs: dict[str, list[dict]] = {}
    for side in sequence:
        runs.setdefault(side, []).append(run(side))
    results = {side: combine_runs(rs) for side, rs in runs.items()}
    ours = results["hftoolkit"]
    n = len(train_ds)
    n_timed = n - min(batch, n)  # the first batch is full (drop_last=False only shortens the last one)
    a = summarize_side(ours, n_timed)
    out = {
        "task": bench.task,
        "examples": n,
        "batch_size": batch,
        "optimizer_steps": ours["steps"],
        "example_tokens": {"mean": statistics.fmean(lengths), "min": min(lengths), "max": max(lengths)},
        "truncated_sources": stats.source_truncated,
        "hftoolkit": a | {"run_seconds": ours["run_seconds"]},
    }
    line = (
        f"[train {bench.name}] hftoolkit {a['examples_per_s']:.2f} ex/s (padding {a['padding_fraction']:.1%})"
    )
    for side in baselines:
        other = results[side]
        b = summarize_side(other, n_timed)
        per_step_rel = [abs(x - y) / y for x, y in zip(ours["losses"], other["losses"], strict=True)]
        suffix = "" if side == "hf_trainer" else f"_vs_{side}"  # the Trainer keys keep their names
        out[side] = b | {"run_seconds": other["run_seconds"], "optimizer": other["optimizer"]}
        out |= {
            f"speedup{suffix}": a["examples_per_s"] / b["examples_per_s"],
            f"speedup_cpu_time{suffix}": a["examples_per_cpu_s"] / b["examples_per_cpu_s"],
            # Both sides run the same batches in the same order: step i is the same work on each side but for
            # padding.
            f"speedup_median_step_ratio{suffix}": statistics.median(
                h / o for o, h in zip(ours["step_seconds"], other["step_seconds"], strict=True)
            ),
            f"final_loss_ratio{suffix}": a["final_loss"] / b["final_loss"],
            f"per_step_loss_max_rel_diff{suffix}": max(per_step_rel),
        }
        line += (
            f" | {side} {b['examples_per_s']:.2f} ex/s (padding {b['padding_fraction']:.1%}): speedup "
            f"{out[f'speedup{suffix}']:.2f}x (CPU time {out[f'speedup_cpu_time{suffix}']:.2f}x), final loss "
            f"{a['final_loss']:.4f} vs {b['final_loss']:.4f} (max per-step diff "
            f"{out[f'per_step_loss_max_rel_diff{suffix}']:.2%})"
        )
    trl_sides = [side for side in baselines if side.startswith("trl")]
    if trl_sides:  # the headline compares with TRL's fastest setting that keeps examples apart
        fastest = min(trl_sides, key=lambda side: out[f"speedup_vs_{side}"])
        out["trl_fastest_setting"] = fastest
        out["speedup_vs_trl_fastest"] = out[f"speedup_vs_{fastest}"]
        out["final_loss_ratio_vs_trl_fastest"] = out[f"final_loss_ratio_vs_{fastest}"]
    print(line, flush=True)
    return out, ours["model"]


# --------------------------------------------------------------------------------------------- diagnostics


def alternate_best(fns: dict, reps: int = 5) -> dict:
    """Best time of each function, the functions called in turn (A B C A B C ...) so load drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def diagnose_training(prepared: Prepared) -> dict:
    """Where a step's time goes, each piece timed alone on one real packed batch, variants in alternation: the LM
    head + loss at every position (token_losses without the targets-only forward; HF's ForCausalLMLoss) and at
    target positions only (what hftoolkit's forward does), and the transformer body with the block-causal mask that
    packing needs vs a plain causal one."""

    from transformers.loss.loss_utils import ForCausalLMLoss

    from hftoolkit.data import pack_collate

    recipe, task, tokenizer, train_ds, _ = prepared
    model = new_model(recipe, task)
    model.train()
    feats = [train_ds[i] for i in range(min(recipe.train.per_device_train_batch_size, len(train_ds)))]
    batch = pack_collate(feats, tokenizer.pad_token_id, recipe.data.max_seq_len)
    labels = batch["labels"]
    targets = labels[:, 1:] != -100
    out: dict = {
        "batch_shape": list(batch["input_ids"].shape),
        "target_position_fraction": float(targets.sum() / labels.numel()),
    }

    with torch.no_grad():
        hidden = model.base_model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).last_hidden_state
    hidden.requires_grad_()
    lm_head = model.get_output_embeddings()
    n_targets = targets.sum()

    def all_positions():  # token_losses' path for models without the targets-only forward
        logits = lm_head(hidden)
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)).float(), shifted.reshape(-1), ignore_index=-100, reduction="sum"
        ).div(n_targets).backward()

    def hf_loss():
        ForCausalLMLoss(
            lm_head(hidden), labels, lm_head.out_features, num_items_in_batch=n_targets
        ).backward()

    def targets_only():
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        mask = shifted != -100
        torch.nn.functional.cross_entropy(lm_head(hidden[mask]), shifted[mask], reduction="sum").div(
            n_targets
        ).backward()

    out["lm_head_and_loss_fwd_bwd_s"] = alternate_best(
        {
            "all_positions_token_losses": all_positions,
            "all_positions_hf_ForCausalLMLoss": hf_loss,
            "targets_only_hftoolkit": targets_only,
        }
    )
    model.zero_grad(set_to_none=True)

    def body(position_ids):
        h = model.base_model(input_ids=batch["input_ids"], position_ids=position_ids, use_cache=False)
        h.last_hidden_state.sum().backward()
        model.zero_grad(set_to_none=True)

    out["transformer_body_fwd_bwd_s"] = alternate_best(
        {
            "block_causal_from_position_ids": lambda: body(batch["position_ids"]),
            "plain_causal": lambda: body(None),
        }
    )
    print(f"[train diagnostics] {json.dumps(out)}", flush=True)
    return out


def bench_eval_both_models(bench: Bench, prepared: Prepared, trained, settings: dict, ours_first: bool):
    """(b) twice: on the model after one epoch (it rarely ends its completions: every batch runs max_new_tokens
    steps on both sides, the worst case for hftoolkit), then on a model that stops at varied lengths, as a
    fine-tuned one does (`fine_tuned_like`). `trained`: the model (a) trained for one epoch; None when (a) was
    skipped, and then that epoch runs here from the initial weights. Returns (worst case, stopping model)."""
    recipe, task, tokenizer, train_ds, _ = prepared
    model = trained
    if model is None:
        model = train_hftoolkit(recipe, new_model(recipe, task), train_ds, tokenizer)["model"]
    size, repeats = settings["eval_batch_size"], settings["eval_repeats"]
    worst = bench_eval(bench, prepared, model, size, repeats, ours_first)
    worst["model"] = (
        f"{settings['preset']} preset trained 1 epoch on the {len(train_ds)} packed training rows"
    )
    epochs = settings["eval_model_epochs"][bench.name]
    model = fine_tuned_like(bench, prepared, model, epochs)
    stopping = bench_eval(bench, prepared, model, size, repeats, ours_first)
    stopping["model"] = worst["model"] + f", then {epochs} epochs on the eval rows themselves"
    return worst, stopping


def fine_tuned_like(bench: Bench, prepared: Prepared, model, epochs: int):
    """The one-epoch model trained on (hftoolkit's step, untimed) for `epochs` epochs over the eval rows
    themselves: a model whose completions end by themselves at lengths spread like the references', as a well
    fine-tuned model's do. This benchmark measures decoding speed, not quality: what matters is where and how
    unevenly completions end, and a tiny model trained on a few hundred training rows only learns to stop
    early (it summarised every SciTLDR abstract in about 15 tokens of "the the the"). `bench_eval` reports
    the completion lengths next to the references'."""
    from datasets import Dataset

    from hftoolkit.data import tokenize_split

    recipe, _, tokenizer, _, _ = prepared
    task, data = prepared.task, recipe.data
    rows, _ = tokenize_split(
        task, tokenizer, Dataset.from_list(bench.eval_rows), data, data.max_seq_len, data.packing
    )
    for epoch in range(epochs):
        model = train_hftoolkit(recipe, model, rows, tokenizer, epoch)["model"]
    return model


# --------------------------------------------------------------------------------------------- b. evaluation


def eval_hftoolkit(run) -> dict:
    """hftoolkit's eval as Run.evaluate runs it: generate_predictions over this process's prompts in the order
    and within the token budget build_generation_eval set (scoring left out: both sides would score alike)."""
    from hftoolkit.evaluation import generate_predictions

    loader = run.gen_loaders["full"]
    start = time.perf_counter()
    preds = generate_predictions(
        run.accelerator, run.model, run.tokenizer, run.task, run.gen_set, loader, run.decoding
    )
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "predictions": [p["prediction"] for p in preds],
        "completions": [p["completion"] for p in preds],
        "stopped_fraction": sum(p["stopped"] for p in preds) / len(preds),
    }


def eval_examples_loop(model, tokenizer, task, prompts: list[list[int]], decoding, batch_size: int) -> dict:
    """What the HF example scripts do: dataset order, fixed batches, left padding, model.generate, then decode
    and cut each completion at the stop string."""
    model.eval()
    tokenizer.padding_side = "left"
    preds = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer.pad({"input_ids": prompts[i : i + batch_size]}, padding=True, return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=decoding.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        preds.extend(task.postprocess(t, decoding.stop_strings) for t in texts)
    elapsed = time.perf_counter() - start
    tokenizer.padding_side = "right"
    model.train()
    return {"seconds": elapsed, "predictions": preds}


@contextlib.contextmanager
def count_forwards(model, prompt_tokens: int):
    """What the transformer's forwards computed, the same way for both sides: calls (prefills: more than one input
    column), prefill positions and the share of them that is left padding, rows fed per decode step, and the
    largest KV cache of one forward (rows × attention-mask columns)."""
    seen = {
        "forward_calls": 0,
        "prefill_calls": 0,
        "prefill_positions": 0,
        "decode_rows": 0,
        "max_kv_tokens": 0,
    }

    def hook(module, args, kwargs, output):
        rows, cols = (args[0] if args else kwargs["input_ids"]).shape
        seen["forward_calls"] += 1
        if cols > 1:
            seen["prefill_calls"] += 1
            seen["prefill_positions"] += rows * cols
        else:
            seen["decode_rows"] += rows
        seen["max_kv_tokens"] = max(seen["max_kv_tokens"], rows * kwargs["attention_mask"].shape[1])

    # The transformer, not the model: hftoolkit's greedy decoding calls it and the output embedding itself.
    handle = model.base_model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()
        decodes = seen["forward_calls"] - seen["prefill_calls"]
        seen["prompt_padding_fraction"] = 1 - prompt_tokens / max(seen["prefill_positions"], 1)
        seen["mean_rows_per_decode_step"] = seen["decode_rows"] / max(decodes, 1)


def length_quartiles(tokenizer, texts: list[str]) -> list[int]:
    """Token lengths of texts: min, 25th, 50th, 75th percentile, max."""
    lengths = sorted(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return [lengths[min(len(lengths) - 1, int(q * len(lengths)))] for q in (0, 0.25, 0.5, 0.75, 1)]


def generation_run(bench: Bench, prepared: Prepared, model):
    """The generation setup of a run, as prepare_run builds it: decoding (max_new_tokens from the references, the
    task's stop strings), the prompts (truncated to fit), and their token-budget batches."""
    from datasets import Dataset

    from hftoolkit.modeling import context_length
    from hftoolkit.run import Run, build_generation_eval, make_accelerator

    recipe, task, tokenizer, _, _ = prepared
    # The trained model carries hftoolkit's targets-only forward, which only training calls (generate goes through
    # the class forward). Both sides get the stock forward here.
    model.__dict__.pop("forward", None)
    gen = Run(recipe, make_accelerator(recipe), task, model, tokenizer, context=context_length(model))
    assert gen.accelerator.mixed_precision == "no", gen.accelerator.mixed_precision
    build_generation_eval(gen, Dataset.from_list(bench.eval_rows))
    return gen


def bench_eval(
    bench: Bench, prepared: Prepared, model, batch_size: int, repeats: int, ours_first: bool
) -> dict:
    recipe, task, tokenizer, _, _ = prepared
    gen = generation_run(bench, prepared, model)
    gen_set, decoding = gen.gen_set, gen.decoding
    assert decoding.num_beams == 1 and not decoding.do_sample, "the examples loop decodes greedily"
    max_new = decoding.max_new_tokens

    def run(side: str) -> dict:
        with count_forwards(model, sum(map(len, gen_set.prompts))) as seen:
            if side == "hftoolkit":
                result = eval_hftoolkit(gen)
            else:
                result = eval_examples_loop(model, tokenizer, task, gen_set.prompts, decoding, batch_size)
        return result | {"forwards": seen}

    # A B B A (or B A A B): each side's best time, with both sides exposed to the same drift in machine load.
    first, second = ("hftoolkit", "examples_loop") if ours_first else ("examples_loop", "hftoolkit")
    sides = ([first, second, second, first] * repeats)[: 2 * repeats]
    runs: dict[str, list[dict]] = {"hftoolkit": [], "examples_loop": []}
    for side in sides:
        runs[side].append(run(side))
    ours = min(runs["hftoolkit"], key=lambda r: r["seconds"])
    loop = min(runs["examples_loop"], key=lambda r: r["seconds"])
    differing = [
        i for i, (a, b) in enumerate(zip(ours["predictions"], loop["predictions"], strict=True)) if a != b
    ]
    n = len(gen_set.prompts)
    out = {
        "prompts": n,
        "batch_size": batch_size,
        "max_new_tokens": max_new,
        "stop_strings": list(decoding.stop_strings),
        "prompt_tokens": {
            "mean": statistics.fmean(len(p) for p in gen_set.prompts),
            "max": max(map(len, gen_set.prompts)),
        },
        "hftoolkit": {
            "prompts_per_s": n / ours["seconds"],
            "seconds": ours["seconds"],
            "seconds_all_runs": [r["seconds"] for r in runs["hftoolkit"]],
            "stopped_fraction": ours["stopped_fraction"],
            **ours["forwards"],
        },
        "examples_loop": {
            "prompts_per_s": n / loop["seconds"],
            "seconds": loop["seconds"],
            "seconds_all_runs": [r["seconds"] for r in runs["examples_loop"]],
            **loop["forwards"],
        },
        "completion_tokens_quartiles": length_quartiles(tokenizer, ours["completions"]),
        "reference_tokens_quartiles": length_quartiles(tokenizer, [" " + r[0] for r in gen_set.references]),
        "speedup": loop["seconds"] / ours["seconds"],
        "predictions_identical": not differing,
        "differing_predictions": len(differing),
        "empty_predictions": sum(1 for p in ours["predictions"] if not p),
        "example_prediction": ours["predictions"][0][:200],
    }
    if differing:
        i = differing[0]
        out["first_difference"] = {
            "index": i,
            "hftoolkit": ours["predictions"][i],
            "loop": loop["predictions"][i],
        }
    print(
        f"[eval {bench.name}] hftoolkit {ours['seconds']:.2f}s ({ours['forwards']['forward_calls']} forwards, "
        f"{ours['forwards']['mean_rows_per_decode_step']:.1f} rows per decode step) | examples loop "
        f"{loop['seconds']:.2f}s ({loop['forwards']['forward_calls']} forwards, "
        f"{loop['forwards']['mean_rows_per_decode_step']:.1f} rows) | speedup {out['speedup']:.2f}x | identical "
        f"{out['predictions_identical']} ({len(differing)} differ) | stopped {ours['stopped_fraction']:.0%} | "
        f"completion tokens {out['completion_tokens_quartiles']} (references "
        f"{out['reference_tokens_quartiles']}) | max_new_tokens {max_new}",
        flush=True,
    )
    return out


# --------------------------------------------------------------------------------------------- c. CPU FLOP/s


def matmul_peak(dtype=torch.float32, n: int = 2048, reps: int = 5, inner: int = 4) -> float:
    """Best-of-`reps` FLOP/s of an n×n×n matmul loop (the attainable peak of this machine and torch build)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=c)  # warm-up
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * inner / best


def shape_rate(m: int, k: int, n: int, reps: int = 3) -> float:
    """FLOP/s of one (m×k)@(k×n) fp32 matmul, best of `reps`: what the model's own shapes can reach."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


OP_GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkldnn"),
    "attention": ("aten::_scaled_dot_product", "aten::_flash_attention"),
    "softmax_cross_entropy": ("aten::_log_softmax", "aten::nll_loss", "aten::_softmax"),
    "copies": ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::fill_", "aten::zero_"),
    "embedding": ("aten::embedding",),
}


def adamw_copy(optimizer, fused: bool | None):
    """The same AdamW parameter groups and hyper-parameters; fused=None is torch's default implementation."""
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    d = optimizer.defaults
    return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], fused=fused)


def step_throughput(
    gpt2: tuple,
    batch: int,
    seq_len: int,
    steps: int,
    bf16: bool = False,
    profile: bool = False,
    compare_adamw: bool = False,
) -> dict:
    """tokens/s of hftoolkit's training step on random GPT-2 token ids: the calls of hftoolkit.train.optimizer_step
    (backward_window, clip, build_optimizer's AdamW, build_scheduler's schedule), each timed on its own, under
    make_accelerator's Accelerator. `gpt2`: (recipe, model, tokenizer, targets_only). With `profile`, one more
    untimed forward+backward under torch.profiler says where the time goes."""
    from hftoolkit.run import make_accelerator
    from hftoolkit.speedups import target_positions
    from hftoolkit.train import backward_window, build_optimizer, build_scheduler

    recipe, model, tokenizer, targets_only = gpt2
    cfg = recipe.train
    acc = make_accelerator(recipe)
    assert acc.mixed_precision == "no", (
        acc.mixed_precision
    )  # fp32 (the bf16 lever uses torch.autocast itself)
    optimizer = build_optimizer(model, cfg, acc.device)
    scheduler = build_scheduler(optimizer, cfg, steps + 1, acc.num_processes)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (batch, seq_len), generator=gen)
    data = {"input_ids": ids, "labels": ids.clone()}  # every token a target: a pre-training-style step
    data["target_positions"] = target_positions(data["labels"])  # as the collators hand them over

    def forward_backward():
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            backward_window(acc, model, [data], targets_only)

    def step() -> dict:  # optimizer_step, timed call by call
        t0 = time.perf_counter()
        forward_backward()
        t1 = time.perf_counter()
        acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        t2 = time.perf_counter()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return {"forward_backward_s": t1 - t0, "clip_s": t2 - t1, "optimizer_s": t3 - t2, "step_s": t3 - t0}

    step()  # warm-up: allocator growth, optimizer state
    times = [step() for _ in range(steps)]
    adamw_times: dict[str, list[float]] = {}
    if compare_adamw:
        # hftoolkit's AdamW (fused on CPU) against torch's default implementation, same gradients, in alternation.
        other = adamw_copy(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, fused=None)
        forward_backward()
        other.step()  # allocate its state
        for name, opt in (("hftoolkit", optimizer), ("torch_default", other)) * 3:
            start = time.perf_counter()
            opt.step()
            adamw_times.setdefault(name, []).append(time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)
        del other
    best = min(times, key=lambda t: t["step_s"])  # the step least disturbed by other load on a shared machine
    out = {
        "batch": batch,
        "seq_len": seq_len,
        **best,
        "step_s_all": [t["step_s"] for t in times],
        "tokens_per_s": batch * seq_len / best["step_s"],
    }
    if adamw_times:
        out["adamw_step_s"] = {name: min(t) for name, t in adamw_times.items()}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            forward_backward()
        model.zero_grad(set_to_none=True)
        rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
        total = sum(t for _, t in rows)
        shares = {name: 0.0 for name in OP_GROUPS}
        for key, t in rows:
            group = next((g for g, prefixes in OP_GROUPS.items() if key.startswith(prefixes)), "other")
            shares[group] = shares.get(group, 0.0) + t / total
        out["profile"] = {
            "self_time_share": {k: round(v, 3) for k, v in shares.items()},
            "top_ops_ms": {k: round(t / 1000, 1) for k, t in sorted(rows, key=lambda r: -r[1])[:10]},
        }
    return out


def bench_flops(settings: dict, workdir: Path) -> dict:
    from hftoolkit.config import load_recipe
    from hftoolkit.flops import flops_per_token
    from hftoolkit.run import (
        load_model,
        make_accelerator,
        prepare_model,
        resolve_recipe,
    )

    f = settings["flops"]
    batch, seq_len = f["batch"], f["seq_len"]
    cores = os.cpu_count() or 1
    default_threads = torch.get_num_threads()
    recipe = load_recipe(
        None,
        [
            "task=generation",
            "seed=0",
            f"output_dir={workdir / 'flops'}",
            "model.init={preset: gpt2, tokenizer: gpt2}",
            "model.dropout=0.0",
            "data.synthetic={num_train: 8}",  # not read: the step runs on random token ids
            "train.learning_rate=1e-5",
        ],
    )
    task = resolve_recipe(recipe)

    def gpt2() -> tuple:
        """A fresh model, loaded and prepared as a run does it (load_model, then prepare_model: speed_up)."""
        model, tokenizer = load_model(recipe, task, {})
        model, _, targets_only = prepare_model(model, recipe, make_accelerator(recipe))
        return recipe, model, tokenizer, targets_only

    peaks = [matmul_peak()]
    setup = gpt2()
    model = setup[1]
    flops_token = flops_per_token(model, seq_len)
    base = step_throughput(setup, batch, seq_len, f["steps"], profile=f["levers"], compare_adamw=f["levers"])
    peaks.append(matmul_peak())  # before and after the steps: the larger one is the (conservative) peak
    peak32 = max(peaks)
    achieved = base["tokens_per_s"] * flops_token
    rows = batch * seq_len
    out = {
        "model": "GPT-2 124M shape (12×768, 50257 vocab), fp32, SDPA, dropout 0, hftoolkit.run.load_model + "
        "prepare_model (speed_up); optimizer_step's calls: backward_window + clip + build_optimizer's AdamW (fused) "
        "+ build_scheduler's schedule",
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_token,
        "fp32_matmul_peak_flops": peak32,
        "fp32_matmul_peak_samples": peaks,
        "fp32_rate_on_model_shapes": {
            f"mlp_{rows}x768x3072": shape_rate(rows, 768, 3072),
            f"lm_head_{rows}x768x50257": shape_rate(rows, 768, 50257, reps=2),
        },
        "default_threads": default_threads,
        "cores": cores,
        "fp32": base | {"achieved_flops": achieved},
        "cpu_mfu_vs_matmul_peak": achieved / peak32,
        # The same FLOPs over the forward+backward time alone (no clipping, no optimizer step).
        "forward_backward_only_vs_matmul_peak": rows * flops_token / base["forward_backward_s"] / peak32,
    }
    print(
        f"[flops] fp32 matmul peak {peak32 / 1e9:.1f} GFLOP/s; B={batch} T={seq_len} fp32 step: "
        f"{base['tokens_per_s']:.1f} tokens/s = {achieved / 1e9:.1f} GFLOP/s = {achieved / peak32:.1%} of peak "
        f"(step {base['step_s']:.1f}s: forward+backward {base['forward_backward_s']:.1f}s, clip {base['clip_s']:.2f}s, "
        f"AdamW {base['optimizer_s']:.2f}s)",
        flush=True,
    )
    if "profile" in base:
        print(f"[flops] profile: {json.dumps(base['profile'])}", flush=True)
    if not f["levers"]:
        return out
    levers: dict = {}
    if default_threads != cores:
        torch.set_num_threads(cores)
        r = step_throughput(setup, batch, seq_len, f["steps"])
        levers["set_num_threads_cores"] = r | {"vs_fp32_peak": r["tokens_per_s"] * flops_token / peak32}
        torch.set_num_threads(default_threads)
    else:
        levers["set_num_threads_cores"] = (
            f"no change: torch already runs {default_threads} threads = {cores} cores"
        )
    if "adamw_step_s" in base:
        # The same step with torch's default AdamW in place of the fused one hftoolkit builds: the timed step's
        # other phases plus the default implementation's time (both timed in alternation on the same gradients).
        step_s = base["step_s"] - base["optimizer_s"] + base["adamw_step_s"]["torch_default"]
        levers["torch_default_adamw_instead_of_fused"] = {
            "note": "already hftoolkit's choice; tokens_per_s is the step with torch's default AdamW instead",
            "tokens_per_s": rows / step_s,
            "step_s": step_s,
            "adamw_step_s": base["adamw_step_s"],
            "vs_fp32_peak": rows / step_s * flops_token / peak32,
        }
    r = step_throughput(setup, batch * 2, seq_len, 2)
    levers["batch_x2"] = r | {"vs_fp32_peak": r["tokens_per_s"] * flops_token / peak32}
    peak16 = matmul_peak(torch.bfloat16, n=1024, reps=3, inner=2)
    if peak16 > 1.1 * peak32:
        r = step_throughput(gpt2(), batch, seq_len, 1, bf16=True)
        levers["bf16_autocast"] = r | {
            "bf16_matmul_peak_flops": peak16,
            "vs_fp32_peak": r["tokens_per_s"] * flops_token / peak32,
            "vs_bf16_peak": r["tokens_per_s"] * flops_token / peak16,
        }
    else:
        levers["bf16_autocast"] = (
            f"not run: bf16 matmul reaches {peak16 / 1e9:.1f} GFLOP/s vs fp32 {peak32 / 1e9:.1f} on this CPU "
            f"({torch.backends.cpu.get_cpu_capability()}, no native bf16 matmul), so autocast cannot help"
        )
    out["levers"] = levers
    for name, r in levers.items():
        text = (
            r
            if isinstance(r, str)
            else f"{r['tokens_per_s']:.1f} tokens/s ({r['vs_fp32_peak']:.1%} of fp32 peak)"
        )
        print(f"[flops] lever {name}: {text}", flush=True)
    return out


# --------------------------------------------------------------------------------------------- main


def geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else float("nan")


def code_version() -> dict:
    """Which hftoolkit was measured: its folder, the repository's commit, and whether hftoolkit/ had uncommitted
    changes (the working tree may be shared with other work; a dirty tree means the figures may not match HEAD)."""
    import subprocess

    import hftoolkit

    package = Path(hftoolkit.__file__).resolve().parent
    out = {"hftoolkit_path": str(package), "commit": os.environ.get("HFTOOLKIT_BENCH_COMMIT")}
    try:
        git = ["git", "-C", str(package.parent)]
        out["commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "hftoolkit"], capture_output=True, text=True, check=True
        ).stdout
        out["hftoolkit_uncommitted_changes"] = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        pass  # not a git checkout (e.g. a `git archive` snapshot): HFTOOLKIT_BENCH_COMMIT names it, if set
    return out


def load_average() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small settings: about 15 min on 2 idle CPU cores with TRL installed",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny settings: check that every path runs")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["train", "eval", "flops"],
        help="parts to skip. `train` skips the training comparison (a) and its diagnostics; the eval (b) still "
        "trains the model it evaluates, untimed, with hftoolkit's step only (no Trainer, no repeats). Skip "
        "train and eval to tokenize and train nothing",
    )
    parser.add_argument(
        "--datasets",
        nargs="*",
        choices=["scitldr", "multi30k", "qa"],
        help="only these datasets (default: all three); the headline means are then over these",
    )
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    settings = SETTINGS[mode]

    import datasets
    import transformers

    from hftoolkit.modeling import gpt2_tokenizer, prepare_tokenizer

    datasets.disable_progress_bars()
    datasets.disable_caching()  # tokenize in memory: no cache files left behind, same work for both sides
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    load_before = load_average()
    # One tokenizer for every dataset, as before: generate_batch caches its stop-token table per tokenizer object.
    tokenizer = prepare_tokenizer(gpt2_tokenizer(), "gpt2")
    report: dict = {
        "mode": mode,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "load_average_before": load_before,
        },
        "settings": settings,
        "code": code_version(),
    }
    report["machine"]["trl"] = trl_version()
    if report["machine"]["trl"] is None and "train" not in args.skip:
        print("skipping the TRL baseline: trl is not installed (pip install -e '.[bench]')", flush=True)
    benches = [b for b in load_benches(settings) if not args.datasets or b.name in args.datasets]
    train_results, eval_results, worst_case = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="hftoolkit-bench-") as tmp:
        for k, bench in enumerate(benches if {"train", "eval"} - set(args.skip) else []):
            prepared = tokenize_bench(bench, settings, tokenizer, Path(tmp))
            model = None
            if "train" not in args.skip:
                train_results[bench.name], model = bench_training(bench, prepared, settings, Path(tmp), k)
                if k == 0:
                    report["train_diagnostics"] = {"dataset": bench.name} | diagnose_training(prepared)
                    if report["machine"]["trl"]:
                        report["trl_packing_check"] = {"dataset": bench.name} | trl_packing_check(prepared)
            if "eval" not in args.skip:
                worst_case[bench.name], eval_results[bench.name] = bench_eval_both_models(
                    bench, prepared, model, settings, k % 2 == 1
                )
    if train_results:
        report["train"] = train_results
        report["train_speedup_vs_hf_trainer"] = geomean([r["speedup"] for r in train_results.values()])
        # The ratio furthest from 1 across datasets: the conservative headline for "within 2 %".
        report["train_final_loss_ratio"] = max(
            (r["final_loss_ratio"] for r in train_results.values()), key=lambda x: abs(math.log(x))
        )
        if all("speedup_vs_trl_fastest" in r for r in train_results.values()):
            results = train_results.values()
            report["train_speedup_vs_trl"] = geomean([r["speedup_vs_trl_fastest"] for r in results])
            report["train_final_loss_ratio_vs_trl"] = max(
                (r[f"final_loss_ratio_vs_{side}"] for r in results for side in ("trl", "trl_padding_free")),
                key=lambda x: abs(math.log(x)),
            )
    if eval_results:
        report["eval"] = eval_results
        report["eval_speedup_vs_examples_loop"] = geomean([r["speedup"] for r in eval_results.values()])
        report["eval_predictions_identical"] = all(
            r["predictions_identical"] for r in [*eval_results.values(), *worst_case.values()]
        )
        report["eval_stopped_fraction"] = statistics.fmean(
            r["hftoolkit"]["stopped_fraction"] for r in eval_results.values()
        )
        report["eval_worst_case"] = worst_case
        report["eval_worst_case_speedup_vs_examples_loop"] = geomean(
            [r["speedup"] for r in worst_case.values()]
        )
        report["eval_worst_case_stopped_fraction"] = statistics.fmean(
            r["hftoolkit"]["stopped_fraction"] for r in worst_case.values()
        )
    if "flops" not in args.skip:
        with tempfile.TemporaryDirectory(prefix="hftoolkit-bench-") as tmp:
            report["cpu_flops"] = bench_flops(settings, Path(tmp))
        report["cpu_mfu_vs_matmul_peak"] = report["cpu_flops"]["cpu_mfu_vs_matmul_peak"]
    report["machine"]["load_average_after"] = load_average()
    report["code_after"] = code_version()  # changed during the run if it differs from "code"
    report["wall_seconds"] = time.perf_counter() - started
    headline = {
        k: report[k]
        for k in (
            "train_speedup_vs_hf_trainer",
            "train_final_loss_ratio",
            "train_speedup_vs_trl",
            "train_final_loss_ratio_vs_trl",
            "eval_speedup_vs_examples_loop",
            "eval_predictions_identical",
            "eval_stopped_fraction",
            "eval_worst_case_speedup_vs_examples_loop",
            "eval_worst_case_stopped_fraction",
            "cpu_mfu_vs_matmul_peak",
            "wall_seconds",
        )
        if k in report
    }
    print(json.dumps(headline, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
