"""Resumable checkpoints: what a checkpoint holds, how it is saved, checked and restored.

A checkpoint is a folder `OUTPUT_DIR/checkpoints/step-0000120/` written by `accelerator.save_state` into a
temporary sibling, fsynced, then renamed: a crash or `kill -9` mid-save leaves only a `.tmp-*` folder that is
ignored (and cleaned up next time), never a half-written checkpoint that `latest` would pick up.

Besides accelerate's files (weights, optimizer, scheduler, every process's RNG state), it holds TRAINER_STATE:
the loop's `Progress`, the training data's fingerprint, the training-relevant config and the process count.
`check_resume_compatible` compares them with the run about to resume and refuses, naming what changed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hftoolkit.atomic import atomic_write_json, fsync_dir, fsync_tree
from hftoolkit.config import flatten, to_dict
from hftoolkit.errors import UserError

CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "hftoolkit_state.json"

# Keys that set how long the run is: a resume may change them to extend (or shorten) the run, see
# check_resume_compatible.
LENGTH_KEYS = {"train.max_steps", "train.num_train_epochs"}
# Keys that may change between a checkpoint and its resume without changing what is trained.
RESUME_FREE_KEYS = {
    "output_dir", "report_to", "train.resume_from_checkpoint", "train.logging_steps", "train.eval_steps",
    "train.save_steps", "train.save_total_limit", "train.overwrite_output_dir", "hub", "eval",
}  # fmt: skip


@dataclass
class Progress:
    """Loop state that a checkpoint restores (besides what accelerator.save_state holds)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches consumed in the current epoch (per process)
    best: dict = field(default_factory=dict)  # {"step", "metric", "value", "checkpoint"} (selection.py)
    evals_without_improvement: int = 0  # early stopping's patience counter


def training_config(recipe) -> dict:
    """The flattened recipe minus RESUME_FREE_KEYS: what must not change across a resume."""
    flat = flatten(to_dict(recipe))
    return {
        k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in RESUME_FREE_KEYS)
    }


def data_fingerprint(dataset) -> str:
    """sha256 over the Arrow buffers of the token ids: identifies the training data, cheap even for large sets."""
    h = hashlib.sha256()
    for chunk in dataset.data.column("input_ids").chunks:
        for buf in chunk.buffers():
            if buf is not None:
                h.update(memoryview(buf))
    return h.hexdigest()[:16]


@contextlib.contextmanager
def disk_full_is_user_error(what: Path):
    """A full disk while saving becomes one clear line; the caller's temp-dir + rename keeps older files intact."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise UserError(
            f"no space left on the device while saving {what}; free some space (or lower train.save_total_limit) "
            "and resume with train.resume_from_checkpoint=latest — earlier checkpoints are intact"
        ) from None


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts only once its state file landed by rename)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [
        p
        for p in checkpoints_dir.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / TRAINER_STATE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """`latest` → newest complete checkpoint (None if there is none yet); PATH → that folder, checked."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise UserError(
            f"train.resume_from_checkpoint: '{resume}' is not a checkpoint folder (no {TRAINER_STATE}); "
            f"use 'latest' or one of {output_dir / 'checkpoints'}/step-*"
        )
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def save(run, progress: Progress) -> Path:
    """Checkpoint `run` (a run.Run) at `progress`: accelerate's state plus TRAINER_STATE."""
    state = {
        **asdict(progress),
        "total_steps": run.total_steps,
        "data_fingerprint": run.data_fingerprint,
        "training_config": training_config(run.recipe),
        "num_processes": run.accelerator.num_processes,
        "config": to_dict(run.recipe),
    }
    best = progress.best.get("checkpoint")
    path = save_checkpoint(
        run.accelerator,
        run.out / "checkpoints",
        progress.step,
        state,
        run.recipe.train.save_total_limit,
        keep_also=run.out / best if best else None,
        per_process=run.train_loader.save if run.recipe.data.streaming else None,
    )
    run.accelerator.print(f"checkpoint saved: {path}")
    return path


def adapt_to_process_count(recipe, acc, path: Path) -> dict | None:
    """Before a checkpoint of N processes resumes on M: keep the global batch (per_device × accumulation ×
    processes) by changing the accumulation to A·N/M, or refuse naming the values that would keep it. Returns what
    was adapted (None when N == M). The data position and the schedule are rescaled in `restore`."""
    saved, now = read_state(path).get("num_processes", 1), acc.num_processes
    if saved == now:
        return None
    if recipe.data.streaming:  # each process's stream position belongs to its own shards
        raise UserError(
            f"train.resume_from_checkpoint: {path} holds the stream positions of {saved} process(es) "
            f"(data.streaming); resume with accelerate launch --num_processes {saved}"
        )
    if acc.distributed_type.value in ("FSDP", "DEEPSPEED"):  # one shard of weights and optimizer per process
        raise UserError(
            f"train.resume_from_checkpoint: {path} holds sharded states of {saved} process(es); resume with "
            f"accelerate launch --num_processes {saved}"
        )
    t = recipe.train
    per_step = (
        t.gradient_accumulation_steps * saved
    )  # micro-batches of one optimizer step, all processes together
    if per_step % now:
        raise UserError(
            f"train.resume_from_checkpoint: {path} was saved by {saved} process(es) with a global batch of "
            f"{t.per_device_train_batch_size * per_step} ({t.per_device_train_batch_size} per device × "
            f"{t.gradient_accumulation_steps} accumulation × {saved}); {now} process(es) cannot keep it: resume on a "
            f"process count that divides {per_step}"
        )
    adapted = {
        "from_processes": saved,
        "to_processes": now,
        "from_gradient_accumulation_steps": t.gradient_accumulation_steps,
        "to_gradient_accumulation_steps": per_step // now,
        "global_batch": t.per_device_train_batch_size * per_step,
    }
    t.gradient_accumulation_steps = acc.gradient_accumulation_steps = per_step // now
    acc.print(
        f"resuming a checkpoint of {saved} process(es) on {now}: gradient_accumulation_steps "
        f"{adapted['from_gradient_accumulation_steps']} → {t.gradient_accumulation_steps} keeps the global batch of "
        f"{adapted['global_batch']}; the data position and the learning-rate schedule are rescaled, and the random "
        "state is reseeded from (seed, step)"
    )
    return adapted


def restore(accelerator, path: Path, scheduler=None, seed: int = 0) -> Progress:
    """Load weights, optimizer, scheduler and every process's RNG state; return the loop's position.

    On another process count than the checkpoint's (see adapt_to_process_count): the per-process position in the
    epoch is rescaled to the same global position, the prepared scheduler (which counts num_processes per step) is
    set to the same point of its curve, and every process is reseeded from (seed, step), since the saved per-process
    random states do not map onto the new processes."""
    accelerator.load_state(str(path))
    state = read_state(path)
    accelerator.print(f"resumed from {path} at step {state['step']}")
    saved, now = state.get("num_processes", 1), accelerator.num_processes
    if saved != now:
        from accelerate.utils import set_seed

        state["batches_in_epoch"] = state["batches_in_epoch"] * saved // now
        if scheduler is not None and hasattr(
            scheduler.scheduler, "lr_lambdas"
        ):  # transformers' LambdaLR schedules
            inner = scheduler.scheduler
            inner.last_epoch = state["step"] * now
            lrs = [
                base * fn(inner.last_epoch) for base, fn in zip(inner.base_lrs, inner.lr_lambdas, strict=True)
            ]
            for group, lr in zip(inner.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            inner._last_lr = lrs
        set_seed(seed + state["step"])
    return Progress(
        state["step"],
        state["epoch"],
        state["batches_in_epoch"],
        state.get("best", {}),
        state.get("evals_without_improvement", 0),
    )


def check_resume_compatible(run, path: Path) -> None:
    """Refuse to resume when the data or the training-relevant config changed, naming what changed."""
    state = read_state(path)
    # Keys the current schema no longer has cannot change what is trained (a removed option).
    old, new = state.get("training_config", {}), training_config(run.recipe)
    if run.elastic:  # adapt_to_process_count changed the accumulation to keep the global batch
        new["train.gradient_accumulation_steps"] = run.elastic["from_gradient_accumulation_steps"]
    changed = [
        f"{k}: {old.get(k)!r} → {new.get(k)!r}"
        for k in sorted(new)
        if k not in LENGTH_KEYS and old.get(k) != new.get(k)
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
    check_length(run, state, path)


def check_length(run, state: dict, path: Path) -> None:
    """A resume with another train.max_steps / num_train_epochs extends (or shortens) the run, as long as the new
    total lies beyond the checkpoint's step. The learning-rate schedule is then rebuilt for the new total and
    continues from the checkpoint's step, as transformers.Trainer does when max_steps grows: a decaying schedule
    jumps to where the longer curve is at that step."""
    step, before, after = state["step"], state.get("total_steps"), run.total_steps
    if before is None or before == after:
        return
    if after <= step:
        raise UserError(
            f"train.max_steps: {path} is already at step {step}; set train.max_steps (or num_train_epochs) beyond "
            f"{step} to extend the run"
        )
    run.extended = {
        "at_step": step,
        "from_total_steps": before,
        "to_total_steps": after,
        "learning_rate_schedule": f"rebuilt for {after} steps, continued from step {step}",
    }
    run.accelerator.print(
        f"extending the run from {before} to {after} steps at step {step}: the learning-rate schedule is rebuilt "
        f"for {after} steps and continues from step {step}"
    )


def save_checkpoint(
    accelerator,
    checkpoints_dir: Path,
    step: int,
    state: dict,
    keep: int | None,
    keep_also: Path | None = None,
    per_process=None,
) -> Path:
    """save_state into a temp folder on every process, then the main process fsyncs and renames it.

    `state` (step, epoch, fingerprints, ...) is written last, inside the temp folder, so a folder named
    step-N always holds a complete state.
    """
    final = checkpoints_dir / checkpoint_name(step)
    tmp = checkpoints_dir / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    # Every rank writes its own RNG state (and shards, under FSDP/DeepSpeed): save_state is collective.
    with disk_full_is_user_error(final):
        try:
            accelerator.save_state(str(tmp), safe_serialization=True)
            if per_process is not None:  # e.g. each process's stream position (streaming.TrainStream.save)
                per_process(tmp)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if os.environ.get("HFTOOLKIT_TEST_SAVE_DELAY"):
        # Test hook (tests/test_resume.py): hold the temp folder half-written for N seconds, so a test can
        # kill -9 or SIGTERM the run in the middle of a save deterministically.
        time.sleep(float(os.environ["HFTOOLKIT_TEST_SAVE_DELAY"]))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with disk_full_is_user_error(final):
            atomic_write_json(tmp / TRAINER_STATE, state)
            fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(checkpoints_dir)
        if keep is not None:  # the newest `keep`, and `keep_also` (the best checkpoint) whatever its age
            for old in list_checkpoints(checkpoints_dir)[:-keep]:
                if keep_also is None or old.resolve() != keep_also.resolve():
                    shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
