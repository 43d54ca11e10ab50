"""Tokenization and batching: loss masks, EOS, truncation of the source, packing without cross-attention."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from hftoolkit.config import DataConfig
from hftoolkit.data import encode_supervised, pack_collate, pad_collate, tokenize_split
from hftoolkit.errors import UserError
from hftoolkit.evaluation import token_losses
from hftoolkit.tasks import get_task
from tests.conftest import tiny_gpt2


def summarization_rows():
    return [
        {"document": "The cat sat on the mat all day long and did not move.", "summary": "Cat sat."},
        {"document": "Rain fell.", "summary": "It rained over the whole town for a week."},
    ]


def test_prompt_masked_target_and_eos_kept(gpt2_tokenizer):
    """Loss only on the target, and the EOS that ends it keeps its label although pad == eos: otherwise a
    fine-tuned model never learns to stop."""
    task = get_task("summarization")
    cfg = DataConfig()
    tok = gpt2_tokenizer
    tok.pad_token = tok.eos_token
    (ex, _) = encode_supervised(task, task.template(cfg), tok, summarization_rows(), cfg, 256)
    prompt_len = ex["prompt_len"]
    assert ex["labels"][:prompt_len] == [-100] * prompt_len
    target = ex["labels"][prompt_len:]
    assert target[-1] == tok.eos_token_id
    assert tok.decode(target[:-1]) == " Cat sat."
    assert tok.decode(ex["input_ids"][:prompt_len]).endswith("\nTL;DR:")
    # The collator pads with the EOS id but masks padding by length: the real EOS label survives.
    batch = pad_collate([ex, {"input_ids": ex["input_ids"][:3], "labels": [-100] * 3}], tok.pad_token_id)
    assert batch["labels"][0, len(ex["input_ids"]) - 1] == tok.eos_token_id
    assert (batch["labels"][1, 3:] == -100).all() and (batch["attention_mask"][1, 3:] == 0).all()


def test_source_truncated_not_target(gpt2_tokenizer):
    """Over budget, the document is cut and the summary stays whole (+EOS); a target that alone exceeds the
    budget is cut (without EOS) and counted."""
    task = get_task("summarization")
    cfg = DataConfig()
    tok = gpt2_tokenizer
    rows = [
        {"document": "word " * 200, "summary": "A short summary."},
        {"document": "x", "summary": "long " * 100},
    ]
    examples = encode_supervised(task, task.template(cfg), tok, rows, cfg, 32)
    first, second = examples
    assert len(first["input_ids"]) == 32 and first["source_truncated"] and not first["target_truncated"]
    assert tok.decode(first["labels"][first["prompt_len"] :][:-1]) == " A short summary."
    assert tok.decode(first["input_ids"][: first["prompt_len"]]).endswith("\nTL;DR:")
    assert (
        second["target_truncated"]
        and second["labels"][-1] != tok.eos_token_id
        and len(second["input_ids"]) == 32
    )


def test_tokenize_split_counts_and_drops(gpt2_tokenizer):
    """tokenize_split reports truncation/drop counts (plan and the logs rely on them)."""
    from datasets import Dataset

    task = get_task("qa")
    cfg = DataConfig()
    rows = [
        {"context": "Ann lives in Oslo .", "question": "Where does Ann live ?", "answers": {"text": ["Oslo"], "answer_start": [13]}},
        {"context": "c " * 50, "question": "q " * 60, "answers": {"text": ["x"], "answer_start": [0]}},
    ]  # fmt: skip
    ds, stats = tokenize_split(task, gpt2_tokenizer, Dataset.from_list(rows), cfg, 40, packing=True)
    assert len(ds) == 1 and stats.dropped == 1 and stats.examples == 2


def test_generation_blocks_restart_positions(gpt2_tokenizer):
    """Packed generation blocks restart position ids at each document and never label a document's first
    token from the previous document."""
    from datasets import Dataset

    task = get_task("generation")
    docs = Dataset.from_list([{"text": "one two three"}, {"text": "four five six seven"}])
    ds, _ = tokenize_split(task, gpt2_tokenizer, docs, DataConfig(), 64, packing=True)
    block = ds[0]
    pos = block["position_ids"]
    second_start = pos.index(0, 1)
    assert pos[:second_start] == list(range(second_start))
    assert block["labels"][0] == -100 and block["labels"][second_start] == -100
    assert block["input_ids"][second_start - 1] == gpt2_tokenizer.eos_token_id
    assert block["labels"][second_start - 1] == gpt2_tokenizer.eos_token_id  # EOS is learnt


def test_packed_logits_and_loss_equal_unpacked():
    """Packing must not let examples attend to each other: packed logits equal each example run alone
    (transformers builds the block-causal mask from position ids only with use_cache=False)."""
    model = tiny_gpt2().eval()
    g = torch.Generator().manual_seed(0)
    feats = []
    for n in (7, 12, 5, 9):
        ids = torch.randint(1, 128, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    packed = pack_collate(feats, pad_id=0, row_len=24)
    assert packed["input_ids"].shape[0] < len(feats)  # really packed several per row
    with torch.no_grad():
        logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
        leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        for f in feats:
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            row, start = _locate(packed["input_ids"], f["input_ids"])
            torch.testing.assert_close(
                logits[row, start : start + len(f["input_ids"])], alone, atol=1e-5, rtol=1e-4
            )
        padded = pad_collate(feats, 0)
        loss_p, n_p = token_losses(model, packed)
        loss_u, n_u = token_losses(model, padded)
    assert n_p.sum() == n_u.sum()
    torch.testing.assert_close(loss_p.sum(), loss_u.sum(), atol=1e-4, rtol=1e-5)
    # The trap this guards against: with a cache (the default), the second example of a row sees the first.
    assert not torch.allclose(logits, leaky, atol=1e-4)


def test_pack_collate_fills_rows_evenly():
    """800 tokens with 512-token rows need 2 rows; filled evenly they are 400 wide, not 512 (first fit to the
    limit would make them 500 + 300 and pad both to 500). Every token is kept, once."""
    feats = [
        {"input_ids": [k + 1] * n, "labels": [k + 1] * n} for k, n in enumerate((200, 100, 200, 100, 200))
    ]
    packed = pack_collate(feats, pad_id=0, row_len=512)
    assert tuple(packed["input_ids"].shape) == (2, 400)
    assert sorted(packed["input_ids"].flatten().tolist()) == sorted(sum((f["input_ids"] for f in feats), []))
    # Nothing can be balanced below the longest example, and rows never exceed row_len.
    wide = [{"input_ids": [1] * n, "labels": [1] * n} for n in (500, 30, 30)]
    assert tuple(pack_collate(wide, 0, 512)["input_ids"].shape) == (2, 500)


def _locate(rows: torch.Tensor, ids: list[int]):
    n = len(ids)
    target = torch.tensor(ids)
    for r in range(rows.shape[0]):
        for s in range(rows.shape[1] - n + 1):
            if torch.equal(rows[r, s : s + n], target):
                return r, s
    raise AssertionError("example not found in packed rows")


def test_missing_column_lists_columns(tmp_path):
    """A missing column names the column and lists those that exist."""
    from datasets import Dataset

    from hftoolkit.data import check_columns

    ds = Dataset.from_list([{"article": "a", "highlights": "b", "id": 1}])
    cfg = DataConfig(text_column="body")
    with pytest.raises(
        UserError, match=r"column 'body' not in the validation data \(columns: article, highlights, id\)"
    ):
        check_columns(get_task("summarization"), cfg, ds, "validation")
    # The cnn_dailymail layout is picked up without any column keys.
    check_columns(get_task("summarization"), DataConfig(), ds, "validation")


def test_translation_language_missing():
    """A language absent from the data is named, with the languages that exist."""
    from datasets import Dataset

    from hftoolkit.data import check_columns

    ds = Dataset.from_list([{"translation": {"en": "a", "fr": "b"}}])
    with pytest.raises(
        UserError, match=r"data.target_lang: language 'de' not in the data \(languages: en, fr\)"
    ):
        check_columns(get_task("translation"), DataConfig(source_lang="en", target_lang="de"), ds, "train")


def test_malformed_jsonl_names_line(tmp_path):
    """Malformed JSON lines are reported with file and line number."""
    from hftoolkit.data import _load_files

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n{broken\n")
    with pytest.raises(UserError, match=r"train.jsonl line 2: malformed JSON"):
        _load_files(SimpleNamespace(train_file=str(path), validation_file=None))
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(UserError, match=r"line 2: not UTF-8"):
        _load_files(SimpleNamespace(train_file=str(path), validation_file=None))
