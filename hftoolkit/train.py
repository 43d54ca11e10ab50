"""THE training loop: explicit Accelerate, top to bottom.

Usage: hftoolkit train recipes/quickstart/generation.yaml train.max_steps=100
       accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m hftoolkit train RECIPE.yaml
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import signal
import time

import torch

from hftoolkit import checkpoint as ckpt
from hftoolkit import rundir
from hftoolkit.checkpoint import Progress
from hftoolkit.config import Recipe
from hftoolkit.errors import UserError
from hftoolkit.evaluation import token_losses
from hftoolkit.flops import device_peak_flops, flops_per_token
from hftoolkit.run import Run, prepare_run
from hftoolkit.selection import selection_for
from hftoolkit.selection import update as update_best

logger = logging.getLogger(__name__)


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next optimizer step and exits cleanly."""

    def __init__(self):
        self.flag = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.flag:  # a second Ctrl-C / SIGTERM: stop at once, without the checkpoint
            raise KeyboardInterrupt
        self.flag = True

    def requested(self, acc, step: int, every: int) -> bool:
        """Whether to stop now. With several processes the ranks must agree (a signal may reach only some), which
        costs an all-reduce and a host sync, so they compare flags every `every` steps rather than every step."""
        if acc.num_processes == 1:
            return self.flag
        if step % every:
            return False
        return acc.reduce(torch.tensor(float(self.flag), device=acc.device), "sum").item() > 0

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def build_optimizer(model, cfg, device):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # Biases and LayerNorm weights (1-D) are not decayed, as in GPT-2/nanoGPT and HF Trainer.
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused AdamW: one kernel over all parameters (CUDA, and CPU since torch 2.4; 3.7× faster step measured here).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        groups,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=fused,
    )


def backward_window(acc, model, window: list[dict], targets_only: bool = False) -> torch.Tensor:
    """Forward + backward over one optimizer step's micro-batches; returns the window's mean token loss.

    The loss is normalised by the target tokens of the WHOLE window on ALL processes, so the gradient equals
    that of one big batch (a mean of micro-batch means would over-weight the tokens of short micro-batches).
    """
    n_targets = sum((b["labels"][:, 1:] != -100).sum() for b in window)
    n_targets = acc.gather(n_targets.reshape(1)).sum().clamp(min=1)
    total = torch.zeros((), device=acc.device)
    for i, batch in enumerate(window):
        # No gradient all-reduce until the window's last micro-batch.
        with contextlib.nullcontext() if i == len(window) - 1 else acc.no_sync(model):
            loss_sum, _ = token_losses(model, batch, targets_only)
            # backward() divides by gradient_accumulation_steps and DDP averages over processes: undo both,
            # so the gradient is d(sum of token losses)/n_targets.
            acc.backward(loss_sum.sum() * (acc.gradient_accumulation_steps * acc.num_processes) / n_targets)
        total += loss_sum.sum().detach()
    return acc.reduce(total, "sum") / n_targets if acc.num_processes > 1 else total / n_targets


def build_scheduler(optimizer, cfg, total_steps: int, num_processes: int):
    """transformers.get_scheduler for `total_steps` optimizer steps with cfg's type and warmup."""
    from transformers import get_scheduler

    # The prepared scheduler steps num_processes times per optimizer step (accelerate counts schedules in
    # single-process batches), so warmup and length are given in those units: same LR curve on 1 or N processes.
    return get_scheduler(
        cfg.lr_scheduler_type,
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * total_steps) * num_processes,
        num_training_steps=total_steps * num_processes,
    )


def optimizer_step(acc, model, window, optimizer, scheduler, max_grad_norm: float, targets_only: bool):
    """One optimizer step over a window of micro-batches → (mean token loss, pre-clip gradient norm or None).

    Both stay on the device: reading them would sync the host every step (StepLogger reads them every
    logging_steps)."""
    loss = backward_window(acc, model, window, targets_only)
    grad_norm = acc.clip_grad_norm_(model.parameters(), max_grad_norm) if max_grad_norm > 0 else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def epoch_windows(train_loader, progress: Progress, accum: int):
    """The current epoch's optimizer-step windows of `accum` micro-batches (fewer at the end of the epoch),
    after the `progress.batches_in_epoch` micro-batches a resumed checkpoint already consumed."""
    train_loader.set_epoch(progress.epoch)  # deterministic shuffle per (seed, epoch)
    loader = train_loader
    if progress.batches_in_epoch and not getattr(train_loader, "resumes_itself", False):  # a stream: load()
        from accelerate import skip_first_batches

        loader = skip_first_batches(train_loader, progress.batches_in_epoch)
    batches = iter(loader)
    while window := list(itertools.islice(batches, accum)):
        yield window


class StepLogger:
    """Sums loss and token counts on the device between logs; every logging_steps it syncs once, checks the loss
    is finite and writes a train line (metrics.jsonl, trackers, progress bar). Time spent `paused()` (evaluation,
    checkpoints) does not count in tokens/s."""

    def __init__(self, run: Run, scheduler, start_step: int):
        acc = run.accelerator
        self.run, self.scheduler, self.last_step = run, scheduler, start_step
        self.flops_token = flops_per_token(acc.unwrap_model(run.model), run.recipe.data.max_seq_len)
        self.peak = device_peak_flops(acc.device)
        self.loss = torch.zeros((), device=acc.device)
        self.tokens = torch.zeros(2, device=acc.device)  # (all tokens, target tokens) since the last log
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, window: list[dict]) -> None:
        self.loss += loss
        for batch in window:
            self.tokens[0] += batch["num_tokens"]
            self.tokens[1] += (batch["labels"][:, 1:] != -100).sum()

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        yield
        self.t0 += time.perf_counter() - start

    def write(self, progress: Progress, grad_norm, bar, last_good) -> None:
        acc, run = self.run.accelerator, self.run
        loss = self.loss.item() / (progress.step - self.last_step)
        if not math.isfinite(loss):
            raise UserError(
                f"training loss became {loss} at or before step {progress.step}; weights are not saved. "
                f"Last good checkpoint: {last_good or 'none'}. Lower train.learning_rate or use bf16 instead of fp16"
            )
        seen = acc.reduce(self.tokens, "sum").tolist()
        elapsed = time.perf_counter() - self.t0
        mfu = None
        if self.peak and self.flops_token:
            mfu = self.flops_token * seen[0] / elapsed / (self.peak * acc.num_processes)
        record = {
            "kind": "train",
            "step": progress.step,
            "epoch": round(progress.epoch + progress.batches_in_epoch / max(run.batches_per_epoch, 1), 4)
            if not run.recipe.data.streaming
            else run.train_loader.pass_index,  # a stream: the pass over process 0's share
            "loss": loss,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_second": seen[0] / elapsed,
            "target_tokens_per_second": seen[1] / elapsed,
            "mfu": mfu,
        }
        if acc.is_main_process:
            rundir.append_metrics(run.out, record)
        acc.log({k: v for k, v in record.items() if isinstance(v, float)}, step=progress.step)
        postfix = {"loss": f"{loss:.4f}", "tok_s": f"{seen[0] / elapsed:,.0f}"}
        bar.set_postfix(**postfix, **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}))
        self.loss.zero_()
        self.tokens.zero_()
        self.last_step = progress.step
        self.t0 = time.perf_counter()


# Long on purpose: THE loop, read top to bottom in one function (setup above it, helpers called from it).
def train(recipe: Recipe) -> dict:
    """Fine-tune per the recipe; returns results.json's content."""
    from accelerate.utils import set_seed

    run: Run = prepare_run(recipe, mode="train")
    acc, cfg, out = run.accelerator, recipe.train, run.out
    total_steps = run.total_steps
    optimizer = build_optimizer(run.model, cfg, acc.device)
    scheduler = build_scheduler(optimizer, cfg, total_steps, acc.num_processes)
    # prepare: wraps the model (DDP/FSDP/DeepSpeed), shards the loaders, and makes the optimizer/scheduler
    # step only on real optimizer steps (the scheduler is stepped once per optimizer step below).
    model, optimizer, train_loader, scheduler = acc.prepare(run.model, optimizer, run.train_loader, scheduler)
    run.model = model
    if run.resume_from is not None:
        # Weights, optimizer, scheduler, every process's RNG (rescaled when the process count changed).
        progress = ckpt.restore(acc, run.resume_from, scheduler, recipe.seed)
        if recipe.data.streaming:  # this process's position in its stream, shuffle buffer included
            run.train_loader.load(run.resume_from)
    else:
        progress = Progress()
        set_seed(recipe.seed)

    results = {"baseline": rundir.read_results(out).get("baseline", {})}
    if acc.is_main_process:
        rundir.truncate_metrics(out, progress.step)
    if progress.step == 0 and recipe.eval.baseline:
        results["baseline"] = run.evaluate(step=0, final=False, subset=False)
    log, last_good = StepLogger(run, scheduler, progress.step), None
    selection, stopped_early = selection_for(recipe, run.task), None
    uploads = start_uploads(run)

    # ================================================================ the loop
    model.train()
    with StopRequested() as stop, run.progress_bar(total_steps, progress.step) as bar:
        while progress.step < total_steps and not stopped_early:
            for window in epoch_windows(train_loader, progress, cfg.gradient_accumulation_steps):
                loss, grad_norm = optimizer_step(
                    acc, model, window, optimizer, scheduler, cfg.max_grad_norm, run.targets_only
                )
                progress.step += 1
                progress.batches_in_epoch += len(window)
                bar.update(1)
                log.add(loss, window)
                if progress.step % cfg.logging_steps == 0 or progress.step == total_steps:
                    log.write(progress, grad_norm, bar, last_good)  # the hot loop's only host syncs

                with log.paused():
                    new_best, stopped_early = periodic_eval(run, progress, selection)
                    stop_now = stop.requested(acc, progress.step, every=cfg.logging_steps)
                    if (cfg.save_steps and progress.step % cfg.save_steps == 0) or stop_now or new_best:
                        last_good = ckpt.save(run, progress)
                        if uploads is not None:
                            uploads.submit(last_good)
                if stop_now:
                    acc.print(
                        f"stopped by signal at step {progress.step}; checkpoint saved to {last_good}. Resume with: "
                        f"hftoolkit train {out / rundir.CONFIG} train.resume_from_checkpoint=latest"
                    )
                    if uploads is not None:
                        uploads.close()
                    acc.end_training()
                    raise SystemExit(143)
                if progress.step >= total_steps or stopped_early:
                    break
            else:  # the epoch ran out of data (not out of steps): next epoch
                progress.epoch += 1
                progress.batches_in_epoch = 0
    # ================================================================ end of the loop
    if stopped_early:
        acc.print(f"{stopped_early}; stopped at step {progress.step}")
        results["stopped_early"] = {"step": progress.step, "reason": stopped_early}
    return finish(run, progress, results, selection, uploads)


def periodic_eval(run: Run, progress: Progress, selection) -> tuple[bool, str | None]:
    """The periodic evaluation, when one is due → (a new best to checkpoint now, why to stop early or None).

    Due every train.eval_steps, and at the last step when the best will be published (so the last weights compete).
    Every process computes the same scores from the same gathered predictions; the main process's decision is
    broadcast all the same, so the ranks cannot part ways (one stopping while the others wait in a collective).
    """
    from accelerate.utils import broadcast_object_list

    if selection is None:  # no train.eval_steps
        return False, None
    step, last = progress.step, progress.step == run.total_steps
    if not (last and selection.load_best or step % run.recipe.train.eval_steps == 0 and not last):
        return False, None
    scores = run.evaluate(step=step, final=False, subset=True)
    new_best, stop = update_best(selection, progress, scores)
    if new_best:
        progress.best["checkpoint"] = f"{rundir.CHECKPOINTS}/{ckpt.checkpoint_name(step)}"
    if run.accelerator.num_processes > 1:
        decision = [new_best, stop, progress.best, progress.evals_without_improvement]
        new_best, stop, progress.best, progress.evals_without_improvement = broadcast_object_list(decision)
    return new_best, stop


def start_uploads(run: Run):
    """The background checkpoint uploads of hub.strategy checkpoint | every_save (main process), else None."""
    hub = run.recipe.hub
    if not (hub.push and hub.strategy != "end" and run.accelerator.is_main_process):
        return None
    from hftoolkit.uploads import CheckpointUploads

    return CheckpointUploads(hub, run.out)


def finish(run: Run, progress: Progress, results: dict, selection=None, uploads=None) -> dict:
    """After the last step: final checkpoint, the best checkpoint's weights back when they are to be published,
    final evaluation on the whole eval set, model/, results.json, reports and model card, and the push when the
    recipe asks for it."""
    acc, cfg, hub = run.accelerator, run.recipe.train, run.recipe.hub
    # A final checkpoint, unless that step just saved one.
    if cfg.save_steps and progress.step % cfg.save_steps:
        saved = ckpt.save(run, progress)
        if uploads is not None:
            uploads.submit(saved)
    if uploads is not None:  # the checkpoints first, then the published model
        results["hub_uploads"] = uploads.close()
    best = progress.best
    if selection is not None and best:
        published = selection.load_best
        if published and best["step"] != progress.step:
            acc.print(
                f"loading the best checkpoint (step {best['step']}, {best['metric']} {best['value']:g}) for the "
                "final evaluation and model/"
            )
            acc.load_state(str(run.out / best["checkpoint"]))
        results["best"] = {
            "step": best["step"],
            best["metric"]: best["value"],
            "checkpoint": best["checkpoint"],
            "published": published,
        }
    results["final"] = run.evaluate(step=progress.step, final=True, subset=False)
    if run.recipe.data.streaming:
        from hftoolkit.streaming import gather_stats

        gather_stats(run)
    run.save_model()
    results = run.write_results(results)
    if acc.is_main_process:
        run.write_reports()
        if hub.push:
            from hftoolkit.hub import push_run

            url = push_run(
                run.out,
                hub.repo_id,
                private=hub.private,
                revision=hub.revision,
                merge_adapters=hub.merge_adapters,
            )
            acc.print(f"pushed to {url}")
    acc.wait_for_everyone()
    acc.end_training()
    rundir.release_lock(run.out)
    return results


def evaluate_only(recipe: Recipe) -> dict:
    """`hftoolkit eval`: score model.name_or_path on the recipe's eval data, no training."""
    run = prepare_run(recipe, mode="eval")
    run.model = run.accelerator.prepare(run.model)
    results = {"final": run.evaluate(step=0, final=True, subset=False)}
    results = run.write_results(results)
    run.accelerator.end_training()
    rundir.release_lock(run.out)
    return results
