"""Everything around the loop: set up a run (accelerator, data, model, loaders) and the helpers the loop calls
(evaluate, checkpoint, save the model, write results). train.py reads top to bottom; this file holds the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from hftoolkit import checkpoint as ckpt
from hftoolkit.config import Recipe, save_recipe, to_dict
from hftoolkit.data import (
    build_eval_loader,
    build_train_loader,
    check_columns,
    load_raw_splits,
    steps_per_epoch,
    tokenize_split,
)
from hftoolkit.errors import UserError
from hftoolkit.evaluation import (
    build_generation_loader,
    build_generation_set,
    compute_scores,
    default_max_new_tokens,
    evaluate_loss,
    generate_predictions,
    generation_batch_sizes,
    per_example_scores,
)
from hftoolkit.generation import Decoding
from hftoolkit.modeling import context_length, load_model_and_tokenizer, save_pretrained
from hftoolkit.speedups import packing_keeps_examples_apart, speed_up
from hftoolkit.tasks import get_task

logger = logging.getLogger("hftoolkit")

# Keys that may change between a checkpoint and its resume without changing what is trained.
RESUME_FREE_KEYS = {
    "output_dir", "report_to", "train.resume_from_checkpoint", "train.logging_steps", "train.eval_steps",
    "train.save_steps", "train.save_total_limit", "train.overwrite_output_dir", "hub", "eval",
}  # fmt: skip
RUN_FILES = ("results.json", "metrics.jsonl", "checkpoints", "model")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = prefix + k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def training_config(recipe: Recipe) -> dict:
    flat = flatten(to_dict(recipe))
    return {
        k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in RESUME_FREE_KEYS)
    }


def content_hash(dataset) -> str:
    """sha256 over the Arrow buffers of the token ids: identifies the training data, cheap even for large sets."""
    h = hashlib.sha256()
    for chunk in dataset.data.column("input_ids").chunks:
        for buf in chunk.buffers():
            if buf is not None:
                h.update(memoryview(buf))
    return h.hexdigest()[:16]


@dataclass
class Run:
    recipe: Recipe
    accelerator: object
    task: object
    model: object
    tokenizer: object
    train_loader: object = None
    eval_loader: object = None
    gen_set: object = None
    gen_loaders: dict = field(default_factory=dict)
    decoding: Decoding | None = None
    data_stats: dict = field(default_factory=dict)
    data_fingerprint: str = ""
    steps_per_epoch: int = 0
    batches_per_epoch: int = 0
    resume_from: Path | None = None
    eval_dataset_info: dict = field(default_factory=dict)
    targets_only: bool = False  # speed_up enabled the targets-only LM head (see token_losses)

    @property
    def out(self) -> Path:
        return Path(self.recipe.output_dir)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int, final: bool, subset: bool) -> dict:
        acc = self.accelerator
        scores = (
            evaluate_loss(acc, self.model, self.eval_loader, self.targets_only)
            if self.eval_loader is not None
            else {}
        )
        if self.task.generates:
            loader = self.gen_loaders["subset" if subset and "subset" in self.gen_loaders else "full"]
            preds = generate_predictions(
                acc, self.model, self.tokenizer, self.task, self.gen_set, loader, self.decoding
            )
            texts = [p["prediction"] for p in preds]
            refs = [self.gen_set.references[p["index"]] for p in preds]
            names = self.recipe.eval.metrics or list(self.task.metrics)
            task_scores, self.metric_config = compute_scores(names, texts, refs)
            scores.update(task_scores)
            # How many completions ended by themselves (EOS or stop string) rather than at max_new_tokens.
            scores["stopped_pct"] = 100.0 * sum(p["stopped"] for p in preds) / max(len(preds), 1)
            if final and acc.is_main_process:
                self.write_predictions(preds, per_example_scores(self.task.headline, texts, refs))
        scores = {k: round(float(v), 4) for k, v in scores.items()}
        if acc.is_main_process:
            with (self.out / "metrics.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps({"kind": "eval", "step": step, **scores}) + "\n")
            acc.print(f"eval @ step {step}: " + ", ".join(f"{k} {v:g}" for k, v in scores.items()))
        acc.log({f"eval/{k}": v for k, v in scores.items()}, step=step)
        return scores

    def write_predictions(self, preds: list[dict], per_example: list) -> None:
        path = self.out / "predictions.jsonl"
        lines = []
        for p, score in zip(preds, per_example, strict=True):
            i = p["index"]
            lines.append(
                json.dumps(
                    {
                        "prompt": self.gen_set.prompt_texts[i],
                        "references": self.gen_set.references[i],
                        "prediction": p["prediction"],
                        "score": None if score is None else round(score, 2),
                        "stopped": p["stopped"],
                    },
                    ensure_ascii=False,
                )
            )
        ckpt.atomic_write_text(path, "\n".join(lines) + "\n")

    def track_best(self, progress, scores: dict) -> None:
        key = self.task.headline
        if key not in scores:
            return
        lower_is_better = key in ("perplexity", "eval_loss")
        best = progress.best.get("value")
        if best is None or (scores[key] < best if lower_is_better else scores[key] > best):
            progress.best = {"metric": key, "value": scores[key], "step": progress.step}

    # ------------------------------------------------------------------ files
    def read_results(self) -> dict:
        path = self.out / "results.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_results(self, results: dict) -> dict:
        results = {
            **results,
            "metric_config": getattr(self, "metric_config", {}),
            "eval_dataset": self.eval_dataset_info,
            "data": self.data_stats,
        }
        if self.accelerator.is_main_process:
            ckpt.atomic_write_json(self.out / "results.json", results)
        return results

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop log lines written after the checkpoint (they will be written again)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        if step == 0:
            keep = []
        ckpt.atomic_write_text(path, "".join(line + "\n" for line in keep))

    def save_checkpoint(self, progress, config: dict) -> Path:
        state = {
            "step": progress.step,
            "epoch": progress.epoch,
            "batches_in_epoch": progress.batches_in_epoch,
            "best": progress.best,
            "data_fingerprint": self.data_fingerprint,
            "training_config": training_config(self.recipe),
            "num_processes": self.accelerator.num_processes,
            "config": config,
        }
        path = ckpt.save_checkpoint(
            self.accelerator,
            self.out / "checkpoints",
            progress.step,
            state,
            self.recipe.train.save_total_limit,
        )
        self.accelerator.print(f"checkpoint saved: {path}")
        return path

    def save_model(self) -> None:
        """model/: save_pretrained (safetensors) + tokenizer + generation_config + hftoolkit.json, atomically."""
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.model)  # collective under FSDP / ZeRO-3
        if not acc.is_main_process:
            acc.wait_for_everyone()
            return
        model = acc.unwrap_model(self.model)
        if self.decoding is not None:
            model.generation_config.max_new_tokens = self.decoding.max_new_tokens
            model.generation_config.num_beams = self.decoding.num_beams
        template = self.task.template(self.recipe.data)
        info = {
            "task": self.task.name,
            "prompt_template": template.template,
            "target_prefix": template.target_prefix,
            "source_field": template.source_field,
            "stop_strings": list(self.decoding.stop_strings) if self.decoding else [],
            "max_new_tokens": self.decoding.max_new_tokens if self.decoding else None,
            "num_beams": self.decoding.num_beams if self.decoding else 1,
            "max_seq_len": self.recipe.data.max_seq_len,
            "data": {
                k: v for k, v in to_dict(self.recipe)["data"].items() if k.endswith(("_lang", "_column"))
            },
        }
        self.tokenizer.padding_side = "left"  # the saved tokenizer is the one used for generation
        if self.recipe.model.lora is not None:  # model/ gets the adapter only: keep its base model findable
            from hftoolkit.lora import save_base_model

            save_base_model(model, state_dict, self.tokenizer, self.recipe.model, self.out)
        with ckpt.disk_full_is_user_error(self.out / "model"):
            save_pretrained(
                model,
                self.tokenizer,
                self.out / "model",
                state_dict=state_dict,
                extra_json={"hftoolkit.json": info},
            )
        self.tokenizer.padding_side = "right"
        acc.wait_for_everyone()

    def write_reports(self) -> None:
        from hftoolkit.hub import build_model_card
        from hftoolkit.report import write_plots, write_report

        write_plots(self.out)
        write_report(self.out)
        ckpt.atomic_write_text(self.out / "README.md", str(build_model_card(self.out)))

    def progress_bar(self, total: int, initial: int):
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=initial,
            disable=not self.accelerator.is_local_main_process,
            desc="train",
            unit="step",
        )


# ---------------------------------------------------------------------------------------------- setup


def check_output_dir(recipe: Recipe, mode: str) -> None:
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: {out} is a file; choose a folder path")
    if not out.is_dir() or recipe.train.overwrite_output_dir:
        return
    resuming = mode == "train" and recipe.train.resume_from_checkpoint is not None
    present = [name for name in RUN_FILES if (out / name).exists()]
    if present and not resuming:
        raise UserError(
            f"output_dir: {out} already holds a run ({', '.join(present)}); choose another output_dir, "
            "resume with train.resume_from_checkpoint=latest, or set train.overwrite_output_dir=true"
        )


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    kwargs = {}
    if recipe.train.mixed_precision is not None:
        kwargs["mixed_precision"] = recipe.train.mixed_precision
    if recipe.report_to != "none":
        kwargs["log_with"] = recipe.report_to
    acc = Accelerator(
        gradient_accumulation_steps=recipe.train.gradient_accumulation_steps,
        project_config=ProjectConfiguration(
            project_dir=recipe.output_dir, logging_dir=str(Path(recipe.output_dir) / "logs")
        ),
        # Our sampler is deterministic per (seed, epoch); accelerate only shards its batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False, even_batches=True),
        **kwargs,
    )
    # `accelerate launch --multi_gpu` on a machine without GPUs starts N processes that each train alone
    # (and write the same output_dir) unless ACCELERATE_USE_CPU=1 is set: refuse instead.
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > acc.num_processes:
        raise UserError(
            f"accelerate launch started {launched} processes but each one sees only itself (no GPU, and "
            "ACCELERATE_USE_CPU is not set); on CPU use ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ... "
            "(see recipes/accelerate/cpu_2proc.yaml)"
        )
    return acc


def prepare_run(recipe: Recipe, mode: str) -> Run:
    """Accelerator, output dir checks, resolved config.yaml, data, model, tokenization and loaders."""
    from accelerate.utils import set_seed

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    acc = make_accelerator(recipe)
    out = Path(recipe.output_dir)
    if acc.is_main_process:
        check_output_dir(recipe, mode)
    resume_from = ckpt.resolve_resume(recipe.train.resume_from_checkpoint, out) if mode == "train" else None
    if recipe.train.resume_from_checkpoint == "latest" and resume_from is None:
        acc.print(f"no checkpoint in {out / 'checkpoints'} yet: starting from step 0")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, out / "config.yaml")  # what this run is, before step 0
    acc.wait_for_everyone()
    if recipe.report_to != "none":
        acc.init_trackers(
            "hftoolkit",
            config={
                k: v for k, v in flatten(to_dict(recipe)).items() if isinstance(v, (int, float, str, bool))
            },
        )
    set_seed(recipe.seed)

    task = get_task(recipe.task)
    check_metrics(recipe.eval.metrics or list(task.metrics))
    data_cfg = recipe.data
    if task.name == "translation" and data_cfg.synthetic is not None:
        from hftoolkit.synthetic import SYNTHETIC_LANG

        data_cfg.source_lang = data_cfg.source_lang or "en"
        data_cfg.target_lang = data_cfg.target_lang or SYNTHETIC_LANG
    # Loading and tokenizing happen once, on the main process first; the others then hit datasets' cache.
    with acc.main_process_first():
        splits = load_raw_splits(recipe, out)
    if mode == "train" and "train" not in splits:
        raise UserError("data: no training split; set data.train_file or data.dataset_name")
    for name, ds in splits.items():
        check_columns(task, data_cfg, ds, name)
    train_texts = None
    if recipe.model.init is not None and recipe.model.init.tokenizer == "bpe":
        template = task.template(data_cfg)
        rows = splits["train" if "train" in splits else "validation"]
        train_texts = [
            template.render(task.fields(r, data_cfg)) + " " + task.target(r, data_cfg) for r in rows
        ]
    model, tokenizer = load_model_and_tokenizer(recipe.model, train_texts, seed=recipe.seed)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(
            f"model.name_or_path: the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} "
            "rows; use the tokenizer the checkpoint was trained with"
        )
    packing = data_cfg.packing
    if packing and not packing_keeps_examples_apart(model):
        packing = False
        acc.print(
            f"data.packing: {type(model).__name__} lets packed examples attend to each other (its attention mask "
            "ignores position ids), so this run pads batches instead; set data.packing=false to silence this"
        )
    targets_only = speed_up(model)
    if acc.device.type == "cuda":
        import torch

        # TF32 matmuls on Ampere+ (fp32 weights, 10-bit mantissa products): ~free speed for fp32 parts.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = context_length(model)
    if ctx is not None and data_cfg.max_seq_len > ctx:
        raise UserError(
            f"data.max_seq_len: {data_cfg.max_seq_len} exceeds the model's context of {ctx} tokens; set data.max_seq_len≤{ctx}"
        )

    if recipe.model.torch_compile:
        import torch

        # dynamic=True: packed and padded batches change shape from step to step.
        model = torch.compile(model, dynamic=True)
    run = Run(
        recipe=recipe,
        accelerator=acc,
        task=task,
        model=model,
        tokenizer=tokenizer,
        resume_from=resume_from,
        targets_only=targets_only,
    )
    eval_raw = splits["validation"]
    run.eval_dataset_info = {
        "name": data_cfg.dataset_name
        or data_cfg.validation_file
        or ("synthetic" if data_cfg.synthetic else data_cfg.train_file),
        "config": data_cfg.dataset_config_name,
        "split": data_cfg.validation_split if data_cfg.dataset_name else "validation",
        "num_examples": len(eval_raw),
    }
    with acc.main_process_first():
        if "train" in splits:
            train_ds, train_stats = tokenize_split(
                task, tokenizer, splits["train"], data_cfg, data_cfg.max_seq_len, packing
            )
        eval_ds, eval_stats = tokenize_split(
            task, tokenizer, eval_raw, data_cfg, data_cfg.max_seq_len, packing
        )
    eval_batch = recipe.eval.per_device_eval_batch_size
    run.eval_loader = acc.prepare_data_loader(build_eval_loader(eval_ds, eval_batch, tokenizer.pad_token_id))
    run.data_stats = {"eval": eval_stats.as_dict()}
    if "train" in splits:
        run.data_stats["train"] = train_stats.as_dict()
        for split, s in run.data_stats.items():
            if s["source_truncated"] or s["target_truncated"] or s["dropped"]:
                acc.print(
                    f"data ({split}): {s['source_truncated']} sources truncated, {s['target_truncated']} targets "
                    f"truncated, {s['dropped']} dropped of {s['examples']} (data.max_seq_len={data_cfg.max_seq_len})"
                )
        run.data_fingerprint = content_hash(train_ds)
        batch = recipe.train.per_device_train_batch_size
        run.train_loader = build_train_loader(
            train_ds,
            batch,
            recipe.seed,
            packing,
            tokenizer.pad_token_id,
            data_cfg.max_seq_len,
            acc.num_processes,
        )
        run.batches_per_epoch = -(-len(train_ds) // (batch * acc.num_processes))
        run.steps_per_epoch = steps_per_epoch(
            len(train_ds), batch, acc.num_processes, recipe.train.gradient_accumulation_steps
        )

    if task.generates:
        e = recipe.eval
        rows = eval_raw.to_list()
        refs = [task.references(r, data_cfg) for r in rows]
        max_new = e.max_new_tokens or default_max_new_tokens(tokenizer, refs)
        stops = tuple(e.stop_strings if e.stop_strings is not None else task.stop_strings)
        run.decoding = Decoding(max_new, e.num_beams, e.do_sample, e.temperature, e.top_p, stops)
        budget = min(data_cfg.max_seq_len, (ctx or 1 << 30) - max_new)
        if budget < 8:
            raise UserError(
                f"eval.max_new_tokens: {max_new} leaves no room for the prompt in a {ctx}-token context"
            )
        run.gen_set = build_generation_set(task, tokenizer, rows, data_cfg, budget)
        sizes = generation_batch_sizes(e, budget, max_new)
        run.gen_loaders["full"] = build_generation_loader(acc, run.gen_set, **sizes)
        if e.max_eval_samples_during_training:
            run.gen_loaders["subset"] = build_generation_loader(
                acc, run.gen_set, **sizes, limit=e.max_eval_samples_during_training
            )

    if resume_from is not None:
        check_resume_compatible(run, ckpt.read_state(resume_from), resume_from)
    return run


def check_metrics(names: list[str]) -> None:
    """Unknown metric names fail before any data or model is loaded."""
    from hftoolkit import metrics

    for name in names:
        if name == "perplexity":
            continue
        try:
            metrics.load(name)
        except Exception as e:  # evaluate raises several types for a missing module
            raise UserError(
                f"eval.metrics: cannot load metric '{name}' ({str(e).splitlines()[0][:160]})"
            ) from None


def check_resume_compatible(run: Run, state: dict, path: Path) -> None:
    """Refuse to resume when the data or the training-relevant config changed, naming what changed."""
    old, new = state.get("training_config", {}), training_config(run.recipe)
    changed = [
        f"{k}: {old.get(k)!r} → {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if changed:
        raise UserError(
            f"train.resume_from_checkpoint: {path} was trained with a different config ({'; '.join(changed[:3])}"
            f"{'; …' if len(changed) > 3 else ''}); restore those values or start a new output_dir"
        )
    if state.get("data_fingerprint") != run.data_fingerprint:
        raise UserError(
            f"train.resume_from_checkpoint: the training data changed since {path} was saved "
            f"(fingerprint {state.get('data_fingerprint')} → {run.data_fingerprint}); resume with the same data or start a new output_dir"
        )
    # The data position (batches_in_epoch), the LR schedule's units, RNG files and sharded states are per process.
    saved, now = state.get("num_processes", 1), run.accelerator.num_processes
    if saved != now:
        raise UserError(
            f"train.resume_from_checkpoint: {path} was saved by {saved} process(es), this run has {now}; "
            f"resume with accelerate launch --num_processes {saved}"
        )
