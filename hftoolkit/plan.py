"""`hftoolkit plan`: what a recipe would train on and what it would cost, without training (no GPU needed).

Usage: hftoolkit plan recipes/quickstart/qa.yaml data.max_seq_len=64
"""

from __future__ import annotations

import io
import math
import os
import statistics
from pathlib import Path

from hftoolkit.config import Recipe, field_docs, flatten, to_dict
from hftoolkit.data import example_lengths, steps_per_epoch, tokenize_split
from hftoolkit.errors import UserError
from hftoolkit.run import check_context, load_splits, resolve_recipe, tokenizer_training_texts
from hftoolkit.rundir import read_metrics
from hftoolkit.tasks import get_task

DIM, BOLD, RESET = "\033[2m", "\033[1m", "\033[0m"


def config_diff(recipe: Recipe) -> list[tuple[str, object, object]]:
    """(key, default, value) for every key the recipe sets away from the defaults."""
    now, default = flatten(to_dict(recipe)), flatten(to_dict(Recipe()))
    return [(k, default.get(k), _set_keys(v)) for k, v in now.items() if default.get(k) != v]


def _set_keys(value):
    """A list of mappings (data.sources) with only the keys each entry sets."""
    if isinstance(value, list):
        return [{k: v for k, v in x.items() if v is not None} if isinstance(x, dict) else x for x in value]
    return value


def render_example(tokenizer, example: dict, color: bool) -> str:
    """The training text with the loss-masked part (label -100) dimmed, or wrapped in [[ ]] without colour."""
    out, masked_run = [], None
    for tok, label in zip(example["input_ids"], example["labels"], strict=True):
        masked = label == -100
        if masked != masked_run:
            if masked_run is not None:
                out.append(RESET if color else ("]]" if masked_run else ""))
            out.append((DIM if masked else BOLD) if color else ("[[" if masked else ""))
            masked_run = masked
        out.append(tokenizer.decode([tok]))
    out.append(RESET if color else ("]]" if masked_run else ""))
    return "".join(out).replace("<|endoftext|>", "⟨eos⟩")


def length_summary(lengths: list[int]) -> str:
    if not lengths:
        return "-"
    q = statistics.quantiles(lengths, n=20) if len(lengths) > 1 else [lengths[0]] * 19
    return f"mean {statistics.fmean(lengths):.0f}, median {statistics.median(lengths):.0f}, p95 {q[18]:.0f}, max {max(lengths)}"


def memory_estimate(n_params: int, trainable: int, config, recipe: Recipe) -> dict[str, float]:
    """GiB per device. Weights fp32 (autocast keeps fp32 masters), grads fp32, AdamW m+v fp32; activations per
    Korthikanti et al. 2022 (s·b·h·34 bytes per layer at 16-bit, ×2 for fp32; the s²·a term omitted because SDPA
    does not materialise attention) plus fp32 logits for the loss."""
    gib = 1024**3
    b, s = recipe.train.per_device_train_batch_size, recipe.data.max_seq_len
    h = getattr(config, "n_embd", None) or getattr(config, "hidden_size", 768)
    layers = getattr(config, "n_layer", None) or getattr(config, "num_hidden_layers", 12)
    vocab = getattr(config, "vocab_size", 50257)
    half = recipe.train.mixed_precision in ("bf16", "fp16")
    act = layers * s * b * h * 34 * (1 if half else 2)
    if recipe.model.gradient_checkpointing:
        act = layers * s * b * h * (2 if half else 4) + act / layers
    logits = b * s * vocab * 4 * 2  # logits + their gradient, fp32 for the loss
    return {
        "weights": n_params * 4 / gib,
        "gradients": trainable * 4 / gib,
        "optimizer (AdamW m, v)": trainable * 8 / gib,
        "activations (approx.)": (act + logits) / gib,
    }


def plan(
    recipe: Recipe, examples: int = 2, color: bool = False, tokens_per_second: float | None = None
) -> None:
    task = get_task(recipe.task)
    docs = field_docs()
    print(
        f"{BOLD if color else ''}recipe{RESET if color else ''}: task={recipe.task}  output_dir={recipe.output_dir}"
    )
    print("\nchanged from the defaults:")
    for key, default, value in config_diff(recipe):
        print(f"  {key} = {value!r}   (default {default!r})  # {docs.get(key, '')}")

    out = Path(recipe.output_dir)
    data_cfg = recipe.data
    resolve_recipe(recipe)
    splits, bad_rows = load_splits(recipe, task, need_train=data_cfg.streaming)
    if data_cfg.streaming:
        print(
            f"\nstreaming: the lengths below are those of the stream's first {len(splits['train'])} rows; the stream's "
            f"length is unknown, so the run lasts train.max_steps={recipe.train.max_steps} steps"
        )
    train_raw = splits.get("train", splits["validation"])
    model, tokenizer = _model_for_plan(recipe, tokenizer_training_texts(recipe, task, splits))
    ctx = check_context(model, data_cfg)
    train_ds, stats = tokenize_split(
        task, tokenizer, train_raw, data_cfg, data_cfg.max_seq_len, data_cfg.packing
    )

    print(
        f"\nrendered training examples (loss-masked part {'dimmed' if color else 'in [[ ]]'}; ⟨eos⟩ = EOS token):"
    )
    for i in range(min(examples, len(train_ds))):
        print(f"  --- example {i} ({len(train_ds[i]['input_ids'])} tokens)")
        print("  " + render_example(tokenizer, train_ds[i], color).replace("\n", "\n  "))
    _print_lengths(task, stats, len(train_raw), data_cfg.max_seq_len)
    print(f"  {stats.cache.describe()}")
    _print_sources(recipe, splits)
    for split, counts in bad_rows.items():
        shown = ", ".join(f"{n} {reason}" for reason, n in counts.items()) or "none"
        print(f"  {split} rows dropped as unusable (data.bad_rows={data_cfg.bad_rows}): {shown}")
    all_lengths = example_lengths(train_ds)
    total_steps, tok_per_step = _print_steps(recipe, all_lengths)
    _print_model(recipe, model, ctx)
    tps = tokens_per_second or _previous_throughput(out)
    if tps:
        print(
            f"estimated training time at {tps:,.0f} tokens/s: {total_steps * tok_per_step / tps / 60:.1f} min (+ evaluation)"
        )
    else:
        print(
            "estimated time: unknown (no throughput figure yet: run a few steps, then plan again on the same output_dir)"
        )
    if task.generates:
        _print_metric_check(recipe, task, splits["validation"].to_list()[:200])
    hist = _save_histogram(all_lengths, data_cfg.max_seq_len, out / "plan" / "lengths.png")
    print(f"\nlength histogram: {hist}")


def _print_lengths(task, stats, rows: int, max_seq_len: int) -> None:
    print(f"\ntoken lengths ({rows} training rows, data.max_seq_len={max_seq_len}):")
    if task.tokenization == "completion":
        totals = [p + t for p, t in zip(stats.prompt_lengths, stats.target_lengths, strict=True)]
        print(f"  prompt: {length_summary(stats.prompt_lengths)}")
        print(f"  target (+EOS): {length_summary(stats.target_lengths)}")
        print(f"  total: {length_summary(totals)}")
    else:
        print(f"  blocks: {length_summary(stats.target_lengths)}")
    print(
        f"  sources truncated: {stats.source_truncated}, targets truncated: {stats.target_truncated}, "
        f"dropped: {stats.dropped} of {stats.examples}"
    )


def _print_sources(recipe: Recipe, splits: dict) -> None:
    """data.sources: rows per source and the mixture's realised shares; data.eval_sets: rows per set."""
    from hftoolkit.mixture import mixture_shares

    shares = mixture_shares(recipe, splits["train"]) if "train" in splits else []
    if shares:
        print(
            f"\nmixture ({len(splits['train'])} rows, data.mixture_stopping={recipe.data.mixture_stopping}):"
        )
    for s in shares:
        print(
            f"  {s['source']}: {s['rows']} of {s['rows_offered']} rows, share {s['share']:.1%} "
            f"(weight {s['weight']:g} → {s['target_share']:.1%})"
        )
    for name in recipe.data.eval_sets or {}:
        print(f"  eval set {name}: {len(splits[f'validation/{name}'])} rows")


def _print_steps(recipe: Recipe, lengths: list[int]) -> tuple[int, float]:
    """Examples and tokens per optimizer step and in all → (total steps, tokens per step)."""
    t = recipe.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = steps_per_epoch(
        len(lengths), t.per_device_train_batch_size, world, t.gradient_accumulation_steps
    )
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch)
    ex_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world
    mean_len = statistics.fmean(lengths)
    tok_per_step = ex_per_step * mean_len
    print("\nsteps:")
    print(
        f"  {t.per_device_train_batch_size} per device × {t.gradient_accumulation_steps} accumulation × {world} process(es) "
        f"= {ex_per_step} examples per step ≈ {tok_per_step:,.0f} tokens (mean {mean_len:.0f} tokens/example)"
    )
    print(
        f"  {len(lengths)} examples → {per_epoch} steps per epoch; {total_steps} steps in all ≈ {total_steps * tok_per_step:,.0f} tokens"
    )
    return total_steps, tok_per_step


def _print_model(recipe: Recipe, model, ctx) -> None:
    from hftoolkit.modeling import count_parameters

    t = recipe.train
    n_params, trainable = count_parameters(model)
    print(f"\nmodel: {n_params:,} parameters ({trainable:,} trainable), context {ctx}")
    mem = memory_estimate(n_params, trainable, model.config, recipe)
    precision = t.mixed_precision or "as launched (fp32 unless accelerate says otherwise)"
    print(f"memory per device (estimate, precision {precision}, batch {t.per_device_train_batch_size}):")
    for k, v in mem.items():
        print(f"  {k}: {v:.3f} GiB")
    print(f"  total ≈ {sum(mem.values()):.3f} GiB")


def _print_metric_check(recipe: Recipe, task, rows: list[dict]) -> None:
    """The first reference scored against all references: what a perfect model would get (~100 when the
    references are read and the metric is set up right)."""
    from hftoolkit.evaluation import compute_scores

    refs = [task.references(r, recipe.data) for r in rows]
    scores, _ = compute_scores(
        recipe.eval.metrics or list(task.default_metrics(recipe.data)), [r[0] for r in refs], refs
    )
    shown = ", ".join(f"{k} {v:.1f}" for k, v in scores.items())
    print(f"\nmetric check, first reference scored against all references ({len(refs)} eval rows): {shown}")


def _model_for_plan(recipe: Recipe, texts):
    """The tokenizer for real, the model on the meta device when it comes from a checkpoint (no weights read)."""
    from hftoolkit.modeling import load_model_and_tokenizer, load_tokenizer

    if recipe.model.init is not None:
        return load_model_and_tokenizer(recipe.model, texts, seed=recipe.seed)
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(
        recipe.model.name_or_path, recipe.model.revision, recipe.model.trust_remote_code
    )
    try:
        config = AutoConfig.from_pretrained(
            recipe.model.name_or_path,
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    except OSError as e:
        raise UserError(
            f"model.name_or_path: cannot read the config of '{recipe.model.name_or_path}' ({e})"
        ) from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    if recipe.model.lora is not None:
        from hftoolkit.modeling import apply_lora

        model = apply_lora(model, recipe.model.lora)
    return model, tokenizer


def _previous_throughput(out: Path) -> float | None:
    train_lines, _ = read_metrics(out)
    values = [r["tokens_per_second"] for r in train_lines if r.get("tokens_per_second")]
    return statistics.median(values) if values else None


def _save_histogram(lengths: list[int], limit: int, path: Path) -> Path:
    from matplotlib.figure import Figure

    from hftoolkit.atomic import atomic_write_bytes

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="#4C72B0")
    ax.axvline(limit, color="#C44E52", linestyle="--", label=f"max_seq_len = {limit}")
    ax.set_xlabel("tokens per training example (prompt + target + EOS)")
    ax.set_ylabel("examples")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
    return path
