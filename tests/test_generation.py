"""Generation: left padding is invisible, stop strings end completions, `hftoolkit generate` applies the template."""

from __future__ import annotations

import json

import pytest

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


def _generate_reference(model, ids, mask, eos_ids, max_new_tokens):
    """model.generate's greedy tokens per row, cut after the first EOS id (generate pads a finished row)."""
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=0, eos_token_id=list(eos_ids),
    )  # fmt: skip
    rows = []
    for row in out[:, ids.shape[1] :].tolist():
        end = next((k + 1 for k, t in enumerate(row) if t in eos_ids), len(row))
        rows.append(row[:end])
    return rows


def test_greedy_decode_equals_generate_when_rows_finish_at_different_steps():
    """greedy_decode drops finished rows (and padding columns no remaining row needs) from the batch and its KV
    cache; every row's tokens must still be model.generate's, EOS included. The EOS ids are tokens the model
    emits at different steps of different rows, so rows leave the batch one by one, the longest prompts among
    them, and some row runs into max_new_tokens."""
    import torch

    from hftoolkit.generation import greedy_decode, left_pad

    model = tiny_gpt2(vocab_size=96, n_positions=128, seed=2).eval()
    with (
        torch.no_grad()
    ):  # larger weights than the default init: a random model that does not repeat one token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (40, 3, 17, 9, 33, 1, 12, 25, 5, 38)]
    ids, mask = left_pad(prompts, 0, "cpu")
    free = _generate_reference(model, ids, mask, {0}, 24)
    eos = {
        free[0][3],
        free[4][9],
    }  # tokens that end rows 0 and 4 (long prompts) early, and others here and there
    expected = _generate_reference(model, ids, mask, eos, 24)
    assert len({len(r) for r in expected}) >= 3 and max(map(len, expected)) == 24
    assert len(expected[0]) <= 4 and len(expected[4]) <= 10
    assert greedy_decode(model, prompts, 0, eos, 24) == expected


@pytest.mark.parametrize("setting", ["as-is", "prefill-chunks-and-logit-blocks", "whole-model-forward"])
def test_continuous_batching_equals_generate_prompt_by_prompt(setting, monkeypatch):
    """With a KV budget that holds only a few rows, greedy_decode refills the room of finished rows with the next
    prompts (new rows prefilled, then merged into the running batch, caches padded to one width); every prompt's
    tokens must still be model.generate's for that prompt alone. Prompts in a shuffled length order, so a longer
    prompt joins shorter running rows and the other way round. Three ways: as on this machine (the transformer
    and the output embedding called apart, the new rows' logits computed with the running rows'); with prefills
    split into forwards of at most 40 positions and logits computed 50 at a time in vocabulary blocks (on CPU
    from 2048 positions and 2**20 logits); through the model's own forward (architectures not known to have a
    plain output embedding)."""
    import torch

    from hftoolkit import generation
    from hftoolkit.generation import greedy_decode, left_pad

    if setting == "prefill-chunks-and-logit-blocks":
        monkeypatch.setattr(generation, "CPU_PREFILL_POSITIONS", 40)
        monkeypatch.setattr(generation, "CPU_LOGITS_BLOCK", 50)
    elif setting == "whole-model-forward":
        monkeypatch.setattr(generation, "PLAIN_HEAD_MODELS", ())

    model = tiny_gpt2(vocab_size=96, n_positions=128, seed=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(1, 96, (n,), generator=g).tolist() for n in (30, 4, 22, 9, 35, 1, 14, 27, 6, 18, 11, 3)
    ]
    ids, mask = left_pad(prompts, 0, "cpu")
    free = _generate_reference(model, ids, mask, {0}, 16)
    eos = {free[1][2], free[6][5], free[9][1]}
    expected = [_generate_reference(model, *left_pad([p], 0, "cpu"), eos, 16)[0] for p in prompts]
    assert len({len(r) for r in expected}) >= 4 and max(map(len, expected)) == 16
    shapes = []  # (rows, KV-cache columns) of every forward (of the transformer: greedy_decode calls it alone)
    handle = model.base_model.register_forward_hook(
        lambda module, args, kwargs, out: shapes.append(tuple(kwargs["attention_mask"].shape)),
        with_kwargs=True,
    )
    budget = 4 * (35 + 16)  # four rows of the longest prompt; more of shorter ones
    try:
        got = greedy_decode(model, prompts, 0, eos, 16, budget=budget, max_rows=6)
    finally:
        handle.remove()
    assert got == expected
    assert shapes and all(rows <= 6 and rows * columns <= budget for rows, columns in shapes), shapes
    # Batch by batch (4 prompts at a time, each batch until its longest completion) would take this many forwards;
    # refilling takes fewer.
    batch_by_batch = sum(max(map(len, expected[i : i + 4])) for i in range(0, len(prompts), 4))
    assert len(shapes) < batch_by_batch, (len(shapes), batch_by_batch)


def test_greedy_linear_equals_argmax_of_the_whole_logits(monkeypatch):
    """greedy_linear, logits computed a vocabulary block at a time, picks what argmax over all the logits picks:
    the first index on a tie between blocks, the first NaN when there is one; with a bias and without."""
    import torch

    from hftoolkit import generation

    monkeypatch.setattr(generation, "CPU_LOGITS_BLOCK", 7 * 10)  # 7 rows: blocks of 10 vocabulary rows
    g = torch.Generator().manual_seed(0)
    for bias in (False, True):
        head = torch.nn.Linear(16, 95, bias=bias)
        with torch.no_grad():
            head.weight.copy_(torch.randn(95, 16, generator=g))
            head.weight[73] = head.weight[12]  # rows 0-1 prefer these two: a tie across blocks
            if bias:
                head.bias.copy_(torch.randn(95, generator=g))
                head.bias[73] = head.bias[12]
        hidden = torch.randn(7, 16, generator=g)
        hidden[:2] = head.weight[12].detach() * 5
        hidden[2, 3] = float("nan")  # every logit NaN
        with torch.no_grad():
            expected = head(hidden).argmax(-1)
            assert expected[0] == expected[1] == 12 and expected[2] == 0
            assert torch.equal(generation.greedy_linear(hidden, head), expected)
            head.weight[41, 0] = float("nan")  # logit 41 NaN in every row: argmax picks it
            assert torch.equal(generation.greedy_linear(hidden[3:], head), head(hidden[3:]).argmax(-1))
            assert set(generation.greedy_linear(hidden[3:], head).tolist()) == {41}


def test_row_max_equals_torch_max_and_argmax(monkeypatch):
    """row_max (the maxima of lanes, then argmax over the lanes' maxima and within the winning lane) gives what
    torch.max and argmax give: the first index of a value tied within a lane, across lanes and between the lanes
    and the tail columns, the first NaN, infinities, widths below, at and above a lane."""
    import torch

    from hftoolkit import generation

    monkeypatch.setattr(generation, "CPU_ARGMAX_LANE", 8)
    g = torch.Generator().manual_seed(0)
    for width in (5, 8, 13, 16, 45):
        # Few distinct values: ties everywhere, in every position.
        scores = torch.randint(0, 4, (64, width), generator=g).float()
        scores[1] = 3.0
        scores[2, -1] = 9.0  # the maximum in the tail only
        scores[3, :] = float("-inf")
        scores[4, width // 2] = float("inf")
        scores[4, -1] = float("inf")  # a tie between a lane and the tail
        scores[5, -1] = float("nan")  # NaN in the tail
        scores[6, width // 3] = scores[6, -2] = float("nan")
        scores[7, :] = float("nan")
        value, index = generation.row_max(scores)
        expected_value, expected_index = scores.max(-1)
        assert torch.equal(index, scores.argmax(-1)), width
        assert torch.equal(index, expected_index), width
        assert torch.allclose(value, expected_value, equal_nan=True), width
    monkeypatch.undo()
    scores = torch.randn(16, 50257, generator=g)
    scores[:8, 50250] = scores[:8, 301] = scores.max() + 1  # a tie between lane 1 and the tail
    assert torch.equal(generation.row_max(scores)[1], scores.argmax(-1))
    assert generation.row_max(scores)[1][:8].tolist() == [301] * 8


def test_fast_greedy_path_equals_generate_then_cut_at_the_stop_string(gpt2_tokenizer):
    """generate_batch's greedy path (rows leave the batch at a stop token) gives, after the task's cut at the stop
    string, the predictions of the examples-style reference: model.generate without any stop, then the cut. The
    stop string "e" occurs in many GPT-2 tokens, so rows stop at different steps; left padding of uneven prompts."""
    from hftoolkit.generation import can_decode_greedily, left_pad
    from hftoolkit.tasks.base import cut_at_stop

    tok = gpt2_tokenizer
    tok.pad_token = tok.eos_token
    model = tiny_gpt2(vocab_size=50257, n_positions=128, seed=1).eval()
    texts_in = (
        "Hello there",
        "A much longer prompt than the first one, with commas",
        "Hi",
        "Once upon a time",
    )
    prompts = [tok(t)["input_ids"] for t in texts_in]
    decoding = Decoding(max_new_tokens=12, stop_strings=("e",))
    assert can_decode_greedily(model, decoding, synced_gpus=False)
    texts, stopped = generate_batch(model, tok, prompts, decoding)
    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id
    )
    reference = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    assert [cut_at_stop(t, ["e"]) for t in texts] == [cut_at_stop(t, ["e"]) for t in reference]
    assert stopped == ["e" in t for t in texts]
    lengths = {len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts}
    assert len(lengths) >= 2  # rows left the batch at different steps


def test_beams_sampling_and_lockstep_go_through_generate(gpt2_tokenizer):
    """Only plain greedy search takes the fast path: beam search, sampling and lockstep generation across
    processes (synced_gpus, for FSDP / ZeRO-3) keep model.generate, and beam search gives generate's output."""
    from hftoolkit.generation import can_decode_greedily, left_pad

    tok = gpt2_tokenizer
    tok.pad_token = tok.eos_token
    model = tiny_gpt2(vocab_size=50257, n_positions=128, seed=2).eval()
    assert not can_decode_greedily(model, Decoding(num_beams=2), synced_gpus=False)
    assert not can_decode_greedily(model, Decoding(do_sample=True), synced_gpus=False)
    assert not can_decode_greedily(model, Decoding(), synced_gpus=True)
    prompts = [tok(t)["input_ids"] for t in ("Hello there", "Hi")]
    texts, _ = generate_batch(model, tok, prompts, Decoding(max_new_tokens=5, num_beams=2))
    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=2, do_sample=False,
        pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id],
    )  # fmt: skip
    assert texts == tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)


def test_a_batch_repeated_for_lockstep_gives_each_prediction_once(gpt2_tokenizer):
    """A rank short of a batch repeats one (build_generation_loader: sharded models generate in lockstep);
    generate_predictions returns each example once, in order, on the batch-by-batch path (beam search here) as on
    the greedy one (which skips the repeat)."""
    from accelerate import Accelerator

    from hftoolkit.evaluation import GenerationLoader, GenerationSet, generate_predictions
    from hftoolkit.tasks import get_task

    tok = gpt2_tokenizer
    tok.pad_token = tok.eos_token
    model = tiny_gpt2(vocab_size=50257, n_positions=128, seed=2).eval()
    prompts = [tok(t)["input_ids"] for t in ("Hello there", "Hi", "Once upon a time")]
    gen_set = GenerationSet(prompts, ["a", "b", "c"], [["x"], ["y"], ["z"]])
    loader = GenerationLoader([[0, 1], [2], [2]], budget=1000, max_rows=8)
    task, acc = get_task("summarization"), Accelerator(cpu=True)
    for decoding in (Decoding(max_new_tokens=4, num_beams=2), Decoding(max_new_tokens=4)):
        preds = generate_predictions(acc, model, tok, task, gen_set, loader, decoding)
        assert [p["index"] for p in preds] == [0, 1, 2]
