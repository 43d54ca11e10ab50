"""Generation: left padding is invisible, stop strings end completions, `hftoolkit generate` applies the template."""

from __future__ import annotations

import json

from hftoolkit.evaluation import generation_batches
from hftoolkit.generation import Decoding, generate_batch
from tests.conftest import tiny_gpt2, tiny_overrides


def test_batched_left_padded_equals_one_by_one(gpt2_tokenizer):
    """A prompt's greedy completion is the same alone and in a left-padded batch with longer prompts (position ids
    come from the attention mask); right padding or a missing mask would change it."""
    model = tiny_gpt2(vocab_size=50257, n_positions=128).eval()
    tok = gpt2_tokenizer
    tok.pad_token = tok.eos_token
    prompts = [
        tok(t)["input_ids"]
        for t in ("Hello there", "A much longer prompt than the first one, with commas", "Hi")
    ]
    decoding = Decoding(max_new_tokens=6)
    batched, _ = generate_batch(model, tok, prompts, decoding)
    alone = [generate_batch(model, tok, [p], decoding)[0][0] for p in prompts]
    assert batched == alone


def test_stopped_flag_and_stop_strings(gpt2_tokenizer):
    """`stopped` tells whether a completion ended by itself; a stop string ends it early."""
    model = tiny_gpt2(vocab_size=50257, n_positions=128).eval()
    tok = gpt2_tokenizer
    tok.pad_token = tok.eos_token
    texts, stopped = generate_batch(model, tok, [tok("x")["input_ids"]], Decoding(max_new_tokens=4))
    assert stopped == [tok.eos_token_id in tok(texts[0])["input_ids"] or len(tok(texts[0])["input_ids"]) < 4]
    from hftoolkit.tasks.base import cut_at_stop

    assert cut_at_stop(" Paris\nQuestion: more", ["\n"]) == "Paris"


def test_generate_command_uses_the_template(tmp_path, cli):
    """`hftoolkit generate` renders the trained task's template (from model/hftoolkit.json); a plain-text input that the template cannot fill is a clean error."""
    out = tmp_path / "run"
    assert cli("train", "recipes/quickstart/qa.yaml", *tiny_overrides(out, **{"train.max_steps": 1}))[0] == 0
    info = json.loads((out / "model" / "hftoolkit.json").read_text())
    assert info["task"] == "qa" and "{question}" in info["prompt_template"] and info["stop_strings"] == ["\n"]
    inp = json.dumps({"context": "Ann lives in Oslo .", "question": "Where does Ann live ?"})
    code, stdout, err = cli(
        "generate", out / "model", "--input", inp, "--show-prompt", "--max-new-tokens", "3"
    )
    assert code == 0, err
    assert stdout.startswith("Ann lives in Oslo .\nQuestion: Where does Ann live ?\nAnswer:")
    code, _, err = cli("generate", out / "model", "--input", "plain context only")
    assert code == 2 and "{question}" in err and "--field question=" in err


def test_generation_batches_fill_a_token_budget():
    """Longest prompt first; each batch holds as many rows as fit the budget at (its longest prompt + new tokens)
    per row, so short prompts share bigger batches; every prompt exactly once; never over max_rows."""
    lengths = [30, 400, 28, 31, 390, 29, 30, 27, 300, 26, 25]
    batches = generation_batches(lengths, budget=1000, new_tokens=20, max_rows=4)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [1, 4]  # 2 × (400 + 20) ≤ 1000; a third row would not fit
    assert batches[1] == [8, 3, 0]  # 3 × (300 + 20) ≤ 1000
    assert batches[2:] == [[6, 5, 2, 7], [9, 10]]  # short prompts: capped at max_rows
    for b in batches:
        assert len(b) == 1 or len(b) * (max(lengths[i] for i in b) + 20) <= 1000
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    # A prompt longer than the budget still gets a batch of its own.
    assert generation_batches([900, 10], budget=100, new_tokens=20, max_rows=8) == [[0], [1]]
