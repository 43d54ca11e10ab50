"""Load (Hub / local files / synthetic) → format via the task → tokenize with a loss mask → pack or pad.

Label rules (the ones other toolkits get wrong):
- prompt tokens are labelled -100; the target and the EOS appended to it keep their labels;
- padding is masked by length (the collator), never by token id — GPT-2's pad token *is* EOS;
- when prompt + target exceed max_seq_len the source field is truncated, not the target; a target that
  alone exceeds the budget is truncated (and loses its EOS, since it does not end there) and counted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hftoolkit.errors import UserError
from hftoolkit.speedups import target_positions

logger = logging.getLogger(__name__)

EXTENSION_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


# --------------------------------------------------------------------------------------------- loading


def _check_text_file(path: Path, key: str) -> int:
    """Fail early, naming the line, on undecodable bytes or malformed JSON lines (datasets' own errors do not).
    Returns the number of non-blank lines (a pretty-printed JSON document counts as 1)."""
    is_jsonl = path.suffix == ".jsonl"
    rows = 0
    with path.open("rb") as f:
        head = f.read(1)
        f.seek(0)
        is_jsonl = is_jsonl or (path.suffix == ".json" and head == b"{")
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{key}: {path} line {lineno}: not UTF-8 (byte {e.start}); re-encode the file as UTF-8"
                ) from None
            rows += bool(line.strip())
            if is_jsonl and line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    if lineno == 1 and path.suffix == ".json":
                        return 1  # a pretty-printed JSON document, not JSON lines: let datasets parse it
                    raise UserError(
                        f"{key}: {path} line {lineno}: malformed JSON ({e.msg}, column {e.colno})"
                    ) from None
                if not isinstance(obj, dict):
                    raise UserError(
                        f"{key}: {path} line {lineno}: expected a JSON object per line, got {type(obj).__name__}"
                    )
    return rows


def existing_data_file(value: str, key: str) -> Path:
    """data.<key>'s file, which must exist and have an extension datasets can read."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"data.{key}: {value}: no such file")
    if path.suffix not in EXTENSION_BUILDERS:
        raise UserError(
            f"data.{key}: {value}: unsupported extension '{path.suffix}' (use {', '.join(EXTENSION_BUILDERS)})"
        )
    return path


def _load_files(data_cfg):
    from datasets import load_dataset

    files = {}
    for split, key in (("train", "train_file"), ("validation", "validation_file")):
        value = getattr(data_cfg, key)
        if value is None:
            continue
        path = existing_data_file(value, key)
        # datasets fails on a file without rows with an unrelated message (StopIteration, "no data"). A CSV's first
        # line is its header.
        if path.suffix in (".txt", ".json", ".jsonl", ".csv"):
            if _check_text_file(path, f"data.{key}") <= (path.suffix == ".csv"):
                raise UserError(f"data: the {split} split is empty ({value} has no rows); check data.{key}")
        files[split] = str(path)
    builders = {EXTENSION_BUILDERS[Path(p).suffix] for p in files.values()}
    if len(builders) > 1:
        raise UserError(f"data.train_file/validation_file: mixed formats {sorted(builders)}; use one format")
    builder = builders.pop()
    if builder == "text":
        return _load_paragraphs(files, data_cfg.sample_by)
    try:
        return load_dataset(builder, data_files=files)
    except Exception as e:  # datasets wraps parser errors in several types
        raise UserError(f"data: cannot read {', '.join(files.values())} as {builder} ({_short(e)})") from None


def _load_paragraphs(files: dict[str, str], sample_by: str = "paragraph"):
    """.txt files, by default one example per paragraph: a line is too short a document once position ids restart
    and attention is blocked at every document boundary. Paragraphs are separated by one or more lines that hold
    nothing or only whitespace (WikiText's " \n" lines; datasets' paragraph mode needs exactly "\n\n", and reads a
    corpus whose blank lines carry spaces as one example). sample_by=line: one example per non-blank line;
    document: the whole file is one example."""
    from datasets import Dataset, DatasetDict

    splits = {}
    for split, path in files.items():
        text = Path(path).read_text(encoding="utf-8")
        splits[split] = Dataset.from_dict({"text": split_text(text, sample_by)})
    return DatasetDict(splits)


def split_text(text: str, sample_by: str) -> list[str]:
    """The examples of a .txt file's text (see _load_paragraphs); lines keep their own spaces, not their newline."""
    if sample_by == "document":
        return [text.strip("\n")] if text.strip() else []
    lines = text.split("\n")
    if sample_by == "line":
        return [line for line in lines if line.strip()]
    # A paragraph: a run of lines with text (a file may start with WikiText's " \n" line too).
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    return paragraphs + (["\n".join(current)] if current else [])


def _short(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


def load_raw_splits(recipe, output_dir: Path, task, with_validation: bool = True) -> tuple[dict, dict]:
    """({"train": Dataset, "validation": Dataset}, {split: {"<reason> <column>": rows dropped}}) per the recipe's
    data section (synthetic / files / Hub): columns checked against the task, and the rows it cannot use dropped
    from each source split before a validation part is held out (so data.max_bad_rows_share applies to the file).
    with_validation=False: the training data alone (the run evaluates on data.eval_sets)."""
    from datasets import DatasetDict, load_dataset

    d = recipe.data
    if d.sources is not None or d.eval_sets is not None:  # several datasets: hftoolkit.mixture
        from hftoolkit.mixture import load_splits

        return load_splits(recipe, output_dir, task)
    if d.synthetic is not None:
        from hftoolkit import synthetic

        # Files on disk, then the same local-file path as user data (and datasets' cache keys on their content).
        paths = synthetic.make_dataset_files(
            recipe.task,
            output_dir / "synthetic_data",
            d.synthetic.num_train,
            d.synthetic.num_eval,
            d.synthetic.seed,
        )
        raw = load_dataset("json", data_files={k: str(v) for k, v in paths.items()})
    elif d.dataset_name is not None:
        try:
            raw = load_dataset(d.dataset_name, d.dataset_config_name)
        except Exception as e:
            raise UserError(f"data.dataset_name: cannot load '{d.dataset_name}' ({_short(e)})") from None
    else:
        raw = _load_files(d)
    if not isinstance(raw, DatasetDict):
        raw = DatasetDict({d.train_split: raw})
    names = list(raw.keys())
    train_name = d.train_split if d.train_split in raw else ("train" if "train" in raw else None)
    eval_name = next(
        (n for n in (d.validation_split, "validation", "valid", "dev", "test") if n in raw), None
    )
    eval_name = eval_name if with_validation else None
    if train_name is None and eval_name is None:
        raise UserError(f"data.train_split: split '{d.train_split}' not found (splits: {', '.join(names)})")
    sources, bad_rows = {"train": train_name, "validation": eval_name}, {}
    for split, name in sources.items():
        if name is not None:
            check_columns(task, d, raw[name], split)
            raw[name], bad_rows[split] = drop_bad_rows(task, d, raw[name], split, split_source(d, split))
    splits = {}
    if train_name is not None and eval_name is not None:
        splits = {"train": raw[train_name], "validation": raw[eval_name]}
    elif train_name is not None and not with_validation:
        splits = {"train": raw[train_name]}
    elif train_name is not None:
        splits = _hold_out_validation(raw[train_name], d.validation_split_percentage, recipe.seed)
    else:  # only an eval split (e.g. `hftoolkit eval` with validation_file alone)
        splits = {"validation": raw[eval_name]}
    for split, limit in (("train", d.max_train_samples), ("validation", d.max_eval_samples)):
        if split in splits and limit is not None:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
    for split, ds in splits.items():
        if len(ds) == 0:
            raise UserError(f"data: the {split} split is empty; check the file or data.{split}_split")
    return splits, bad_rows


def _hold_out_validation(ds, percentage: int, seed: int) -> dict:
    """{"train", "validation"} from a dataset without a validation split: `percentage` % held out, seeded."""
    if len(ds) < 2:  # datasets rounds the held-out part up: one row would leave no training row
        raise UserError(
            f"data: {len(ds)} training row(s) are too few to hold out {percentage}% for validation; "
            "set data.validation_file (or a dataset with a validation split)"
        )
    held = ds.train_test_split(test_size=percentage / 100, seed=seed)
    logger.info("no validation split: held out %d%% of train", percentage)
    return {"train": held["train"], "validation": held["test"]}


def split_source(data_cfg, split: str) -> str:
    """Where a split's rows come from, for messages: its file, the Hub dataset, or the synthetic set."""
    if data_cfg.synthetic is not None:
        return "the synthetic data"
    if data_cfg.dataset_name is not None:
        return data_cfg.dataset_name
    return (data_cfg.validation_file if split == "validation" else None) or data_cfg.train_file


def check_columns(task, data_cfg, ds, split: str) -> None:
    columns = list(ds.column_names)
    for name in task.required_columns(data_cfg, columns):
        if name not in columns:
            raise UserError(
                f"data: column '{name}' not in the {split} data (columns: {', '.join(columns)}); "
                "set the task's column key (e.g. data.text_column)"
            )
    # Language keys, dict layouts, template placeholders: fail on row 0 rather than mid-map.
    task.template(data_cfg).check(list(task.fields(ds[0], data_cfg)))
    task.references(ds[0], data_cfg)


def drop_bad_rows(task, data_cfg, ds, split: str, where: str):
    """(ds without the rows the task cannot use, {"<reason> <column>": count}); see Task.row_problem.

    data.bad_rows=error refuses any such row; drop refuses more than data.max_bad_rows_share of the split. Either
    error names `where` (the file or dataset), the first offending rows (1-based, in split order) and the counts.
    """
    counts: dict[str, int] = {}
    bad: list[int] = []
    # Batches of columns, rebuilt into rows here: datasets' own row-by-row iteration is ~3× slower.
    for start, batch in zip(range(0, len(ds), 1000), ds.iter(batch_size=1000), strict=False):
        for offset, values in enumerate(zip(*batch.values(), strict=True)):
            if (problem := task.row_problem(dict(zip(batch, values, strict=True)), data_cfg)) is not None:
                counts[problem] = counts.get(problem, 0) + 1
                bad.append(start + offset)
    if not bad:
        return ds, counts
    summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    first = ", ".join(str(i + 1) for i in bad[:5]) + (", …" if len(bad) > 5 else "")
    if len(bad) == len(ds):
        raise UserError(
            f"data: the {split} split of {where} is empty once its unusable rows are dropped ({summary})"
        )
    if data_cfg.bad_rows == "error":
        raise UserError(
            f"data: {len(bad)} unusable {split} row(s) in {where} ({summary}; rows {first}); fix them, or set "
            "data.bad_rows=drop to leave them out"
        )
    if len(bad) > data_cfg.max_bad_rows_share * len(ds):
        raise UserError(
            f"data: {len(bad)} of {len(ds)} {split} rows in {where} are unusable ({summary}; rows {first}), more than "
            f"data.max_bad_rows_share={data_cfg.max_bad_rows_share:g}; fix the data or raise that share"
        )
    keep = sorted(set(range(len(ds))) - set(bad))
    return ds.select(keep), counts


# --------------------------------------------------------------------------------------------- tokenizing


@dataclass
class Stats:
    """How many examples were cut to fit max_seq_len (reported by `plan`, logged by train)."""

    examples: int = 0
    source_truncated: int = 0
    target_truncated: int = 0
    dropped: int = 0  # not trained on: the template alone does not fit in max_seq_len
    prompt_lengths: list[int] = field(default_factory=list)
    target_lengths: list[int] = field(default_factory=list)
    cache: object = None  # hftoolkit.cache.CacheInfo: hit, built or off, where, how long

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, list) and k != "cache"}


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_prompts(task, template, tokenizer, rows: list[dict], data_cfg, budget: int) -> list[list[int]]:
    """Prompt token ids, the source field truncated so each prompt fits `budget` tokens."""
    pieces = [template.pieces(task.fields(r, data_cfg)) for r in rows]
    pre, src, suf = (_ids(tokenizer, [p[i] for p in pieces]) for i in range(3))
    out = []
    for a, s, b in zip(pre, src, suf, strict=True):
        room = max(budget - len(a) - len(b), 0)
        out.append(a + s[:room] + b)
    return out


STAT_COLUMNS = ("prompt_len", "target_len", "source_truncated", "target_truncated", "dropped")


def encode_supervised(task, template, tokenizer, rows: list[dict], data_cfg, max_len: int) -> list[dict]:
    """Prompt/target examples: input_ids = prompt + target + EOS; labels = -100 on the prompt."""
    eos = tokenizer.eos_token_id
    pieces = [template.pieces(task.fields(r, data_cfg)) for r in rows]
    pre, src, suf = (_ids(tokenizer, [p[i] for p in pieces]) for i in range(3))
    tgt = _ids(tokenizer, [template.target_prefix + task.target(r, data_cfg) for r in rows])
    examples = []
    for a, s, b, t in zip(pre, src, suf, tgt, strict=True):
        fixed = len(a) + len(b)
        target = t + [eos]
        stat = {"source_truncated": False, "target_truncated": False, "dropped": False}
        if fixed + 1 > max_len:
            # The template alone does not fit: nothing sensible to train on. Kept as a row so it is counted.
            examples.append(
                {
                    "input_ids": [],
                    "labels": [],
                    "prompt_len": fixed,
                    "target_len": len(target),
                    **stat,
                    "dropped": True,
                }
            )
            continue
        if fixed + len(target) > max_len:
            target = t[: max_len - fixed]  # no EOS: the target does not end here
            stat["target_truncated"] = True
        room = max_len - fixed - len(target)
        if len(s) > room:
            s = s[:room]
            stat["source_truncated"] = True
        prompt = a + s + b
        examples.append(
            {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target,
             "prompt_len": len(prompt), "target_len": len(target), **stat}
        )  # fmt: skip
    return examples


def encode_documents(task, tokenizer, rows: list[dict], data_cfg, max_len: int, packing: bool) -> list[dict]:
    """Generation: documents + EOS. Packed: one stream cut into max_len blocks with position ids restarting at
    every document (so documents never attend to each other). Unpacked: each document in max_len chunks."""
    return blocks_from_documents(document_ids(task, tokenizer, rows, data_cfg), max_len, packing)


def document_ids(task, tokenizer, rows: list[dict], data_cfg) -> list[list[int]]:
    """Each row's document + EOS, [] for an empty document (kept, so rows and results stay aligned)."""
    eos = tokenizer.eos_token_id
    return [d + [eos] if d else [] for d in _ids(tokenizer, [task.target(r, data_cfg) for r in rows])]


def blocks_from_documents(documents: list[list[int]], max_len: int, packing: bool) -> list[dict]:
    """Training examples from tokenized documents (see encode_documents); empty documents are skipped."""
    docs = [d for d in documents if d]
    stat = {"prompt_len": 0, "source_truncated": False, "dropped": False}
    out = []
    if not packing:
        for d in docs:
            for i in range(0, len(d), max_len):
                chunk = d[i : i + max_len]
                if len(chunk) > 1:
                    out.append({"input_ids": chunk, "labels": list(chunk), **stat,
                                "target_len": len(chunk), "target_truncated": len(d) > max_len})  # fmt: skip
        return out
    ids, pos, labels = [], [], []
    for d in docs:
        ids.extend(d)
        pos.extend(range(len(d)))
        # The first token of a document is not predicted from the previous document's EOS.
        labels.extend([-100] + d[1:])
    for i in range(0, len(ids), max_len):
        block = pos[i : i + max_len]
        # A document continued from the previous block restarts its positions at 0 in this block.
        reset = next((j for j in range(1, len(block)) if block[j] == 0), len(block))
        block = [p - block[0] for p in block[:reset]] + block[reset:]
        if len(block) > 1:
            out.append({"input_ids": ids[i : i + max_len], "labels": labels[i : i + max_len], "position_ids": block,
                        **stat, "target_len": len(block), "target_truncated": False})  # fmt: skip
    return out


@functools.cache
def tokenization_code_digest() -> str:
    """sha256 of the source that turns rows into training examples (this file and the tasks)."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for path in [root / "data.py", *sorted((root / "tasks").glob("*.py"))]:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def tokenize_split(task, tokenizer, ds, data_cfg, max_len: int, packing: bool):
    """Tokenize a raw split into training examples, through the tokenize-once cache (hftoolkit.cache): a hit loads
    the saved examples; a miss encodes with data.preprocessing_num_workers processes and saves them. Returns
    (dataset, Stats), with Stats.cache saying which happened and where."""
    from hftoolkit import cache

    timer = cache.Timer()
    # A process per 1000-row batch at most: a small eval split is not worth starting processes for.
    workers = min(data_cfg.preprocessing_num_workers or 1, -(-len(ds) // 1000))
    if not data_cfg.cache_tokenized:
        encoded, stats = _encode_split(task, tokenizer, ds, data_cfg, max_len, packing, workers, None)
        stats.cache = cache.CacheInfo("off", None, timer.seconds(), workers)
        return encoded, stats
    parts = cache.key_parts(task, tokenizer, ds, data_cfg, max_len, packing, tokenization_code_digest())
    root, key = cache.cache_root(data_cfg), cache.key_of(parts)
    found, status = cache.lookup(root, key, parts), "hit"
    if found is None:
        status, work = "built", cache.new_build_dir(root, key)
        try:
            encoded, stats = _encode_split(task, tokenizer, ds, data_cfg, max_len, packing, workers, work)
            found = cache.publish(work, root, key, encoded, {**stats.__dict__, "cache": None}, parts)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    dataset, saved = found
    stats = Stats(**{**saved, "cache": cache.CacheInfo(status, root / key, timer.seconds(), workers)})
    return dataset, stats


def _example_columns(examples: list[dict], position_ids: bool) -> dict:
    keys = ["input_ids", "labels", *(["position_ids"] if position_ids else []), *STAT_COLUMNS]
    return {k: [e[k] for e in examples] for k in keys}


def _example_features(position_ids: bool):
    """int32 token ids (half of datasets' default int64 on disk and in the cache), bool flags."""
    from datasets import Features, List, Value

    ids = List(Value("int32"))
    flags = {k: Value("bool") for k in ("source_truncated", "target_truncated", "dropped")}
    return Features(
        {"input_ids": ids, "labels": ids, **({"position_ids": ids} if position_ids else {}),
         "prompt_len": Value("int32"), "target_len": Value("int32"), **flags}
    )  # fmt: skip


def _encode_split(
    task, tokenizer, ds, data_cfg, max_len: int, packing: bool, workers: int, work: Path | None
):
    """datasets.map over batches of 1000 rows with `workers` processes; map's files go to `work` (the cache
    entry being built), or to datasets' own cache when the tokenize-once cache is off.

    Generation packing turns N documents into M blocks, so the batched map returns a different row count. Blocks
    are cut from each batch's token stream, so the packing is a second, single-process pass over the tokenized
    documents: the worker count changes where a worker's shard starts, and must not change the examples.
    Per-example truncation flags are columns, summed into Stats afterwards.
    """
    from datasets import Features, List, Value

    template = task.template(data_cfg)
    documents = task.tokenization == "documents"
    packed = documents and packing

    def encode(batch: dict) -> dict:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        if packed:
            return {"document": document_ids(task, tokenizer, rows, data_cfg)}
        if documents:
            examples = encode_documents(task, tokenizer, rows, data_cfg, max_len, packing)
        else:
            examples = encode_supervised(task, template, tokenizer, rows, data_cfg, max_len)
        return _example_columns(examples, position_ids=False)

    def pack(batch: dict) -> dict:
        return _example_columns(blocks_from_documents(batch["document"], max_len, True), position_ids=True)

    def files(name: str) -> dict:
        if work is None:
            # datasets keys its cache on a hash of `encode`, which names the module functions it calls without
            # their code: an edited or upgraded hftoolkit would reuse stale tokenization of the same file.
            return {"new_fingerprint": Hasher.hash([ds._fingerprint, name, Hasher.hash(encode), digest])}
        # The entry's key already covers everything (and datasets' own hash of `encode` pickles the whole
        # tokenizer: seconds for GPT-2's).
        (work / "map").mkdir(exist_ok=True)
        return {
            "new_fingerprint": f"{work.name}-{name}",
            "cache_file_name": str(work / "map" / f"{name}.arrow"),
        }

    from datasets.fingerprint import Hasher

    digest = tokenization_code_digest()
    features = Features({"document": List(Value("int32"))}) if packed else _example_features(False)
    encoded = ds.map(
        encode, batched=True, batch_size=1000, remove_columns=ds.column_names, features=features,
        num_proc=workers if workers > 1 else None, desc="tokenizing", **files("tokens"),
    )  # fmt: skip
    if packed:
        encoded = encoded.map(
            pack, batched=True, batch_size=1000, remove_columns=["document"], features=_example_features(True),
            desc="packing", **files("blocks"),
        )  # fmt: skip
    cols = encoded.select_columns(list(STAT_COLUMNS)).to_dict()
    stats = Stats(
        examples=len(ds),
        source_truncated=sum(cols["source_truncated"]),
        target_truncated=sum(cols["target_truncated"]),
        dropped=sum(cols["dropped"]),
        prompt_lengths=[n for n, d in zip(cols["prompt_len"], cols["dropped"], strict=True) if not d],
        target_lengths=[n for n, d in zip(cols["target_len"], cols["dropped"], strict=True) if not d],
    )
    if stats.dropped:
        encoded = encoded.filter(lambda dropped: not dropped, input_columns="dropped")
    encoded = encoded.remove_columns(list(STAT_COLUMNS))
    if len(encoded) == 0:
        raise UserError(
            f"data: no example fits data.max_seq_len={max_len} ({stats.dropped} dropped); raise max_seq_len"
        )
    return encoded, stats


# --------------------------------------------------------------------------------------------- batching


class EpochSampler(torch.utils.data.Sampler):
    """Deterministic per-epoch shuffle (seed + epoch), optionally grouping similar lengths to cut padding.

    Deterministic from (seed, epoch) alone, so a resumed run sees the same order and skips what it consumed.
    """

    def __init__(
        self,
        lengths: list[int],
        seed: int,
        shuffle: bool = True,
        group_by_length: bool = False,
        batch_size: int = 1,
    ):
        self.lengths, self.seed, self.shuffle = lengths, seed, shuffle
        self.group_by_length, self.batch_size, self.epoch = group_by_length, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = list(range(len(self.lengths)))
        if not self.shuffle:
            return iter(order)
        rng = random.Random(self.seed * 1000003 + self.epoch)
        rng.shuffle(order)
        if self.group_by_length:
            # Mega-batches of 50 batches sorted by length inside (HF's LengthGroupedSampler idea), then
            # batches shuffled so the longest ones are not all at the start.
            mega = self.batch_size * 50
            order = [
                i
                for k in range(0, len(order), mega)
                for i in sorted(order[k : k + mega], key=lambda i: -self.lengths[i])
            ]
            batches = [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
            rng.shuffle(batches)
            order = [i for b in batches for i in b]
        return iter(order)


def pad_collate(features: list[dict], pad_id: int) -> dict:
    """Right-pad; padding gets attention 0 and label -100 by position, so EOS (== pad id) keeps its label."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        ids[row, :n] = torch.tensor(f["input_ids"])
        labels[row, :n] = torch.tensor(f["labels"])
        mask[row, :n] = 1
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "num_tokens": mask.sum(),
        "target_positions": target_positions(labels),
    }


def _first_fit(lengths: list[int], order: list[int], cap: int) -> tuple[list[list[int]], list[int]]:
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        n = lengths[i]
        for r, u in enumerate(used):
            if u + n <= cap:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    return rows, used


def pack_collate(features: list[dict], pad_id: int, row_len: int) -> dict:
    """Bin-pack the batch's examples into as few rows of ≤ row_len tokens as first-fit decreasing manages, filled
    evenly: rows are padded to the longest one, so 3 rows of 400 tokens cost less than 512 + 512 + 176.

    Position ids restart at 0 for each example and no attention_mask is passed: transformers 5.x then builds a
    block-causal mask from the position ids, so examples in a row cannot attend to each other — PROVIDED the
    forward runs with use_cache=False (GPT-2 otherwise creates a cache and silently skips that mask; see
    hftoolkit.evaluation.token_losses). We write this rather than use DataCollatorWithFlattening because flattening a whole batch
    into one row makes SDPA's masked attention cost grow with the square of the batch's total tokens.
    """
    lengths = [len(f["input_ids"]) for f in features]
    order = sorted(range(len(features)), key=lambda i: -lengths[i])
    fewest = -(-sum(lengths) // row_len)
    # Start from an even share per row and widen the cap until first fit needs no more rows than the fewest.
    cap = max(lengths[order[0]], -(-sum(lengths) // fewest))
    while True:
        rows, used = _first_fit(lengths, order, min(cap, row_len))
        if len(rows) <= fewest or cap >= row_len:
            break
        cap += max(1, cap // 32)
    width = max(used)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            f = features[i]
            n = len(f["input_ids"])
            ids[r, at : at + n] = torch.tensor(f["input_ids"])
            labels[r, at : at + n] = torch.tensor(f["labels"])
            # Nothing of this example precedes its first token, so its label is no target (as unpacked, where the
            # shift drops it); kept, the previous example's last position would learn to predict it.
            labels[r, at] = -100
            pos[r, at : at + n] = (
                torch.tensor(f["position_ids"]) if f.get("position_ids") else torch.arange(n)
            )
            at += n
        # Trailing padding forms its own segment starting at 0 (never merged with the last example).
        pos[r, at:] = torch.arange(width - at)
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": pos,
        "num_tokens": torch.tensor(sum(lengths)),
        "target_positions": target_positions(labels),
    }


def make_collate(pad_id: int, packing: bool, row_len: int):
    if packing:
        return lambda features: pack_collate(features, pad_id, row_len)
    return lambda features: pad_collate(features, pad_id)


def build_train_loader(
    dataset,
    batch_size: int,
    seed: int,
    packing: bool,
    pad_id: int,
    row_len: int,
    num_processes: int = 1,
    accumulation: int = 1,
):
    from torch.utils.data import DataLoader

    lengths = example_lengths(dataset)
    # accelerate deals the loader's consecutive batches to ranks 0..N-1, and each rank takes `accumulation` of them
    # per optimizer step, so one step is N·accumulation consecutive sampler chunks: group lengths by that, so that
    # N processes × B × A see per optimizer step the same examples as 1 process × N·B, or as M processes with
    # N·A/M accumulation (a resume on another process count; with per-device groups, unpacked batches would differ).
    sampler = EpochSampler(
        lengths, seed, shuffle=True, group_by_length=not packing,
        batch_size=batch_size * num_processes * accumulation,
    )  # fmt: skip
    return DataLoader(
        dataset.with_format(None),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=make_collate(pad_id, packing, row_len),
        drop_last=False,
        # Without its own generator, every new iterator draws a seed from the global torch RNG; a resumed run
        # creates one where the straight run did not, and its dropout masks would drift.
        generator=torch.Generator(),
    )


def example_lengths(dataset) -> list[int]:
    """Tokens per example, from the Arrow list offsets: reading the input_ids column into Python would build every
    token id as an int (≈ 10× slower and GBs of memory at 100k+ examples)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()


def build_eval_loader(dataset, batch_size: int, pad_id: int):
    """Eval loss batches: sorted by length (less padding), padded; order does not change the summed loss."""
    from torch.utils.data import DataLoader

    lengths = example_lengths(dataset)
    order = sorted(range(len(dataset)), key=lambda i: lengths[i])
    return DataLoader(dataset.select(order), batch_size=batch_size, collate_fn=make_collate(pad_id, False, 0))


def steps_per_epoch(num_examples: int, batch_size: int, num_processes: int, accumulation: int) -> int:
    batches_per_rank = math.ceil(num_examples / (batch_size * num_processes))
    return max(1, math.ceil(batches_per_rank / accumulation))
