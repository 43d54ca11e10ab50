"""Atomic writes, resumable checkpoints and their fingerprints.

A checkpoint is a folder `OUTPUT_DIR/checkpoints/step-000120/` written by `accelerator.save_state` into a
temporary sibling, fsynced, then renamed: a crash or `kill -9` mid-save leaves only a `.tmp-*` folder that is
ignored (and cleaned up next time), never a half-written checkpoint that `latest` would pick up.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from hftoolkit.errors import UserError

CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "hftoolkit_state.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A temp folder beside its final place (same filesystem, so the rename is atomic), usual permissions."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~_umask())
    return path


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def fingerprint(obj) -> str:
    """Stable short hash of a JSON-able object (config sections, data identity)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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


def save_checkpoint(accelerator, checkpoints_dir: Path, step: int, state: dict, keep: int | None) -> Path:
    """save_state into a temp folder on every process, then the main process fsyncs and renames it.

    `state` (step, epoch, fingerprints, ...) is written last, inside the temp folder, so a folder named
    step-N always holds a complete state.
    """
    final = checkpoints_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = checkpoints_dir / f".tmp-{CHECKPOINT_PREFIX}{step:07d}"
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    # Every rank writes its own RNG state (and shards, under FSDP/DeepSpeed): save_state is collective.
    with disk_full_is_user_error(final):
        try:
            accelerator.save_state(str(tmp), safe_serialization=True)
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
        _fsync_dir(checkpoints_dir)
        if keep is not None:
            for old in list_checkpoints(checkpoints_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
