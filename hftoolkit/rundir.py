"""The run directory's files: one reader and one writer each (layout: docs/run-directory.md).

    config.yaml         the resolved recipe (config.save_recipe), written before step 0
    metrics.jsonl       one JSON object per line: {"kind": "train" | "eval", "step": N, ...}
    results.json        {"baseline": {...}, "final": {...}, "metric_config", "eval_dataset", "data"}
    predictions.jsonl   one line per evaluation example of the final evaluation
    model/hftoolkit.json  ModelInfo: how to prompt and decode the saved model

A run that stopped early or was eval-only lacks some of these, so every reader tolerates missing files and keys;
a file that exists but does not parse is a one-line UserError naming it.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hftoolkit.atomic import atomic_write_json, atomic_write_text
from hftoolkit.errors import UserError

logger = logging.getLogger(__name__)

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
PREDICTIONS = "predictions.jsonl"
MODEL_DIR = "model"
MODEL_INFO = "hftoolkit.json"
CHECKPOINTS = "checkpoints"
LOCK = ".hftoolkit.lock"
# What makes an output_dir "hold a run" (train refuses to write into it without resume or overwrite).
RUN_FILES = (RESULTS, METRICS, CHECKPOINTS, MODEL_DIR)


# ---------------------------------------------------------------------------------------------- generic readers


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON file's top-level object ({} if the file is missing or holds something else); invalid JSON is a
    UserError that names the file, the position and `fix`."""
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}): {fix}") from None
    return loaded if isinstance(loaded, dict) else {}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, skipping a torn last line (a run killed mid-write) with a warning."""
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("skipping unreadable line in %s", path)
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- metrics.jsonl


def append_metrics(run_dir: Path, record: dict) -> None:
    """One line per train log or evaluation. Appended (not rewritten) so a long run costs O(1) per line."""
    with (Path(run_dir) / METRICS).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop the lines written after the checkpoint's step (they will be written again)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    keep = [row for row in read_jsonl(path) if step and row.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines) of metrics.jsonl."""
    train, evals = [], []
    for row in read_jsonl(Path(run_dir) / METRICS):
        (evals if row.get("kind") == "eval" else train).append(row)
    return train, evals


# ---------------------------------------------------------------------------------------------- results.json


def read_results(run_dir: Path) -> dict:
    return read_json_object(Path(run_dir) / RESULTS, "re-run the evaluation")


def write_results(run_dir: Path, results: dict) -> None:
    atomic_write_json(Path(run_dir) / RESULTS, results)


# ---------------------------------------------------------------------------------------------- predictions.jsonl


def write_predictions(run_dir: Path, rows: list[dict]) -> None:
    """rows: {prompt, references, prediction, score, stopped} per example, in dataset order."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write_text(Path(run_dir) / PREDICTIONS, text)


def read_predictions(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / PREDICTIONS)


# ---------------------------------------------------------------------------------------------- model/hftoolkit.json


@dataclass
class ModelInfo:
    """What `hftoolkit generate`, `merge`, the model card and the Hub need to use a saved model as trained:
    its task, its prompt template and how it was decoded during evaluation."""

    task: str
    prompt_template: str | None = None
    source_field: str | None = None
    target_prefix: str = " "
    stop_strings: list[str] = field(default_factory=list)
    max_new_tokens: int | None = None
    num_beams: int | None = 1
    max_seq_len: int | None = None
    data: dict[str, Any] = field(default_factory=dict)  # the recipe's data.*_lang and data.*_column keys

    def write(self, model_dir: Path) -> None:
        atomic_write_json(Path(model_dir) / MODEL_INFO, dataclasses.asdict(self))

    @classmethod
    def read(cls, model_dir: str | os.PathLike) -> ModelInfo | None:
        """The folder's hftoolkit.json, or None when it has none (a plain Hub checkpoint)."""
        raw = read_json_object(Path(model_dir) / MODEL_INFO, "fix it or re-save the model")
        if not raw.get("task"):
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


# ---------------------------------------------------------------------------------------------- a whole run


@dataclass
class RunRecord:
    """Everything a report or a model card needs from one run directory (read back, never written)."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] | None = None
    train: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl lines with kind == "train"
    evals: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl lines with kind == "eval"
    predictions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def task(self) -> str:
        return str(self.config.get("task") or "generation")

    @property
    def model_name(self) -> str:
        model = self.config.get("model") or {}
        if model.get("init"):
            init = model["init"]
            preset = init.get("preset") if isinstance(init, dict) else init
            return f"init:{preset}"
        return str(model.get("name_or_path") or "-")

    @property
    def steps(self) -> int | None:
        steps = [line["step"] for line in self.train if isinstance(line.get("step"), int)]
        return max(steps) if steps else None

    def baseline(self) -> dict[str, float]:
        return dict((self.results or {}).get("baseline") or {})

    def final(self) -> dict[str, float]:
        return dict((self.results or {}).get("final") or {})


def read_run(run_dir: str | os.PathLike, *, require_results: bool = False) -> RunRecord:
    """Load config.yaml, results.json, metrics.jsonl and predictions.jsonl, whichever exist."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"run directory {path} does not exist: pass the output_dir of a training run")
    run = RunRecord(path=path)
    config_file = path / CONFIG
    if config_file.is_file():
        try:
            loaded = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise UserError(
                f"{config_file} is not valid YAML ({type(err).__name__}): fix or restore it"
            ) from None
        run.config = loaded if isinstance(loaded, dict) else {}
    if require_results and not (path / RESULTS).is_file():
        raise UserError(f"{path / RESULTS} is missing: {path} is not a finished run (train or eval it first)")
    run.results = read_results(path)
    run.train, run.evals = read_metrics(path)
    run.predictions = read_predictions(path)
    return run


# ---------------------------------------------------------------------------------------------- one run per folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def acquire_lock(run_dir: Path, say=print) -> None:
    """Make this process the only run writing into `run_dir` (the launch's main process calls it).

    The lock file (process id, host, start time) appears whole or not at all: written beside it, then hard-linked
    into place, which fails if another run holds it. A lock whose process is gone from this host is taken over with
    a message; one held by a live process, or by another host, refuses the run. Released at exit (and by
    `release_lock`); a lock of this very process (an earlier run in the same Python session) is reused.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f"{LOCK}.{os.getpid()}"
    tmp.write_text(json.dumps(me))
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                holder = read_json_object(path, "delete it if no run is using the folder")
                if holder.get("host") != me["host"] or (
                    holder.get("pid") != me["pid"] and _alive(holder["pid"])
                ):
                    raise UserError(
                        f"output_dir: {run_dir} is in use by another run (process {holder.get('pid')} on "
                        f"{holder.get('host')}, started {holder.get('started')}); wait for it to end or choose "
                        "another output_dir"
                    ) from None
                if holder.get("pid") != me["pid"]:
                    say(f"output_dir: taking over the lock of process {holder.get('pid')} (started "
                        f"{holder.get('started')}), which is no longer running")  # fmt: skip
                path.unlink(missing_ok=True)
        else:
            raise UserError(f"output_dir: could not lock {run_dir} ({path} keeps reappearing); try again")
    finally:
        tmp.unlink(missing_ok=True)
    atexit.register(release_lock, run_dir)


def release_lock(run_dir: Path) -> None:
    """Remove `run_dir`'s lock if this process holds it."""
    path = Path(run_dir) / LOCK
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
