"""Set up a run in named steps, and the helpers the loop calls (evaluate, save the model, write the reports).

`prepare_run` is the whole setup, in order: `start_run` (accelerator, output_dir, resolved config.yaml) →
`load_splits` → `load_model` → `build_train_loaders` → `build_generation_eval` → the resume check.
`hftoolkit plan` and benchmarks/ call the same steps. train.py reads top to bottom; this file holds the rest.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from hftoolkit import checkpoint as ckpt
from hftoolkit import rundir
from hftoolkit.config import Recipe, flatten, save_recipe, to_dict
from hftoolkit.data import (
    build_eval_loader,
    build_train_loader,
    load_raw_splits,
    steps_per_epoch,
    tokenize_split,
)
from hftoolkit.errors import UserError
from hftoolkit.evaluation import (
    build_generation_loader,
    build_generation_set,
    default_max_new_tokens,
    document_stream,
    evaluate_loss,
    generate_predictions,
    generation_batch_sizes,
    prediction_rows,
    score_generations,
)
from hftoolkit.generation import Decoding
from hftoolkit.modeling import context_length, load_model_and_tokenizer, save_pretrained
from hftoolkit.speedups import packing_keeps_examples_apart, speed_up
from hftoolkit.tasks import Task, get_task

logger = logging.getLogger("hftoolkit")


@dataclass
class EvalSet:
    """One of data.eval_sets, ready to score (the first one shares the run's own eval loaders)."""

    eval_loader: object
    gen_set: object = None
    gen_loaders: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # results.json → eval_sets.<name>.dataset
    stride_stream: tuple | None = None  # eval.perplexity_stride: (token ids, scored)


@dataclass
class Run:
    """One run's state, built by prepare_run and used by the loop."""

    recipe: Recipe
    accelerator: object
    task: Task
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
    total_steps: int = 0  # optimizer steps of the whole run (train.max_steps, or the epochs' worth)
    extended: dict | None = None  # a resume to a new total of steps (checkpoint.check_length)
    elastic: dict | None = None  # a resume on another process count (checkpoint.adapt_to_process_count)
    batches_per_epoch: int = 0
    resume_from: Path | None = None
    eval_dataset_info: dict = field(default_factory=dict)
    metric_config: dict = field(default_factory=dict)  # each metric's settings, from the last evaluation
    context: int | None = None  # the model's context length (None: unbounded)
    packing: bool = True  # data.packing, unless the model cannot keep packed examples apart
    targets_only: bool = False  # speed_up enabled the targets-only LM head (see token_losses)
    eval_sets: dict[str, EvalSet] = field(default_factory=dict)  # data.eval_sets, in recipe order
    stride_stream: tuple | None = None  # eval.perplexity_stride: (token ids, scored) of the eval split

    @property
    def out(self) -> Path:
        return Path(self.recipe.output_dir)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int, final: bool, subset: bool) -> dict:
        """Eval loss/perplexity and, for generating tasks, generate + score; logged to metrics.jsonl.
        `final` also writes predictions.jsonl; `subset` uses eval.max_eval_samples_during_training prompts.

        With data.eval_sets every set is scored: each under "<name>/<metric>" keys (trackers: eval/<name>/<metric>),
        and the first (primary) set also under the plain keys, which selection, the plots and results.json's
        baseline/final read; predictions.jsonl holds the primary set's predictions."""
        acc = self.accelerator
        scores = self.score_set(
            self.eval_loader, self.gen_set, self.gen_loaders, subset, final, self.stride_stream
        )
        for i, (name, s) in enumerate(self.eval_sets.items()):
            own = (
                scores
                if i == 0
                else self.score_set(s.eval_loader, s.gen_set, s.gen_loaders, subset, False, s.stride_stream)
            )
            scores = {**scores, **{f"{name}/{k}": v for k, v in own.items() if "/" not in k}}
        if acc.is_main_process:
            rundir.append_metrics(self.out, {"kind": "eval", "step": step, **scores})
            acc.print(f"eval @ step {step}: " + ", ".join(f"{k} {v:g}" for k, v in scores.items()))
        acc.log({f"eval/{k}": v for k, v in scores.items()}, step=step)
        return scores

    def score_set(
        self, eval_loader, gen_set, gen_loaders, subset: bool, write_predictions: bool, stride_stream=None
    ) -> dict:
        """One eval set's scores (rounded): its eval loss, and its generations scored for generating tasks."""
        acc = self.accelerator
        scores = (
            evaluate_loss(acc, self.model, eval_loader, self.targets_only)
            if eval_loader is not None and stride_stream is None
            else {}
        )
        if stride_stream is not None:
            scores = self.stride_perplexity(stride_stream)
        if self.task.generates:
            loader = gen_loaders["subset" if subset and "subset" in gen_loaders else "full"]
            preds = generate_predictions(
                acc, self.model, self.tokenizer, self.task, gen_set, loader, self.decoding
            )
            data_cfg = self.recipe.data
            names = self.recipe.eval.metrics or list(self.task.default_metrics(data_cfg))
            task_scores, self.metric_config = score_generations(self.task, data_cfg, names, gen_set, preds)
            scores.update(task_scores)
            if write_predictions and acc.is_main_process:
                rundir.write_predictions(self.out, prediction_rows(self.task, data_cfg, gen_set, preds))
        return {k: round(float(v), 4) for k, v in scores.items()}

    def stride_perplexity(self, stride_stream: tuple) -> dict:
        """eval.perplexity_stride: sliding windows of data.max_seq_len tokens over an eval set's stream."""
        from hftoolkit.evaluation import sliding_window_perplexity

        ids, scored = stride_stream
        e = self.recipe.eval
        window = self.recipe.data.max_seq_len
        return sliding_window_perplexity(
            self.accelerator,
            self.model,
            ids,
            scored,
            window,
            e.perplexity_stride,
            e.per_device_eval_batch_size,
        )

    # ------------------------------------------------------------------ files
    def write_results(self, results: dict) -> dict:
        """results.json: the given sections plus what they were computed with."""
        sets = self.eval_set_results(results)  # takes the per-set keys out of baseline and final
        results = {
            **results,
            **sets,
            **({"extended": self.extended} if self.extended else {}),
            **({"elastic": self.elastic} if self.elastic else {}),
            "metric_config": self.metric_config,
            "eval_dataset": self.eval_dataset_info,
            "data": self.data_stats,
        }
        if self.accelerator.is_main_process:
            rundir.write_results(self.out, results)
        return results

    def eval_set_results(self, results: dict) -> dict:
        """{"eval_sets": {name: {"dataset", "baseline", "final"}}} from the "<name>/<metric>" keys of `results`'
        baseline and final, which are left with the primary set's plain keys; {} without data.eval_sets."""
        if not self.eval_sets:
            return {}
        sets = {name: {"dataset": s.info} for name, s in self.eval_sets.items()}
        for section in ("baseline", "final"):
            if not results.get(section):
                continue
            for key, value in list(results[section].items()):
                name, _, metric = key.rpartition("/")
                if name in sets:
                    sets[name].setdefault(section, {})[metric] = value
            results[section] = {k: v for k, v in results[section].items() if "/" not in k}
        return {"eval_sets": sets}

    def model_info(self) -> rundir.ModelInfo:
        template = self.task.template(self.recipe.data)
        decoding = self.decoding
        return rundir.ModelInfo(
            task=self.task.name,
            prompt_template=template.template,
            source_field=template.source_field,
            target_prefix=template.target_prefix,
            stop_strings=list(decoding.stop_strings) if decoding else [],
            max_new_tokens=decoding.max_new_tokens if decoding else None,
            num_beams=decoding.num_beams if decoding else 1,
            max_seq_len=self.recipe.data.max_seq_len,
            data={k: v for k, v in to_dict(self.recipe)["data"].items() if k.endswith(("_lang", "_column"))},
        )

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
        # The saved tokenizer is for generation, so its config says left padding (pipelines read it); training
        # keeps right padding (collators pad by length either way).
        self.tokenizer.padding_side = "left"
        if self.recipe.model.lora is not None:  # model/ gets the adapter only: keep its base model findable
            from hftoolkit.lora import save_base_model

            save_base_model(model, state_dict, self.tokenizer, self.recipe.model, self.out)
        with ckpt.disk_full_is_user_error(self.out / rundir.MODEL_DIR):
            save_pretrained(
                model,
                self.tokenizer,
                self.out / rundir.MODEL_DIR,
                state_dict=state_dict,
                info=self.model_info(),
            )
        self.tokenizer.padding_side = "right"
        acc.wait_for_everyone()

    def write_reports(self) -> None:
        """plots/, report.md and the model card (README.md), from the files the run wrote."""
        from hftoolkit.atomic import atomic_write_text
        from hftoolkit.card import build_model_card
        from hftoolkit.report import write_plots, write_report

        write_plots(self.out)
        write_report(self.out)
        atomic_write_text(self.out / "README.md", str(build_model_card(self.out)))

    def progress_bar(self, total: int, initial: int):
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=initial,
            disable=not self.accelerator.is_local_main_process,
            desc="train",
            unit="step",
        )


# ---------------------------------------------------------------------------------------------- setup steps


def prepare_run(recipe: Recipe, mode: str) -> Run:
    """Everything before the loop (mode "train") or before an eval-only scoring (mode "eval")."""
    acc, task, resume_from = start_run(recipe, mode)
    elastic = ckpt.adapt_to_process_count(recipe, acc, resume_from) if resume_from is not None else None
    splits, bad_rows = load_splits(recipe, task, acc, need_train=mode == "train")
    model, tokenizer = load_model(recipe, task, splits)
    run = Run(recipe, acc, task, model, tokenizer, resume_from=resume_from, context=context_length(model))
    run.elastic = elastic
    run.model, run.packing, run.targets_only = prepare_model(model, recipe, acc)
    build_train_loaders(run, splits)
    for split, counts in bad_rows.items():  # results.json says what was left out, and why
        run.data_stats.setdefault(split.replace("validation", "eval", 1), {})["bad_rows"] = counts
    if task.generates:
        build_generation_eval(run, splits["validation"], eval_set_rows(splits))
    if recipe.eval.perplexity_stride:
        run.stride_stream = document_stream(task, tokenizer, splits["validation"].to_list(), recipe.data)
    build_eval_sets(run, splits)
    if resume_from is not None:
        ckpt.check_resume_compatible(run, resume_from)
    return run


def resolve_recipe(recipe: Recipe) -> Task:
    """The recipe's task, with the data keys it derives filled in and its metrics checked."""
    task = get_task(recipe.task)
    task.resolve(recipe.data)
    check_metrics(recipe.eval.metrics or list(task.default_metrics(recipe.data)))
    return task


def start_run(recipe: Recipe, mode: str):
    """Accelerator, output_dir checks, the checkpoint to resume, the resolved config.yaml (before step 0),
    trackers and seed → (accelerator, task, resume_from)."""
    from accelerate.utils import set_seed

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    acc = make_accelerator(recipe)
    out = Path(recipe.output_dir)
    if acc.is_main_process:
        check_output_dir(recipe, mode)
        rundir.acquire_lock(out, acc.print)  # one run per output_dir (overwrite_output_dir included)
    resume_from = ckpt.resolve_resume(recipe.train.resume_from_checkpoint, out) if mode == "train" else None
    if recipe.train.resume_from_checkpoint == "latest" and resume_from is None:
        acc.print(f"no checkpoint in {out / rundir.CHECKPOINTS} yet: starting from step 0")
    task = resolve_recipe(recipe)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, out / rundir.CONFIG)  # what this run is, resolved, before step 0
    acc.wait_for_everyone()
    if recipe.report_to != "none":
        acc.init_trackers(
            "hftoolkit",
            config={
                k: v for k, v in flatten(to_dict(recipe)).items() if isinstance(v, (int, float, str, bool))
            },
        )
    set_seed(recipe.seed)
    return acc, task, resume_from


def load_splits(recipe: Recipe, task: Task, acc=None, need_train: bool = True) -> tuple[dict, dict]:
    """({"train", "validation"} raw datasets, {split: {"<reason> <column>": rows dropped}}): columns checked
    against the task, rows the task cannot use dropped and counted (data.bad_rows), every drop reported."""
    # Loading happens on the main process first; the others then hit datasets' cache.
    with acc.main_process_first() if acc is not None else contextlib.nullcontext():
        if recipe.data.streaming:  # the eval rows, and the head of the training stream (see streaming.py)
            from hftoolkit.streaming import load_splits as load_stream_splits

            splits, bad_rows = load_stream_splits(recipe, task, acc, need_train)
        else:
            splits, bad_rows = load_raw_splits(recipe, Path(recipe.output_dir), task)
    if need_train and "train" not in splits:
        raise UserError("data: no training split; set data.train_file or data.dataset_name")
    for name, counts in bad_rows.items():
        if counts:
            shown = ", ".join(f"{n} {reason}" for reason, n in counts.items())
            message = f"data ({name}): dropped {sum(counts.values())} unusable rows ({shown})"
            if acc is not None:
                acc.print(message)
            else:
                logger.warning(message)
    return splits, bad_rows


def tokenizer_training_texts(recipe: Recipe, task: Task, splits: dict) -> list[str] | None:
    """The texts a `model.init.tokenizer: bpe` tokenizer is trained on (None for any other tokenizer)."""
    if recipe.model.init is None or recipe.model.init.tokenizer != "bpe":
        return None
    data_cfg = recipe.data
    template = task.template(data_cfg)
    rows = splits["train" if "train" in splits else "validation"]
    return [template.render(task.fields(r, data_cfg)) + " " + task.target(r, data_cfg) for r in rows]


def check_context(model, data_cfg) -> int | None:
    """The model's context length; data.max_seq_len must fit in it."""
    ctx = context_length(model)
    if ctx is not None and data_cfg.max_seq_len > ctx:
        raise UserError(
            f"data.max_seq_len: {data_cfg.max_seq_len} exceeds the model's context of {ctx} tokens; set data.max_seq_len≤{ctx}"
        )
    return ctx


def load_model(recipe: Recipe, task: Task, splits: dict):
    """(model, tokenizer), checked against each other and against data.max_seq_len."""
    texts = tokenizer_training_texts(recipe, task, splits)
    model, tokenizer = load_model_and_tokenizer(recipe.model, texts, seed=recipe.seed)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(
            f"model.name_or_path: the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} "
            "rows; use the tokenizer the checkpoint was trained with"
        )
    check_context(model, recipe.data)
    return model, tokenizer


def prepare_model(model, recipe: Recipe, acc):
    """Training-time changes to a loaded model → (model, packing, targets_only).

    packing: data.packing, unless the architecture lets packed examples see each other (then padded batches);
    targets_only: speed_up's targets-only LM head; TF32 on CUDA; torch.compile when asked.
    """
    packing = recipe.data.packing
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
    if recipe.model.torch_compile:
        import torch

        # dynamic=True: packed and padded batches change shape from step to step.
        model = torch.compile(model, dynamic=True)
    return model, packing, targets_only


def build_train_loaders(run: Run, splits: dict) -> None:
    """Tokenize (main process first, the others hit the cache) → run.eval_loader, run.train_loader and the
    per-epoch counts, data stats and fingerprint."""
    recipe, acc, data_cfg = run.recipe, run.accelerator, run.recipe.data
    tok = run.tokenizer
    eval_raw = splits["validation"]
    run.eval_dataset_info = {
        "name": data_cfg.dataset_name
        or data_cfg.validation_file
        or ("synthetic" if data_cfg.synthetic else data_cfg.train_file),
        "config": data_cfg.dataset_config_name,
        "split": data_cfg.validation_split if data_cfg.dataset_name else "validation",
        "num_examples": len(eval_raw),
    }
    # Rank 0 tokenizes (or finds the tokenize-once cache); the others then hit the entry it saved. The local main
    # process of every other node goes next, so a node without the shared folder builds once, not once per rank.
    train_stats = None  # a stream is tokenized as it is read
    with acc.main_process_first(), acc.local_main_process_first():
        if "train" in splits and not data_cfg.streaming:
            train_ds, train_stats = tokenize_split(
                run.task, tok, splits["train"], data_cfg, data_cfg.max_seq_len, run.packing
            )
        eval_ds, eval_stats = tokenize_split(
            run.task, tok, eval_raw, data_cfg, data_cfg.max_seq_len, run.packing
        )
    for split, stats in (("train", train_stats), ("eval", eval_stats)):
        if stats is not None:
            acc.print(f"data ({split}): {stats.cache.describe()}")
    eval_batch = recipe.eval.per_device_eval_batch_size
    run.eval_loader = acc.prepare_data_loader(build_eval_loader(eval_ds, eval_batch, tok.pad_token_id))
    run.data_stats = {"eval": eval_stats.as_dict()}
    if "train" not in splits:
        return
    if data_cfg.streaming:  # batches read, shuffled and tokenized on the fly, each process its own shards
        from hftoolkit.streaming import attach_train_stream

        return attach_train_stream(run, splits["train"])
    run.data_stats["train"] = train_stats.as_dict()
    for split, s in run.data_stats.items():
        if s["source_truncated"] or s["target_truncated"] or s["dropped"]:
            acc.print(
                f"data ({split}): {s['source_truncated']} sources truncated, {s['target_truncated']} targets "
                f"truncated, {s['dropped']} dropped of {s['examples']} (data.max_seq_len={data_cfg.max_seq_len})"
            )
    run.data_fingerprint = ckpt.data_fingerprint(train_ds)
    batch = recipe.train.per_device_train_batch_size
    accumulation = recipe.train.gradient_accumulation_steps
    run.train_loader = build_train_loader(
        train_ds, batch, recipe.seed, run.packing, tok.pad_token_id, data_cfg.max_seq_len, acc.num_processes,
        accumulation,
    )  # fmt: skip
    run.batches_per_epoch = -(-len(train_ds) // (batch * acc.num_processes))
    run.steps_per_epoch = steps_per_epoch(
        len(train_ds), batch, acc.num_processes, recipe.train.gradient_accumulation_steps
    )
    t = recipe.train
    run.total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * run.steps_per_epoch)
    if data_cfg.sources is not None:  # results.json → data.mixture: what each source gave
        from hftoolkit.mixture import mixture_shares

        run.data_stats["mixture"] = mixture_shares(recipe, splits["train"])


def build_generation_eval(run: Run, eval_raw, reference_rows: list[dict] | None = None) -> None:
    """Decoding settings, the encoded eval prompts and their batches (full set, and the periodic subset).
    `reference_rows`: the rows whose references size the default max_new_tokens (default: eval_raw's)."""
    e, data_cfg, task, tok = run.recipe.eval, run.recipe.data, run.task, run.tokenizer
    rows = eval_raw.to_list()  # load_splits dropped the rows without a reference: none is scored against ""
    refs = [task.references(r, data_cfg) for r in (rows if reference_rows is None else reference_rows)]
    max_new = e.max_new_tokens or default_max_new_tokens(tok, refs)
    stops = tuple(e.stop_strings if e.stop_strings is not None else task.stop_strings)
    run.decoding = Decoding(max_new, e.num_beams, e.do_sample, e.temperature, e.top_p, stops)
    run.gen_set, run.gen_loaders = generation_state(run, rows)


def generation_state(run: Run, rows: list[dict]):
    """(encoded eval prompts, their batches: the full set and the periodic subset) under run.decoding."""
    e, data_cfg, task, tok = run.recipe.eval, run.recipe.data, run.task, run.tokenizer
    max_new = run.decoding.max_new_tokens
    ctx = run.context
    budget = min(data_cfg.max_seq_len, (ctx or 1 << 30) - max_new)
    if budget < 8:
        raise UserError(
            f"eval.max_new_tokens: {max_new} leaves no room for the prompt in a {ctx}-token context"
        )
    gen_set = build_generation_set(task, tok, rows, data_cfg, budget)
    sizes = generation_batch_sizes(e, budget, max_new)
    loaders = {"full": build_generation_loader(run.accelerator, gen_set, **sizes)}
    if e.max_eval_samples_during_training:
        loaders["subset"] = build_generation_loader(
            run.accelerator, gen_set, **sizes, limit=e.max_eval_samples_during_training
        )
    return gen_set, loaders


def eval_set_rows(splits: dict) -> list[dict] | None:
    """Every eval set's rows (data.eval_sets), so the default max_new_tokens fits the longest references of all."""
    names = [k for k in splits if k.startswith("validation/")]
    return [row for k in names for row in splits[k].to_list()] if names else None


def build_eval_sets(run: Run, splits: dict) -> None:
    """run.eval_sets from data.eval_sets: each set tokenized, batched and its prompts encoded as the validation
    split is (the first set is that split: it shares the run's loaders)."""
    from hftoolkit.mixture import eval_set_info

    recipe, acc, data_cfg = run.recipe, run.accelerator, run.recipe.data
    for i, (name, spec) in enumerate((data_cfg.eval_sets or {}).items()):
        raw = splits[f"validation/{name}"]
        info = eval_set_info(spec, raw)
        if i == 0:
            run.eval_dataset_info = info
            run.eval_sets[name] = EvalSet(
                run.eval_loader, run.gen_set, run.gen_loaders, info, run.stride_stream
            )
            continue
        with acc.main_process_first():
            ds, stats = tokenize_split(
                run.task, run.tokenizer, raw, data_cfg, data_cfg.max_seq_len, run.packing
            )
        run.data_stats[f"eval/{name}"] = stats.as_dict()
        batch = recipe.eval.per_device_eval_batch_size
        loader = acc.prepare_data_loader(build_eval_loader(ds, batch, run.tokenizer.pad_token_id))
        gen_set, gen_loaders = generation_state(run, raw.to_list()) if run.task.generates else (None, {})
        stream = (
            document_stream(run.task, run.tokenizer, raw.to_list(), data_cfg)
            if recipe.eval.perplexity_stride
            else None
        )
        run.eval_sets[name] = EvalSet(loader, gen_set, gen_loaders, info, stream)


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


def check_output_dir(recipe: Recipe, mode: str) -> None:
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: {out} is a file; choose a folder path")
    if not out.is_dir() or recipe.train.overwrite_output_dir:
        return
    resuming = mode == "train" and recipe.train.resume_from_checkpoint is not None
    present = [name for name in rundir.RUN_FILES if (out / name).exists()]
    if present and not resuming:
        raise UserError(
            f"output_dir: {out} already holds a run ({', '.join(present)}); choose another output_dir, "
            "resume with train.resume_from_checkpoint=latest, or set train.overwrite_output_dir=true"
        )


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state (AcceleratorState, GradientState, PartialState are singletons), so the
    next Accelerator is set up from its own arguments and the environment only, as transformers' TrainingArguments
    does for each Trainer. Without this, an Accelerator built earlier in the same process (TRL's SFTTrainer:
    bf16=True by default) hands its mixed precision on to the next one built with mixed_precision unset."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    reset_accelerate_state()  # this run's recipe and environment only, not an earlier Accelerator's settings
    kwargs = {}
    if recipe.train.mixed_precision is not None:
        kwargs["mixed_precision"] = recipe.train.mixed_precision
    if recipe.report_to != "none":
        import importlib.util

        # accelerate only warns when the tracker is missing, and the run would then log nowhere.
        if importlib.util.find_spec(recipe.report_to) is None:
            raise UserError(
                f"report_to: {recipe.report_to} is not installed; pip install {recipe.report_to}, or set report_to=none"
            )
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
    # accelerate selects FSDP only on accelerators: with ACCELERATE_USE_CPU=1 an FSDP config silently runs as DDP.
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and acc.distributed_type.value != "FSDP":
        acc.print(
            f"accelerate config: FSDP was asked for, but accelerate runs FSDP on GPUs/accelerators only; this run is "
            f"{acc.distributed_type.value} (parameters are not sharded)"
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
