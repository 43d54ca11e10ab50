"""`hftoolkit preprocess`: fill the tokenize-once cache ahead of time (on a CPU box, before the GPU job).

Usage: hftoolkit preprocess RECIPE [key.sub=value ...]   e.g. data.preprocessing_num_workers=16

It loads the data and the tokenizer exactly as `train` does (no model weights), tokenizes every split through the
cache and prints where each entry lives and its size; `train`, `plan` and `eval` with the same recipe then hit.
"""

from __future__ import annotations

from hftoolkit import cache
from hftoolkit.config import Recipe
from hftoolkit.data import tokenize_split


def recipe_tokenizer(recipe: Recipe, texts):
    """The tokenizer `train` would use, without the model: built offline for model.init (a bpe tokenizer is trained
    on `texts`, as train does), else loaded from model.name_or_path."""
    from hftoolkit.modeling import build_tokenizer, load_tokenizer, prepare_tokenizer

    init = recipe.model.init
    if init is not None:
        return prepare_tokenizer(build_tokenizer(init.tokenizer, init.vocab_size, texts), "model.init")
    return load_tokenizer(recipe.model.name_or_path, recipe.model.revision, recipe.model.trust_remote_code)


def preprocess(recipe: Recipe, out=print) -> dict[str, cache.CacheInfo]:
    """Tokenize each split of the recipe into the cache; {split: CacheInfo}."""
    from hftoolkit.run import load_splits, resolve_recipe, tokenizer_training_texts

    task = resolve_recipe(recipe)
    splits, _ = load_splits(recipe, task, need_train=False)
    tokenizer = recipe_tokenizer(recipe, tokenizer_training_texts(recipe, task, splits))
    d, infos = recipe.data, {}
    for name, raw in splits.items():
        encoded, stats = tokenize_split(task, tokenizer, raw, d, d.max_seq_len, d.packing)
        infos[name] = stats.cache
        out(f"{name}: {len(raw):,} rows → {len(encoded):,} examples; {stats.cache.describe()}")
    if d.cache_tokenized:
        root = cache.cache_root(d)
        size = sum(cache.directory_size(i.path) for i in infos.values())
        out(f"cache: {root} ({cache.format_size(size)} for this recipe)")
    if task.tokenization == "documents" and d.packing:
        out("note: a model that cannot keep packed documents apart (OPT) trains unpacked and misses this entry; "
            "set data.packing=false for it")  # fmt: skip
    return infos
