"""The tokenize-once cache (hftoolkit/cache.py), parallel tokenization, `hftoolkit preprocess` and .txt sampling.

References are built independently of the cache: the examples a hit returns are compared with encode_supervised /
encode_documents called on the rows by hand, and a miss is shown by the entry's folder and builds.log.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hftoolkit import cache
from hftoolkit.config import DataConfig
from hftoolkit.data import (
    encode_documents,
    encode_supervised,
    split_text,
    tokenization_code_digest,
    tokenize_split,
)
from hftoolkit.errors import UserError
from hftoolkit.modeling import gpt2_tokenizer as fresh_gpt2_tokenizer
from hftoolkit.modeling import prepare_tokenizer
from hftoolkit.tasks import get_task
from tests.conftest import REPO_ROOT, tiny_overrides

SUMMARIZATION = "recipes/quickstart/summarization.yaml"
CPU_2PROC = "recipes/accelerate/cpu_2proc.yaml"


def rows(n: int = 30) -> list[dict]:
    return [
        {"document": f"Story {i} : the cat sat on mat {i % 7} today .", "summary": f"Cat {i} sat."}
        for i in range(n)
    ]


def config(tmp_path: Path, **values) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **values)


def examples(ds) -> list[dict]:
    return [{k: list(v) for k, v in row.items()} for row in ds]


def by_hand(task, tokenizer, data_rows, cfg, max_len) -> list[dict]:
    encoded = encode_supervised(task, task.template(cfg), tokenizer, data_rows, cfg, max_len)
    return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in encoded if not e["dropped"]]


def builds(root: Path) -> list[str]:
    log = root / cache.BUILDS_LOG
    return log.read_text().splitlines() if log.exists() else []


def test_second_tokenization_hits_and_returns_the_examples_of_a_fresh_encoding(tmp_path, gpt2_tokenizer):
    """A second tokenize_split of the same rows (a new Dataset object, a new tokenizer instance: as in a new
    process) loads the saved entry, and its examples are those encode_supervised makes from the rows by hand."""
    from datasets import Dataset

    task, cfg, tok = get_task("summarization"), config(tmp_path), prepare_tokenizer(gpt2_tokenizer, "gpt2")
    first, stats = tokenize_split(task, tok, Dataset.from_list(rows()), cfg, 64, True)
    again = prepare_tokenizer(fresh_gpt2_tokenizer(), "gpt2")
    second, stats2 = tokenize_split(task, again, Dataset.from_list(rows()), cfg, 64, True)
    assert (stats.cache.status, stats2.cache.status) == ("built", "hit")
    assert stats2.cache.path == stats.cache.path and len(builds(tmp_path / "cache")) == 1
    assert examples(second) == examples(first) == by_hand(task, tok, rows(), cfg, 64)
    assert stats2.as_dict() == stats.as_dict() and stats2.target_lengths == stats.target_lengths


def test_a_changed_template_misses(tmp_path, gpt2_tokenizer):
    """Another prompt template is another entry, whose examples carry the new template."""
    from datasets import Dataset

    task, tok = get_task("summarization"), prepare_tokenizer(gpt2_tokenizer, "gpt2")
    _, stats = tokenize_split(task, tok, Dataset.from_list(rows()), config(tmp_path), 64, True)
    cfg = config(tmp_path, prompt_template="Summarize: {document}\nSummary:")
    ds, changed = tokenize_split(task, tok, Dataset.from_list(rows()), cfg, 64, True)
    assert changed.cache.status == "built" and changed.cache.path != stats.cache.path
    assert tok.decode(ds[0]["input_ids"]).startswith("Summarize: Story 0")
    assert examples(ds) == by_hand(task, tok, rows(), cfg, 64)


def test_a_changed_tokenizer_misses_even_under_the_same_name(tmp_path, gpt2_tokenizer):
    """The key is what the tokenizer does: GPT-2 with one added token (same class, same name_or_path) misses."""
    from datasets import Dataset

    task, cfg = get_task("summarization"), config(tmp_path)
    tok = prepare_tokenizer(gpt2_tokenizer, "gpt2")
    _, stats = tokenize_split(task, tok, Dataset.from_list(rows()), cfg, 64, True)
    other = prepare_tokenizer(fresh_gpt2_tokenizer(), "gpt2")
    other.add_tokens(["Story"])
    assert other.name_or_path == tok.name_or_path
    ds, changed = tokenize_split(task, other, Dataset.from_list(rows()), cfg, 64, True)
    assert changed.cache.status == "built" and changed.cache.path != stats.cache.path
    assert examples(ds) == by_hand(task, other, rows(), cfg, 64)


def test_the_worker_count_does_not_change_packed_documents(tmp_path, gpt2_tokenizer):
    """2500 documents with 2 workers (shards of 1250 rows, not on the 1000-row batch boundaries that packing cuts
    at) give the blocks encode_documents makes batch by batch in one process; and the same cache entry."""
    from datasets import Dataset

    task, tok = get_task("generation"), prepare_tokenizer(gpt2_tokenizer, "gpt2")
    docs = [{"text": f"doc {i} " + "word " * (i % 13)} for i in range(2500)]
    reference = [
        {k: b[k] for k in ("input_ids", "labels", "position_ids")}
        for start in range(0, len(docs), 1000)
        for b in encode_documents(task, tok, docs[start : start + 1000], DataConfig(), 48, True)
    ]
    two, stats = tokenize_split(
        task, tok, Dataset.from_list(docs), config(tmp_path, preprocessing_num_workers=2), 48, True
    )
    assert stats.cache.workers == 2 and examples(two) == reference
    _, one = tokenize_split(task, tok, Dataset.from_list(docs), config(tmp_path), 48, True)
    assert one.cache.status == "hit"


def test_preprocess_misses_when_the_data_file_changes(tmp_path, cli):
    """`hftoolkit preprocess` builds, says where and how big; run again it hits; one word changed in the train file
    (same size) is a miss for train, a hit for the untouched validation file. (The real GPT-2 tokenizer: a bpe one
    is trained on the train file, so a change there rightly misses the validation entry too.)"""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(40)))
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(json.dumps(r) + "\n" for r in rows(5)))
    args = ["preprocess", SUMMARIZATION, *tiny_overrides(tmp_path / "out"), "data.synthetic=null",
            f"data.train_file={data}", f"data.validation_file={valid}", f"data.cache_dir={tmp_path / 'c'}",
            "model.init.tokenizer=gpt2"]  # fmt: skip
    code, out, err = cli(*args)
    assert code == 0, err
    assert out.count("tokenized cache miss") == 2 and f"cache: {tmp_path / 'c'}" in out and " KB" in out
    assert cli(*args)[1].count("tokenized cache hit") == 2
    data.write_text(data.read_text().replace("Story 3 :", "Story 8 :"))
    out = cli(*args)[1]
    assert "train: 40 rows" in out and "validation: 5 rows" in out
    assert [line.split(";")[1].split(":")[0].strip() for line in out.splitlines()[:2]] == [
        "tokenized cache miss",
        "tokenized cache hit",
    ]


def test_a_failed_build_leaves_no_entry(tmp_path, gpt2_tokenizer):
    """A build that fails (nothing fits max_seq_len) leaves neither an entry nor its work folder; a killed build's
    leftover work folder (a dead process id) is removed by the next build of the key."""
    from datasets import Dataset

    task, tok, cfg = get_task("summarization"), prepare_tokenizer(gpt2_tokenizer, "gpt2"), config(tmp_path)
    too_long = config(tmp_path, prompt_template="x " * 40 + "{document}\nTL;DR:")
    with pytest.raises(UserError, match="no example fits"):
        tokenize_split(task, tok, Dataset.from_list(rows()), too_long, 16, True)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []
    ds = Dataset.from_list(rows())
    key = cache.key_of(cache.key_parts(task, tok, ds, cfg, 64, True, tokenization_code_digest()))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "cache" / f".tmp-{key}-{socket.gethostname()}-{dead.pid}"
    (stale / "map").mkdir(parents=True)
    _, stats = tokenize_split(task, tok, ds, cfg, 64, True)
    assert stats.cache.path.name == key and not stale.exists()


def test_eval_of_a_trained_model_hits_the_entries_of_its_run(tmp_path, cli):
    """`eval` with model.name_or_path=RUN/model loads the tokenizer saved there: the same tokenizer under another
    name, so the run's entries are reused."""
    run, root = tmp_path / "run", tmp_path / "cache"
    common = [f"data.cache_dir={root}", "eval.baseline=false"]
    code, out, err = cli("train", "recipes/quickstart/qa.yaml", *tiny_overrides(run), *common)
    assert code == 0, err
    assert "data (eval): tokenized cache miss" in out + err
    model = ["model.init=null", f"model.name_or_path={run / 'model'}"]
    code, out, err = cli(
        "eval", "recipes/quickstart/qa.yaml", *tiny_overrides(tmp_path / "ev"), *common, *model
    )
    assert code == 0, err
    assert "data (eval): tokenized cache hit" in out + err and len(builds(root)) == 2


WIKITEXT = (
    " \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 is a tactical role @-@ playing game .\n"
    " It was released in January 2011 in Japan .\n \n = = Gameplay = = \n \n"
    " As with previous games , the player controls a squad .\n \n The game 's battle system carries over .\n \n"
    " = Tropical Storm Ana = \n \n Ana formed on May 3 .\n \n"
)


def test_wikitext_layout_gives_one_example_per_paragraph(tmp_path, cli):
    """WikiText separates paragraphs (and headings) with lines holding one space: each becomes its own example,
    its lines kept together; sample_by=line gives a row per non-blank line, document one for the file."""
    path = tmp_path / "wiki.train.txt"
    path.write_text(WIKITEXT)
    expected = [
        " = Valkyria Chronicles III = ",
        " Senjō no Valkyria 3 is a tactical role @-@ playing game .\n It was released in January 2011 in Japan .",
        " = = Gameplay = = ",
        " As with previous games , the player controls a squad .",
        " The game 's battle system carries over .",
        " = Tropical Storm Ana = ",
        " Ana formed on May 3 .",
    ]
    from hftoolkit.data import _load_paragraphs

    assert list(_load_paragraphs({"train": str(path)})["train"]["text"]) == expected
    lines = [line for line in WIKITEXT.split("\n") if line.strip()]
    assert split_text(WIKITEXT, "line") == lines and len(lines) == 8
    assert split_text(WIKITEXT, "document") == [WIKITEXT.strip("\n")]
    out = tmp_path / "out"
    args = [
        *tiny_overrides(out),
        "data.synthetic=null",
        f"data.train_file={path}",
        "data.max_train_samples=100",
    ]
    code, text, err = cli(
        "plan", "recipes/quickstart/generation.yaml", *args, "data.sample_by=line", "--no-color"
    )
    assert code == 0, err
    assert "token lengths (7 training rows" in text  # 8 lines, 1 held out for validation


# Enough rows that tokenizing takes seconds: ranks that did not wait for rank 0 would both find no entry and build.
LONGER_TOKENIZATION = ["eval.baseline=false", "train.max_steps=2", "data.synthetic.num_train=6000"]


@pytest.mark.multiproc
def test_two_processes_build_the_cache_once_and_a_later_run_hits(tmp_path):
    """`accelerate launch` with 2 CPU processes: rank 0 tokenizes each split once (two builds.log lines, one process
    id), rank 1 loads its entries; a second run of the recipe says it hit and builds nothing."""
    root = tmp_path / "cache"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HFTOOLKIT_CACHE": str(root)}
    env.pop("WORLD_SIZE", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_2PROC,
              "--main_process_port", str(port), "-m", "hftoolkit", "train", SUMMARIZATION]  # fmt: skip
    over = [*tiny_overrides(tmp_path / "run"), *LONGER_TOKENIZATION]
    proc = subprocess.run(
        [*launch, *over], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = builds(root)
    assert len(built) == 2 and len({line.split("built by ")[1] for line in built}) == 1, built
    assert "data (train): tokenized cache miss" in proc.stdout + proc.stderr
    rerun = [*tiny_overrides(tmp_path / "again"), *LONGER_TOKENIZATION]
    proc = subprocess.run(
        [sys.executable, "-m", "hftoolkit", "train", SUMMARIZATION, *rerun],
        cwd=REPO_ROOT, env={**env, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        f"data (train): tokenized cache hit: {root}" in proc.stdout + proc.stderr and len(builds(root)) == 2
    )
