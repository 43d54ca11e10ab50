"""Streaming training data (`data.streaming: true`): rows read lazily, never all in memory nor tokenized ahead.

On every process, each optimizer step's batches come from this pipeline:

  source: a datasets IterableDataset. Local .txt / .jsonl files are cut into byte ranges (SHARDS_PER_PROCESS per
          process), so that split_dataset_by_node hands each process its own ranges and no process reads the whole
          file; Hub datasets and .csv / .parquet / pretty-printed .json files use datasets' streaming builders (one
          shard per file: with fewer files than processes, each process reads all rows and keeps 1 in N).
  → split_dataset_by_node(rank, world_size): disjoint shares.
  → ShuffleBuffer: data.shuffle_buffer_size rows, seeded by (seed, process, pass). datasets' own shuffle buffer is
          not part of its state_dict (a resume would refill it and lose its rows), so this one is, and goes into
          every checkpoint with the source's datasets state_dict.
  → rows the task cannot use: dropped and counted on the fly (data.bad_rows=error stops at the first one).
  → data.encode_supervised / encode_documents on CHUNK_ROWS rows at a time (the map path's batch size, so
          generation documents are cut into blocks the same way) → batches → data.pack_collate / pad_collate.

The stream never ends: when a process's share runs out it starts its next pass (the shards reordered by datasets'
set_epoch, the buffer reseeded), so processes never wait for each other at an epoch boundary; train.max_steps is the
length of the run. Resume is exact: a checkpoint holds, per process, the state at the start of the chunk being
consumed and how many of its examples were used; the resumed stream re-reads that chunk and skips them.

The loader is not a torch DataLoader and is not given to accelerate.prepare: accelerate would either dispatch
batches from process 0 (its default for iterable datasets) or shard the already split stream a second time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

from hftoolkit.data import (
    EXTENSION_BUILDERS,
    _load_files,
    _short,
    check_columns,
    drop_bad_rows,
    encode_documents,
    encode_supervised,
    existing_data_file,
    make_collate,
)
from hftoolkit.errors import UserError

HEAD_ROWS = (
    10_000  # rows read from the start of the stream for checks, `plan`, a bpe tokenizer, the fingerprint
)
CHUNK_ROWS = 1000  # rows tokenized at once
SHARDS_PER_PROCESS = 16  # byte ranges per process of a local text file
SHARE_CHECK_ROWS = 1000  # data.max_bad_rows_share is checked on the running count from this many rows on
STATE_FILE = "stream_state_{rank}.json"
OFFSET = (
    "__hftoolkit_offset__"  # the byte offset of a local file's row (for messages); removed before the task
)


# --------------------------------------------------------------------------------------------- local files


def _line_number(path: Path, offset: int) -> int:
    """1-based line number of the byte at `offset` (read only when a message needs it)."""
    lines, done = 1, 0
    with path.open("rb") as f:
        while done < offset:
            chunk = f.read(min(1 << 20, offset - done))
            if not chunk:
                break
            lines += chunk.count(b"\n")
            done += len(chunk)
    return lines


def _decode(raw: bytes, path: Path, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = _line_number(path, offset)
        raise UserError(
            f"data.train_file: {path} line {line}: not UTF-8 (byte {e.start}); re-encode the file as UTF-8"
        ) from None


def _json_rows(path: Path, start: int, end: int):
    """JSON lines whose first byte lies in [start, end)."""
    with path.open("rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # to the first line that starts at or after `start`
        pos = f.tell()
        while pos < end and (raw := f.readline()):
            if raw.strip():
                try:
                    obj = json.loads(_decode(raw, path, pos))
                except json.JSONDecodeError as e:
                    line = _line_number(path, pos)
                    raise UserError(
                        f"data.train_file: {path} line {line}: malformed JSON ({e.msg}, column {e.colno})"
                    ) from None
                if not isinstance(obj, dict):
                    line = _line_number(path, pos)
                    raise UserError(
                        f"data.train_file: {path} line {line}: expected a JSON object per line, got "
                        f"{type(obj).__name__}"
                    )
                obj[OFFSET] = pos
                yield obj
            pos += len(raw)


def _previous_line_blank(f, pos: int) -> bool:
    """Whether the line ending just before byte `pos` holds only whitespace (scanned backwards from pos)."""
    i = pos - 2  # pos - 1 is the newline that ends that line
    while i >= 0:
        lo = max(0, i - 4095)
        f.seek(lo)
        for b in reversed(f.read(i - lo + 1)):
            if b == 10:
                return True
            if b not in b" \t\r\x0b\x0c":
                return False
        i = lo - 1
    return True


def _paragraphs(path: Path, start: int, end: int):
    """Paragraphs (runs of lines between lines that hold nothing or only whitespace, as data._load_paragraphs)
    whose first line starts in [start, end): a paragraph that crosses `end` is read whole by this range."""
    with path.open("rb") as f:
        prev_blank = True
        if start:
            f.seek(start - 1)
            f.readline()
            pos = f.tell()
            prev_blank = _previous_line_blank(f, pos)
            f.seek(pos)
        else:
            pos = 0
        lines: list[bytes] = []
        first = 0
        for raw in iter(f.readline, b""):
            if not raw.strip():
                if lines:
                    yield {"text": _decode(b"".join(lines), path, first).strip("\n"), OFFSET: first}
                    lines = []
                prev_blank = True
            elif lines:
                lines.append(raw)
            elif prev_blank:  # a paragraph starts here
                if pos >= end:
                    break
                first, lines, prev_blank = pos, [raw], False
            # else: the rest of a paragraph that started before `start` (the previous range's)
            pos += len(raw)
        if lines:
            yield {"text": _decode(b"".join(lines), path, first).strip("\n"), OFFSET: first}


def _read_ranges(ranges: list[dict]):
    """datasets.IterableDataset.from_generator's generator: the rows of each byte range, in order."""
    for r in ranges:
        reader = _paragraphs if r["layout"] == "paragraphs" else _json_rows
        yield from reader(Path(r["path"]), r["start"], r["end"])


def _is_json_lines(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(1 << 16).lstrip()
    if path.suffix == ".jsonl":
        return True
    first = head.split(b"\n", 1)[0].strip()
    try:
        return isinstance(json.loads(first), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def byte_ranges(path: Path, layout: str, n: int) -> list[dict]:
    size = path.stat().st_size
    cuts = [size * i // n for i in range(n + 1)]
    return [
        {"path": str(path), "start": a, "end": b, "layout": layout}
        for a, b in zip(cuts, cuts[1:], strict=False)
    ]


# --------------------------------------------------------------------------------------------- sources


@dataclasses.dataclass
class Source:
    """The unsplit training stream, and how messages name it."""

    dataset: object  # datasets.IterableDataset
    where: str
    path: Path | None = None  # a local file: messages give line numbers


def _local_file(value: str, key: str) -> Path:
    path = existing_data_file(value, key)
    if path.stat().st_size == 0:
        raise UserError(f"data: the train split is empty ({value} has no rows); check data.{key}")
    return path


def synthetic_files(recipe, write: bool = False) -> dict[str, Path]:
    """The synthetic set's files, written by `write` (the main process, once; the others only read them)."""
    from hftoolkit import synthetic

    s = recipe.data.synthetic
    out = Path(recipe.output_dir) / "synthetic_data"
    if write:
        return synthetic.make_dataset_files(recipe.task, out, s.num_train, s.num_eval, s.seed)
    return {"train": out / "train.jsonl", "validation": out / "validation.jsonl"}


def train_source(recipe, num_processes: int) -> Source:
    """The training rows as a datasets IterableDataset (local files: byte ranges; otherwise datasets' builders)."""
    from datasets import IterableDataset, load_dataset

    d = recipe.data
    if d.dataset_name is not None:
        try:
            ds = load_dataset(d.dataset_name, d.dataset_config_name, split=d.train_split, streaming=True)
        except Exception as e:  # datasets raises several types (missing repo, split, config)
            raise UserError(f"data.dataset_name: cannot stream '{d.dataset_name}' ({_short(e)})") from None
        return Source(ds, d.dataset_name)
    path = (
        synthetic_files(recipe)["train"]
        if d.synthetic is not None
        else _local_file(d.train_file, "train_file")
    )
    layout = "paragraphs" if path.suffix == ".txt" else "lines" if _is_json_lines(path) else None
    if layout is None:  # csv, parquet, a pretty-printed JSON document: datasets' builder, one shard per file
        ds = load_dataset(
            EXTENSION_BUILDERS[path.suffix], data_files=str(path), split="train", streaming=True
        )
        return Source(ds, str(path))
    ranges = byte_ranges(path, layout, SHARDS_PER_PROCESS * num_processes)
    ds = IterableDataset.from_generator(_read_ranges, gen_kwargs={"ranges": ranges})
    return Source(ds, str(path), path)


def head_rows(source: Source, n: int = HEAD_ROWS) -> list[dict]:
    """The first `n` rows of the unsplit stream (the same on every process)."""
    import itertools

    rows = []
    for row in itertools.islice(iter(source.dataset), n):
        row = dict(row)
        row.pop(OFFSET, None)
        rows.append(row)
    if not rows:
        raise UserError(f"data: the train split is empty ({source.where} has no rows); check the data source")
    return rows


def eval_split(recipe, task, write: bool = True):
    """The evaluation rows, materialised (small): validation_file, the Hub dataset's validation split (its first
    data.max_eval_samples rows when set), or the synthetic set. Checked and bad rows dropped as on the map path."""
    from datasets import Dataset, load_dataset

    d = recipe.data
    if d.dataset_name is not None:
        ds = None
        for name in dict.fromkeys((d.validation_split, "validation", "valid", "dev", "test")):
            try:
                stream = load_dataset(d.dataset_name, d.dataset_config_name, split=name, streaming=True)
            except Exception:  # a missing split: try the next usual name
                continue
            rows = list(stream.take(d.max_eval_samples) if d.max_eval_samples else stream)
            ds = Dataset.from_list(rows)
            break
        where = d.dataset_name
    elif d.synthetic is not None:
        ds = load_dataset("json", data_files=str(synthetic_files(recipe, write)["validation"]), split="train")
        where = "the synthetic data"
    elif d.validation_file is not None:
        ds = _load_files(dataclasses.replace(d, train_file=None))["validation"]
        where = d.validation_file
    else:
        ds = None
    if ds is None:
        raise UserError(
            "data.streaming: the stream is not split for evaluation; set data.validation_file (or use a dataset "
            "with a validation split)"
        )
    check_columns(task, d, ds, "validation")
    ds, bad = drop_bad_rows(task, d, ds, "validation", where)
    if d.max_eval_samples is not None:
        ds = ds.select(range(min(d.max_eval_samples, len(ds))))
    return ds, bad


def load_splits(recipe, task, acc=None, need_train: bool = True) -> tuple[dict, dict]:
    """({"train": the first HEAD_ROWS rows of the stream, "validation": the eval rows}, bad rows): the head stands in
    for the training split where the setup needs rows (column checks, `plan`, a bpe tokenizer's training text)."""
    from datasets import Dataset

    if recipe.data.eval_sets:  # named eval sets are small: loaded whole, as without streaming
        from hftoolkit.mixture import load_eval_sets

        if recipe.data.synthetic is not None and (acc is None or acc.is_main_process):
            synthetic_files(recipe, write=True)  # the stream reads its train file
        sets, set_bad = load_eval_sets(recipe, task)
        first = next(iter(sets))
        splits = {"validation": sets[first], **{f"validation/{name}": ds for name, ds in sets.items()}}
        bad = {"validation": set_bad[f"validation/{first}"], **set_bad}
    else:
        # load_splits runs on the main process first: it writes the synthetic files, the others read them.
        eval_ds, eval_bad = eval_split(recipe, task, write=acc is None or acc.is_main_process)
        splits, bad = {"validation": eval_ds}, {"validation": eval_bad}
    if need_train:
        source = train_source(recipe, acc.num_processes if acc is not None else 1)
        head = Dataset.from_list(head_rows(source))
        check_columns(task, recipe.data, head, "train")
        splits["train"] = head
    return splits, bad


def fingerprint(source: Source, head) -> str:
    """What identifies the streamed data across a resume: its head rows, and a local file's size (not its folder:
    a run directory may move) or the Hub dataset's name."""
    h = hashlib.sha256()
    if source.path is not None:
        h.update(str(source.path.stat().st_size).encode())
    else:
        h.update(source.where.encode())
    for row in head.to_list():
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- the stream


class TrainStream:
    """This process's training batches, without end (pass after pass over its share), with an exact state.

    `resumes_itself`: train.epoch_windows must not skip batches after a resume (load_state_dict positions it).
    """

    resumes_itself = True

    def __init__(self, dataset, task, tokenizer, data_cfg, *, seed, rank, world_size, batch_size, packing,
                 device, where: str, path: Path | None):  # fmt: skip
        from datasets.distributed import split_dataset_by_node

        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.task, self.tokenizer, self.cfg = task, tokenizer, data_cfg
        self.template = task.template(data_cfg)
        self.seed, self.rank, self.batch_size, self.device = seed, rank, batch_size, device
        self.where, self.path = where, path
        self.buffer_size = data_cfg.shuffle_buffer_size
        self.collate = make_collate(tokenizer.pad_token_id, packing, data_cfg.max_seq_len)
        self.packing = packing
        # The live state (what a snapshot copies); see _snapshot.
        self.epoch = 0
        self.buffer: list[dict] = []
        self.draining = False  # the share ran out: the buffer empties, then the next pass
        self.rng = self._pass_rng(0)
        self.counts = Counter()  # rows, usable, examples, truncations, "bad <reason>"
        self.passes_without_example = 0
        self._source_state = None  # datasets state to load when the pass's iterator is (re)opened
        self._rows = None
        self._chunk = None  # (snapshot before drawing it, its examples, how many were used)
        self._skip = 0

    def _pass_rng(self, epoch: int) -> random.Random:
        return random.Random(f"{self.seed}/{self.rank}/{epoch}")

    @property
    def pass_index(self) -> int:
        """The pass (0-based) the batches now being trained on come from (rows are read a chunk ahead)."""
        return self._chunk[0]["epoch"] if self._chunk is not None else self.epoch

    def set_epoch(self, epoch: int) -> None:
        """The training loop's epoch is always 0 for a stream: each process counts its own passes."""

    # ------------------------------------------------------------------ state
    def _snapshot(self) -> dict:
        return {
            "epoch": self.epoch,
            "source": self.dataset.state_dict() if self._rows is not None else self._source_state,
            "buffer": list(self.buffer),
            "draining": self.draining,
            "rng": self.rng.getstate(),
            "counts": dict(self.counts),
            "passes_without_example": self.passes_without_example,
        }

    def _restore(self, snap: dict) -> None:
        self.epoch, self.draining = snap["epoch"], snap["draining"]
        self.buffer = list(snap["buffer"])
        version, internal, gauss = snap["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.counts = Counter(snap["counts"])
        self.passes_without_example = snap["passes_without_example"]
        self._source_state, self._rows = snap["source"], None

    def state_dict(self) -> dict:
        if self._chunk is None:
            return {"chunk": self._snapshot(), "used": 0}
        return {"chunk": self._chunk[0], "used": self._chunk[2]}

    def load_state_dict(self, state: dict) -> None:
        self._restore(state["chunk"])
        self._chunk, self._skip = None, state["used"]

    def save(self, folder: Path) -> None:
        """This process's state into a checkpoint folder (every process writes its own file)."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STATE_FILE.format(rank=self.rank)).write_text(json.dumps(self.state_dict(), default=str))

    def load(self, folder: Path) -> None:
        path = folder / STATE_FILE.format(rank=self.rank)
        if not path.is_file():
            raise UserError(
                f"train.resume_from_checkpoint: {folder} holds no stream position for process {self.rank} "
                f"({path.name}); it was not saved by a streaming run of this process count"
            )
        self.load_state_dict(json.loads(path.read_text()))

    # ------------------------------------------------------------------ rows
    def _next_row(self) -> dict:
        """The next row of this process's shuffled share; passes follow each other without end."""
        while True:
            if self._rows is None:
                self.dataset.set_epoch(self.epoch)
                if self._source_state is not None:
                    self.dataset.load_state_dict(self._source_state)
                self._rows = iter(self.dataset)
            if not self.draining:
                row = next(self._rows, None)
                if row is None:
                    self.draining = True
                    self.rng.shuffle(self.buffer)
                    continue
                if len(self.buffer) < self.buffer_size:
                    self.buffer.append(row)
                    continue
                i = self.rng.randrange(self.buffer_size)
                row, self.buffer[i] = self.buffer[i], row
                return row
            if self.buffer:
                return self.buffer.pop()
            self._next_pass()

    def _next_pass(self) -> None:
        self.passes_without_example += 1
        if self.passes_without_example >= 2:  # a whole pass went by without one example
            raise UserError(
                f"data: the training stream ({self.where}) gave process {self.rank} no example in a whole pass "
                f"({self._counts_text()}); check the data, data.max_seq_len, or run on fewer processes"
            )
        self.epoch += 1
        self.draining, self._rows, self._source_state = False, None, None
        self.rng = self._pass_rng(self.epoch)

    def _counts_text(self) -> str:
        bad = sum(v for k, v in self.counts.items() if k.startswith("bad "))
        return f"{self.counts['rows']} rows read, {bad} unusable, {self.counts['dropped']} too long for the template"

    def _where_row(self, row: dict) -> str:
        if self.path is not None and OFFSET in row:
            return f"line {_line_number(self.path, row[OFFSET])}"
        return f"a row of pass {self.epoch + 1}"

    def _usable(self, row: dict) -> bool:
        """Counts the row; False for a row the task cannot use (data.bad_rows decides whether that is an error)."""
        self.counts["rows"] += 1
        problem = self.task.row_problem({k: v for k, v in row.items() if k != OFFSET}, self.cfg)
        if problem is None:
            return True
        self.counts[f"bad {problem}"] += 1
        bad = sum(v for k, v in self.counts.items() if k.startswith("bad "))
        if self.cfg.bad_rows == "error":
            raise UserError(
                f"data: {bad} unusable train row(s) in {self.where} ({problem}; rows at {self._where_row(row)}); "
                "fix them, or set data.bad_rows=drop to leave them out"
            )
        rows = self.counts["rows"]
        if rows >= SHARE_CHECK_ROWS and bad > self.cfg.max_bad_rows_share * rows:
            raise UserError(
                f"data: {bad} of {rows} train rows in {self.where} are unusable ({problem}; rows at "
                f"{self._where_row(row)} and before), more than data.max_bad_rows_share="
                f"{self.cfg.max_bad_rows_share:g}; fix the data or raise that share"
            )
        return False

    # ------------------------------------------------------------------ examples and batches
    def _encode(self, rows: list[dict]) -> list[dict]:
        rows = [{k: v for k, v in r.items() if k != OFFSET} for r in rows]
        max_len = self.cfg.max_seq_len
        if self.task.tokenization == "documents":
            examples = encode_documents(self.task, self.tokenizer, rows, self.cfg, max_len, self.packing)
        else:
            examples = encode_supervised(self.task, self.template, self.tokenizer, rows, self.cfg, max_len)
        for key in ("source_truncated", "target_truncated", "dropped"):
            self.counts[key] += sum(bool(e[key]) for e in examples)
        kept = [e for e in examples if not e["dropped"]]
        self.counts["examples"] += len(kept)
        keys = ("input_ids", "labels", "position_ids")
        return [{k: e[k] for k in keys if k in e} for e in kept]

    def _new_chunk(self) -> None:
        """Draw up to CHUNK_ROWS rows and tokenize them; the snapshot taken before is what a resume restarts from."""
        while True:
            snapshot = self._snapshot()
            rows = []
            while len(rows) < CHUNK_ROWS:
                epoch = self.epoch
                row = self._next_row()
                if self._usable(row):
                    rows.append(row)
                if self.epoch != epoch:  # a new pass began: tokenize what the previous one left
                    break
            examples = self._encode(rows) if rows else []
            if examples:
                self.passes_without_example = 0
                # After a resume, the first chunk is the checkpoint's: skip the examples it had used.
                self._chunk, self._skip = (snapshot, examples, self._skip), 0
                return

    def _take(self, n: int) -> list[dict]:
        out: list[dict] = []
        while len(out) < n:
            if self._chunk is None:
                self._new_chunk()
            snapshot, examples, used = self._chunk
            taken = examples[used : used + n - len(out)]
            out.extend(taken)
            used += len(taken)
            self._chunk = None if used == len(examples) else (snapshot, examples, used)
        return out

    def __iter__(self):
        while True:
            batch = self.collate(self._take(self.batch_size))
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict:
        """This process's counts: rows read, examples trained on, truncations, unusable rows by reason, passes."""
        c = self.counts
        return {
            "rows": c["rows"],
            "examples": c["examples"],
            "source_truncated": c["source_truncated"],
            "target_truncated": c["target_truncated"],
            "dropped": c["dropped"],
            "passes": self.epoch,
            "bad_rows": {k[4:]: v for k, v in c.items() if k.startswith("bad ")},
        }


def attach_train_stream(run, head) -> None:
    """run.train_loader = this process's TrainStream; the run's length is train.max_steps (config checked it)."""
    recipe, acc = run.recipe, run.accelerator
    source = train_source(recipe, acc.num_processes)
    run.train_loader = TrainStream(
        source.dataset, run.task, run.tokenizer, recipe.data, seed=recipe.seed, rank=acc.process_index,
        world_size=acc.num_processes, batch_size=recipe.train.per_device_train_batch_size, packing=run.packing,
        device=acc.device, where=source.where, path=source.path,
    )  # fmt: skip
    run.data_fingerprint = fingerprint(source, head)
    run.total_steps = recipe.train.max_steps
    run.data_stats["train"] = {"streamed": True}


def gather_stats(run) -> None:
    """results.json → data.train: every process's stream counts, summed (a collective: all processes call it)."""
    from accelerate.utils import gather_object

    per_process = gather_object([run.train_loader.stats()])
    total: dict = {"streamed": True, "processes": len(per_process)}
    for key in ("rows", "examples", "source_truncated", "target_truncated", "dropped"):
        total[key] = sum(s[key] for s in per_process)
    total["passes"] = [s["passes"] for s in per_process]
    bad: Counter = Counter()
    for s in per_process:
        bad.update(s["bad_rows"])
    total["bad_rows"] = dict(bad)
    run.data_stats["train"] = total
