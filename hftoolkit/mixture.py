"""Several datasets in one run: a weighted training mixture (data.sources) and named eval sets (data.eval_sets).

Each dataset is loaded, checked and cleaned on its own, under its own column keys (a source inherits the data.*
keys it does not set), so errors and dropped rows name it, and data.bad_rows / max_bad_rows_share apply to each
dataset rather than to the blend. It is then mapped onto the recipe's layout: the column names the task reads
with the recipe's own data.* keys. From there on a mixture or an eval set is one ordinary dataset for the rest of
hftoolkit (tokenization, batching, generation, `plan`).

The mixture is datasets' `interleave_datasets` with probabilities = weights / sum(weights) and the recipe seed:
the same recipe gives the same rows in the same order, another seed another draw. Stopping strategy
(data.mixture_stopping): `first_exhausted` by default (datasets' own default, "interleave_under" elsewhere): the
mixture ends when one source has given all its rows, so the weights are realised exactly and no row is repeated
within an epoch; rows of the other sources beyond that point are not used, and `plan` says how many. With
`all_exhausted` it goes on until every row of every source was used, repeating the rows of the sources that run
out first (oversampling).

Validation: data.validation_file when set (read with the recipe's data.* keys); with data.eval_sets, those sets;
otherwise each source gives its own validation rows (its dataset's validation split, else
data.validation_split_percentage % of it held out with the seed) and the run evaluates on all of them together.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from hftoolkit.config import COLUMN_KEYS
from hftoolkit.errors import UserError

SOURCE_COLUMN = "mixture_source"  # which source a mixed row came from (plan's realised shares, results.json)
EVAL_SPLITS = ("validation", "valid", "dev", "test")
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# {mixture fingerprint: rows each source offered}, for mixture_shares (the mixture itself only says what it took)
_OFFERED: dict[str, list[int]] = {}


# --------------------------------------------------------------------------------------------- config checks


def source_label(spec, index: int) -> str:
    """ "data.sources[1] (news.jsonl)": how every message names a source."""
    return f"data.sources[{index}] ({spec.train_file or spec.dataset_name})"


def set_label(spec, name: str) -> str:
    return f"data.eval_sets.{name} ({spec.validation_file or spec.dataset_name})"


def weight_of(spec) -> float | None:
    """The source's weight as a finite number > 0, else None."""
    value = spec.weight
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    return float(value) if math.isfinite(value) and value > 0 else None


def check_mixture_config(d) -> None:
    """data.sources / data.eval_sets against each other and the other data keys (config.validate calls it)."""
    if d.sources is not None:
        _check_sources(d)
    if d.eval_sets is not None:
        _check_eval_sets(d)


def _check_sources(d) -> None:
    if not d.sources:
        raise UserError("data.sources: empty; list at least one {dataset_name | train_file, weight} source")
    for key in ("dataset_name", "train_file", "synthetic"):
        if getattr(d, key) is not None:
            raise UserError(
                f"data.sources: cannot be combined with data.{key}; make that dataset one of the sources"
            )
    for i, spec in enumerate(d.sources):
        if (spec.dataset_name is None) == (spec.train_file is None):
            raise UserError(f"data.sources[{i}]: set exactly one of dataset_name, train_file")
        for key in ("validation_file", "max_eval_samples"):
            if getattr(spec, key) is not None:
                raise UserError(
                    f"{source_label(spec, i)}: {key} is an eval-set key; use data.validation_file or data.eval_sets"
                )
        if weight_of(spec) is None:
            raise UserError(f"{source_label(spec, i)}: weight must be a number > 0, got {spec.weight!r}")


def _check_eval_sets(d) -> None:
    if not d.eval_sets:
        raise UserError("data.eval_sets: empty; name at least one {dataset_name | validation_file} set")
    if d.validation_file is not None:
        raise UserError(
            "data.validation_file: cannot be combined with data.eval_sets; make it one of the sets"
        )
    for name, spec in d.eval_sets.items():
        if not SET_NAME.fullmatch(name):
            raise UserError(
                f"data.eval_sets: name '{name}' must be letters, digits, '_', '.' or '-' (it names metric keys)"
            )
        if (spec.dataset_name is None) == (spec.validation_file is None):
            raise UserError(f"data.eval_sets.{name}: set exactly one of dataset_name, validation_file")
        if spec.train_file is not None or spec.weight != 1.0:
            raise UserError(f"{set_label(spec, name)}: train_file and weight belong to data.sources")
        if spec.max_eval_samples is not None and spec.max_eval_samples < 1:
            raise UserError(f"{set_label(spec, name)}: max_eval_samples must be ≥ 1 or null")


# --------------------------------------------------------------------------------------------- loading


def _short(e: BaseException) -> str:
    from hftoolkit.data import _short

    return _short(e)


def spec_config(d, spec):
    """The recipe's data section as this dataset is read: its own column keys over the recipe's."""
    own = {k: getattr(spec, k) for k in COLUMN_KEYS if getattr(spec, k) is not None}
    return dataclasses.replace(d, **own, sources=None, eval_sets=None)


def _load_hub(spec, label: str):
    from datasets import load_dataset

    try:
        return load_dataset(spec.dataset_name, spec.dataset_config_name)
    except Exception as e:  # datasets raises many types for a missing or unreachable dataset
        raise UserError(f"{label}: cannot load '{spec.dataset_name}' ({_short(e)})") from None


def _load_file(path: str, key: str, label: str):
    """One local file as a Dataset, with data.py's checks (encoding, JSON lines, empty file)."""
    from hftoolkit.data import _load_files

    files = SimpleNamespace(train_file=path if key == "train_file" else None, validation_file=None)
    if key == "validation_file":
        files.validation_file = path
    try:
        loaded = _load_files(files)
    except UserError as e:
        raise UserError(f"{label}: {e}") from None
    return loaded["train" if key == "train_file" else "validation"]


def _pick(raw, wanted: str | None, defaults: tuple[str, ...], label: str):
    """The split `wanted` (or the first of `defaults` present) of a DatasetDict; None if absent and not asked."""
    if wanted is not None:
        if wanted not in raw:
            raise UserError(f"{label}: split '{wanted}' not found (splits: {', '.join(raw)})")
        return raw[wanted]
    name = next((n for n in defaults if n in raw), None)
    return raw[name] if name is not None else None


def check_source_columns(task, d, spec, ds, label: str, split: str):
    """Rename per spec.columns, then check the dataset's columns fit the task under its keys → (ds, config)."""
    from hftoolkit.data import check_columns

    columns = list(ds.column_names)
    renames = {}
    for recipe_name, own in (spec.columns or {}).items():
        if own not in columns:
            raise UserError(
                f"{label}: columns.{recipe_name}: '{own}' is not one of its columns ({', '.join(columns)})"
            )
        renames[own] = recipe_name
    # A column already named as a rename's target is replaced by it (`columns: {summary: short}` over a "summary").
    shadowed = [name for name in renames.values() if name in columns and name not in renames]
    ds = ds.remove_columns(shadowed).rename_columns({a: b for a, b in renames.items() if a != b})
    columns = list(ds.column_names)
    for key in COLUMN_KEYS:
        value = getattr(spec, key)
        if key.endswith("_column") and value is not None and value not in columns:
            raise UserError(f"{label}: {key} '{value}' is not one of its columns ({', '.join(columns)})")
    cfg = spec_config(d, spec)
    try:
        check_columns(task, cfg, ds, split)
    except UserError as e:
        raise UserError(f"{label}: {str(e).removeprefix('data: ')}") from None
    return ds, cfg


def to_recipe_layout(task, ds, cfg, d, label: str):
    """The dataset with exactly the columns the task reads under the recipe's keys, renamed from this dataset's."""
    own = task.required_columns(cfg, list(ds.column_names))
    canonical = task.required_columns(d)
    if len(own) != len(canonical) or len(set(own)) != len(own):
        raise UserError(f"{label}: its columns {own} do not map one to one onto the recipe's {canonical}")
    ds = ds.select_columns(own)
    if own != canonical:
        ds = ds.rename_columns({a: b for a, b in zip(own, canonical, strict=True) if a != b})
    return task.align_layout(ds, cfg, d)


def prepare_dataset(task, d, spec, ds, label: str, split: str):
    """Checked, cleaned (its unusable rows dropped, counted) and mapped onto the recipe's layout → (ds, counts)."""
    from hftoolkit.data import drop_bad_rows

    ds, cfg = check_source_columns(task, d, spec, ds, label, split)
    ds, counts = drop_bad_rows(task, cfg, ds, split, label)
    return to_recipe_layout(task, ds, cfg, d, label), counts


def _source_splits(spec, index: int, with_validation: bool):
    """(training rows, validation rows or None) of one source, before any check."""
    label = source_label(spec, index)
    if spec.train_file is not None:
        train = _load_file(spec.train_file, "train_file", label)
        return train, None
    raw = _load_hub(spec, label)
    train = _pick(raw, spec.split, ("train",), label)
    if train is None:
        raise UserError(f"{label}: no 'train' split (splits: {', '.join(raw)}); set its split")
    return train, (_pick(raw, None, EVAL_SPLITS, label) if with_validation else None)


def _align_features(parts: list, labels: list[str]):
    """Every part cast to the first part's column types (interleaving needs one schema)."""
    features = parts[0].features
    aligned = [parts[0]]
    for part, label in zip(parts[1:], labels[1:], strict=True):
        if part.features != features:
            try:
                part = part.cast(features)
            except Exception as e:  # pyarrow / datasets cast errors
                raise UserError(
                    f"{label}: its columns' types ({part.features}) cannot be cast to {labels[0]}'s ({features}): "
                    f"{_short(e)}"
                ) from None
        aligned.append(part)
    return aligned


def interleave(parts: list, weights: list[float], seed: int, stopping: str):
    """The mixture: rows drawn from the parts with probabilities weights / sum(weights), seeded."""
    from datasets import interleave_datasets

    total = sum(weights)
    return interleave_datasets(
        parts, probabilities=[w / total for w in weights], seed=seed, stopping_strategy=stopping
    )


def load_mixture(recipe, task, with_validation: bool) -> tuple[dict, dict]:
    """({"train": the mixture, "validation": ...}, {split: {"<reason> <column> in data.sources[i]": rows}})."""
    from datasets import concatenate_datasets

    d = recipe.data
    own_validation = with_validation and d.validation_file is None
    train_parts, val_parts, labels, bad_rows = [], [], [], {"train": {}, "validation": {}}
    for i, spec in enumerate(d.sources):
        label = source_label(spec, i)
        train, val = _source_splits(spec, i, own_validation)
        train, counts = prepare_dataset(task, d, spec, train, label, "train")
        bad_rows["train"].update({f"{k} in data.sources[{i}]": n for k, n in counts.items()})
        if own_validation and val is None:
            from hftoolkit.data import _hold_out_validation

            held = _hold_out_validation(train, d.validation_split_percentage, recipe.seed)
            train, val = held["train"], held["validation"]
        elif val is not None:
            val, counts = prepare_dataset(task, d, spec, val, label, "validation")
            bad_rows["validation"].update({f"{k} in data.sources[{i}]": n for k, n in counts.items()})
        tag = [i] * len(train)
        train_parts.append(train.add_column(SOURCE_COLUMN, tag))
        if val is not None:
            val_parts.append(val.add_column(SOURCE_COLUMN, [i] * len(val)))
        labels.append(label)
    weights = [weight_of(spec) for spec in d.sources]
    splits = {
        "train": interleave(_align_features(train_parts, labels), weights, recipe.seed, d.mixture_stopping)
    }
    _OFFERED[splits["train"]._fingerprint] = [len(p) for p in train_parts]
    if val_parts:
        splits["validation"] = concatenate_datasets(_align_features(val_parts, labels))
    elif with_validation:
        splits["validation"], bad_rows["validation"] = _validation_file(task, d)
    return splits, {k: v for k, v in bad_rows.items() if k in splits}


def _validation_file(task, d):
    """data.validation_file next to data.sources: read with the recipe's own keys, as without a mixture."""
    from hftoolkit.data import check_columns, drop_bad_rows

    ds = _load_file(d.validation_file, "validation_file", "data.validation_file")
    check_columns(task, d, ds, "validation")
    return drop_bad_rows(task, d, ds, "validation", d.validation_file)


def load_eval_sets(recipe, task) -> tuple[dict, dict]:
    """({name: dataset in the recipe's layout}, {"validation/<name>": bad-row counts}), in recipe order."""
    d = recipe.data
    sets, bad_rows = {}, {}
    for name, spec in d.eval_sets.items():
        label = set_label(spec, name)
        if spec.validation_file is not None:
            ds = _load_file(spec.validation_file, "validation_file", label)
        else:
            raw = _load_hub(spec, label)
            ds = _pick(raw, spec.split, EVAL_SPLITS, label)
            if ds is None:
                raise UserError(f"{label}: no validation split (splits: {', '.join(raw)}); set its split")
        ds, bad_rows[f"validation/{name}"] = prepare_dataset(task, d, spec, ds, label, "validation")
        limit = spec.max_eval_samples or d.max_eval_samples
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        sets[name] = ds
    return sets, bad_rows


def eval_set_info(spec, ds) -> dict:
    """results.json's description of an eval set (as "eval_dataset" for the single validation split)."""
    return {
        "name": spec.dataset_name or spec.validation_file,
        "config": spec.dataset_config_name,
        "split": spec.split or ("validation" if spec.dataset_name else None),
        "num_examples": len(ds),
    }


def load_splits(recipe, output_dir: Path, task) -> tuple[dict, dict]:
    """data.load_raw_splits for recipes with data.sources and/or data.eval_sets.

    {"train", "validation", "validation/<name>" for each eval set} with "validation" the first eval set when there
    are eval sets (no validation part is then held out of the training data)."""
    from hftoolkit.data import load_raw_splits

    d = recipe.data
    with_validation = not d.eval_sets
    if d.sources is not None:
        splits, bad_rows = load_mixture(recipe, task, with_validation)
        if d.max_train_samples is not None:  # the first rows of the mixture keep its shares
            offered = _OFFERED.get(splits["train"]._fingerprint)
            splits["train"] = splits["train"].select(range(min(d.max_train_samples, len(splits["train"]))))
            _OFFERED[splits["train"]._fingerprint] = offered
        if "validation" in splits and d.max_eval_samples is not None:
            shuffled = splits["validation"].shuffle(seed=recipe.seed)  # every source represented
            splits["validation"] = shuffled.select(range(min(d.max_eval_samples, len(shuffled))))
    elif any(getattr(d, k) is not None for k in ("dataset_name", "train_file", "synthetic")):
        plain = dataclasses.replace(recipe, data=dataclasses.replace(d, eval_sets=None))
        splits, bad_rows = load_raw_splits(plain, output_dir, task, with_validation=False)
    else:  # eval sets alone (hftoolkit eval)
        splits, bad_rows = {}, {}
    if d.eval_sets:
        sets, set_bad_rows = load_eval_sets(recipe, task)
        first = next(iter(sets))
        splits["validation"] = sets[first]
        splits.update({f"validation/{name}": ds for name, ds in sets.items()})
        bad_rows.update({"validation": set_bad_rows[f"validation/{first}"], **set_bad_rows})
    for split, ds in splits.items():
        if len(ds) == 0:
            raise UserError(
                f"data: the {split} split is empty; check its data.sources / data.eval_sets entry"
            )
    return splits, bad_rows


# --------------------------------------------------------------------------------------------- reporting


def mixture_shares(recipe, train) -> list[dict]:
    """Per source: its weight's share, the rows it gave the mixture and their realised share (plan,
    results.json → data.mixture)."""
    d = recipe.data
    if d.sources is None or SOURCE_COLUMN not in train.column_names:
        return []
    counts = Counter(train[SOURCE_COLUMN])
    total_weight = sum(weight_of(spec) for spec in d.sources)
    offered = _OFFERED.get(train._fingerprint) or [None] * len(d.sources)
    return [
        {
            "source": source_label(spec, i),
            "weight": weight_of(spec),
            "target_share": round(weight_of(spec) / total_weight, 4),
            "rows_offered": offered[i],  # after its unusable rows and its validation part were taken out
            "rows": counts.get(i, 0),
            "share": round(counts.get(i, 0) / max(len(train), 1), 4),
        }
        for i, spec in enumerate(d.sources)
    ]
