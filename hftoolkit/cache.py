"""The tokenize-once cache: tokenized splits saved under a key of everything that changes them.

A run, its other ranks, `plan`, `eval` and `hftoolkit preprocess` (run ahead on a CPU box) share one entry per
(raw split content, tokenizer, template and data options, max length, packing, code). datasets' own map cache
cannot do this: it keys on the closure (which names functions, not their code), keeps nothing for in-memory
datasets (.txt files, mixtures), keys local files on their path and modification time (so the synthetic data of
two run directories never match), and says nothing about whether it hit.

Layout: ROOT/<key>/{dataset/ (save_to_disk), stats.json, key.json (the key's parts, readable)}, and ROOT/builds.log
(a line per build: when, key, host:pid). An entry is built in ROOT/.tmp-<key>-<host>-<pid>/ and renamed into place,
so a killed build leaves no half entry and two builders of one key (two nodes, preprocess beside a run) end with
one entry.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from hftoolkit.errors import UserError

# Data keys left out of the key: where the cache lives and how many processes build it cannot change the examples,
# and the keys that only choose the raw rows (files, splits, limits, bad-row policy) are covered by the content hash,
# so the same rows under another path or output_dir (the synthetic data of plan and train) share one entry.
NOT_IN_KEY = (
    "preprocessing_num_workers", "cache_dir", "cache_tokenized", "dataset_name", "dataset_config_name",
    "train_file", "validation_file", "synthetic", "train_split", "validation_split", "validation_split_percentage",
    "max_train_samples", "max_eval_samples", "bad_rows", "max_bad_rows_share", "sample_by",
)  # fmt: skip


BUILDS_LOG = "builds.log"


@dataclass
class CacheInfo:
    """How a split's tokenized examples were obtained, for the log line and `preprocess`."""

    status: str  # hit | built | off
    path: Path | None = None
    seconds: float = 0.0
    workers: int = 1

    def describe(self) -> str:
        if self.status == "off":
            return f"tokenized in {self.seconds:.1f} s (data.cache_tokenized=false)"
        size = format_size(directory_size(self.path))
        if self.status == "hit":
            return f"tokenized cache hit: {self.path} ({size}, loaded in {self.seconds:.1f} s)"
        return (
            f"tokenized cache miss: built with {self.workers} worker(s) in {self.seconds:.1f} s, "
            f"saved to {self.path} ({size})"
        )


def cache_root(data_cfg) -> Path:
    """data.cache_dir, else $HFTOOLKIT_CACHE, else a folder beside datasets' own cache (HF_DATASETS_CACHE)."""
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    if os.environ.get("HFTOOLKIT_CACHE"):
        return Path(os.environ["HFTOOLKIT_CACHE"]).expanduser()
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "hftoolkit-tokenized"


def content_fingerprint(ds) -> str:
    """sha256 over the split's rows in order (Arrow IPC of each batch, which writes sliced and index-mapped data
    as its logical rows) and its features: equal content, equal key, whatever file or process produced it."""
    h = hashlib.sha256(json.dumps(ds.features.to_dict(), sort_keys=True).encode())
    h.update(str(len(ds)).encode())
    for table in ds.with_format("arrow").iter(batch_size=10_000):
        for batch in table.combine_chunks().to_batches():
            h.update(batch.serialize())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what the tokenizer does, not its name: the fast tokenizer's full JSON (vocab, merges, normalizer,
    pre-tokenizer, added and special tokens) without its call-time truncation/padding state, plus the special
    tokens transformers adds on top."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:  # a slow (Python) tokenizer: datasets' pickling hash of the whole object
        from datasets.fingerprint import Hasher

        h.update(Hasher.hash(tokenizer).encode())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps([special, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()


@functools.cache
def _own_code_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def key_parts(task, tokenizer, ds, data_cfg, max_len: int, packing: bool, code_digest: str) -> dict:
    """Everything the tokenized examples depend on, as a readable dict (written to key.json)."""
    import tokenizers
    import transformers

    # data.prompt_template is in the key as the template the task resolves it to (its own part, below).
    options = {
        k: v
        for k, v in dataclasses.asdict(data_cfg).items()
        if k not in NOT_IN_KEY and k != "prompt_template"
    }
    template = task.template(data_cfg)
    return {
        "raw_content": content_fingerprint(ds),
        "raw_rows": len(ds),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenizer_name": getattr(tokenizer, "name_or_path", ""),
        "task": task.name,
        "template": dataclasses.asdict(template),
        "data_options": options,
        "max_len": max_len,
        # Only documents are packed at tokenization time; prompt/target examples are packed by the collator.
        "packing": packing if task.tokenization == "documents" else None,
        "code": [code_digest, _own_code_digest()],
        "versions": [tokenizers.__version__, transformers.__version__],
    }


def _keyed(parts: dict) -> dict:
    """The parts the key hashes: all but the tokenizer's name (written to key.json for people only: the same
    tokenizer saved into a run's model/ folder and loaded from there by `eval` is the same tokenizer)."""
    return json.loads(json.dumps({k: v for k, v in parts.items() if k != "tokenizer_name"}, default=str))


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(_keyed(parts), sort_keys=True).encode()).hexdigest()[:24]


def lookup(root: Path, key: str, parts: dict):
    """(dataset, stats dict) of a complete entry whose recorded parts match, else None."""
    from datasets import load_from_disk

    entry = root / key
    try:
        recorded = json.loads((entry / "key.json").read_text())
        stats = json.loads((entry / "stats.json").read_text())
    except (OSError, ValueError):
        return None
    if _keyed(recorded) != _keyed(parts):
        return None
    return load_from_disk(str(entry / "dataset")), stats


def new_build_dir(root: Path, key: str) -> Path:
    """A private folder on the cache's filesystem (so the final rename is atomic); removes this host's leftovers
    of the same key from builds that were killed."""
    host = socket.gethostname()
    work = root / f".tmp-{key}-{host}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob(f".tmp-{key}-{host}-*"):
            if not _alive(int(old.name.rsplit("-", 1)[1])):
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
    except OSError as e:
        raise UserError(
            f"data.cache_dir: cannot write the tokenized cache in {root} ({e.strerror}); set data.cache_dir to a "
            "writable folder, or data.cache_tokenized=false"
        ) from None
    return work


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(work: Path, root: Path, key: str, dataset, stats: dict, parts: dict):
    """Save into `work`, rename it to ROOT/<key>; returns the entry's (dataset, stats) loaded from there. If another
    builder got there first, its entry is used and ours dropped."""
    dataset.save_to_disk(str(work / "dataset"))
    (work / "stats.json").write_text(json.dumps(stats))
    (work / "key.json").write_text(json.dumps(parts, indent=1, sort_keys=True, default=str))
    for leftover in work.iterdir():
        if leftover.name not in ("dataset", "stats.json", "key.json"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    note = ""
    try:
        os.rename(work, root / key)
    except OSError:  # the entry exists: a concurrent builder of the same key finished first
        shutil.rmtree(work, ignore_errors=True)
        note = " (discarded: another builder's entry was there first)"
    with (root / BUILDS_LOG).open("a") as log:  # who built what: one short line per build, appended
        log.write(
            f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {key} built by {socket.gethostname()}:{os.getpid()}{note}\n"
        )
    found = lookup(root, key, parts)
    if found is None:
        raise UserError(
            f"data.cache_dir: {root / key} is not a complete cache entry; delete it and run again"
        )
    return found


def directory_size(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def format_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
