"""The invariants hftoolkit promises, each checked against a reference written independently of the code under
test, on every code path that carries it (padded and packed batches, stock and targets-only LM head, one and
several processes). `python tests/mutants.py` breaks each invariant in the library and expects these to fail.

Fast unit level only (tiny models, no training runs); the end-to-end checks are in test_invariants_e2e.py.
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from hftoolkit.config import load_recipe
from hftoolkit.data import (
    EpochSampler,
    build_train_loader,
    encode_documents,
    encode_prompts,
    encode_supervised,
    pack_collate,
    pad_collate,
)
from hftoolkit.evaluation import default_max_new_tokens, token_losses
from hftoolkit.generation import Decoding, generate_batch
from hftoolkit.modeling import create_model
from hftoolkit.speedups import speed_up
from hftoolkit.tasks import get_task
from hftoolkit.train import backward_window
from tests.conftest import tiny_gpt2

EOS = 50256  # GPT-2's EOS, which is also its pad token in hftoolkit


@pytest.fixture
def tok(gpt2_tokenizer):
    gpt2_tokenizer.pad_token = gpt2_tokenizer.eos_token
    assert gpt2_tokenizer.pad_token_id == gpt2_tokenizer.eos_token_id == EOS
    return gpt2_tokenizer


def data_cfg(task: str, *overrides: str):
    """The data section of a recipe for `task`, through the public recipe loader (defaults otherwise)."""
    return load_recipe(None, [f"task={task}", "data.synthetic.num_train=1", *overrides]).data


def supervised_features(seed: int = 0) -> list[dict]:
    """Prompt/target examples as encode_supervised makes them: prompt labelled -100, target ends with EOS."""
    g = torch.Generator().manual_seed(seed)
    feats = []
    for n, prompt in ((12, 4), (7, 2), (15, 6), (5, 1), (9, 3)):
        ids = torch.randint(1, 50000, (n - 1,), generator=g).tolist() + [EOS]
        feats.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return feats


def locate(rows: torch.Tensor, ids: list[int]) -> tuple[int, int]:
    """(row, start) of the token sequence `ids` inside a packed batch (random ids: each occurs once)."""
    n, target = len(ids), torch.tensor(ids)
    found = [
        (r, s)
        for r in range(rows.shape[0])
        for s in range(rows.shape[1] - n + 1)
        if torch.equal(rows[r, s : s + n], target)
    ]
    assert len(found) == 1, (ids, found)
    return found[0]


def reference_model(tok, targets_only: bool):
    """The tiny preset, in eval mode; with targets_only, after speed_up enabled the targets-only LM head."""
    model = create_model("tiny", tok, n_positions=64, seed=0).eval()
    if targets_only:
        assert speed_up(model) is True  # GPT-2 is a plain head(body(x)): the targets-only head must turn on
    return model


# ------------------------------------------------------------------------------------------------ loss


@pytest.mark.parametrize("targets_only", [False, True], ids=["full_head", "targets_only_head"])
def test_padded_loss_equals_transformers_loss(tok, targets_only):
    """token_losses on a right-padded batch == transformers' own `model(input_ids, labels=...)` loss of each
    example alone, as per-row sums (loss × number of predicted labels) and counts. Failing means the labels
    are not shifted (position t must predict label t+1), padding or the attention mask leak into the loss, the
    EOS label is dropped, or the targets-only LM head selects other positions than the full head."""
    feats = supervised_features()
    batch = pad_collate(feats, EOS)
    with torch.no_grad():
        sums, counts = token_losses(reference_model(tok, targets_only), batch, targets_only)
        stock = reference_model(tok, targets_only=False)
        for row, f in enumerate(feats):
            out = stock(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]]))
            n = sum(label != -100 for label in f["labels"][1:])  # transformers predicts labels 1..n-1
            assert counts[row].item() == n
            torch.testing.assert_close(sums[row], out.loss * n, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("targets_only", [False, True], ids=["full_head", "targets_only_head"])
def test_packed_loss_equals_each_example_alone(tok, targets_only):
    """token_losses on pack_collate rows (several examples per row, position ids restarting, no attention
    mask) == a hand-written log_softmax + gather over each example run alone through the stock model, summed
    per row. Failing means packed examples attend to each other (use_cache=False lost: transformers then skips
    the block-causal mask), labels are not shifted, or the targets-only head picks the wrong positions."""
    feats = supervised_features(seed=1)
    batch = pack_collate(feats, EOS, row_len=32)
    assert batch["input_ids"].shape[0] < len(feats)  # several examples share a row
    stock = reference_model(tok, targets_only=False)
    expected_sums = torch.zeros(batch["input_ids"].shape[0])
    expected_counts = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)
    with torch.no_grad():
        sums, counts = token_losses(reference_model(tok, targets_only), batch, targets_only)
        for f in feats:
            row, _ = locate(batch["input_ids"], f["input_ids"])
            logp = torch.log_softmax(stock(input_ids=torch.tensor([f["input_ids"]])).logits[0].float(), -1)
            for t in range(len(f["input_ids"]) - 1):  # position t predicts token t + 1
                if f["labels"][t + 1] != -100:
                    expected_sums[row] -= logp[t, f["labels"][t + 1]]
                    expected_counts[row] += 1
    assert counts.tolist() == expected_counts.tolist()
    torch.testing.assert_close(sums.float(), expected_sums, rtol=1e-5, atol=1e-4)


def test_packed_examples_never_predict_each_other(tok):
    """An example whose first token carries a label (a generation block that continues a document, or a prompt
    that is empty) must not be predicted from the example packed before it: packed loss == the examples alone
    (where nothing precedes the first token, so its label is never a target). Failing means one token per
    packed example is trained across an example boundary."""
    g = torch.Generator().manual_seed(2)
    feats = [{"input_ids": (ids := torch.randint(1, 50000, (n,), generator=g).tolist()), "labels": list(ids)}
             for n in (9, 6, 5)]  # fmt: skip
    model = reference_model(tok, targets_only=False)
    with torch.no_grad():
        packed_sum, packed_n = token_losses(model, pack_collate(feats, EOS, row_len=32))
        alone_sum, alone_n = token_losses(model, pad_collate(feats, EOS))
    assert packed_n.sum().item() == alone_n.sum().item() == sum(len(f["labels"]) - 1 for f in feats)
    torch.testing.assert_close(packed_sum.sum(), alone_sum.sum(), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------ labels


def covered_positions(batch: dict, feats: list[dict]) -> torch.Tensor:
    """Boolean [rows, width]: positions holding an example's token (found by content); the rest is padding."""
    covered = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    for f in feats:
        row, start = locate(batch["input_ids"], f["input_ids"])
        assert not covered[row, start : start + len(f["input_ids"])].any()
        covered[row, start : start + len(f["input_ids"])] = True
    return covered


@pytest.mark.parametrize("collate", ["pad", "pack"])
def test_eos_keeps_its_label_and_padding_never_has_one(collate):
    """With pad id == EOS id (GPT-2), every example's final EOS keeps its label and every padded position is
    labelled -100 (and, padded, has attention 0): padding is masked by length, never by token id. Failing
    means fine-tuned models never learn to stop (EOS masked), or the model is trained to predict padding."""
    feats = supervised_features(seed=3)
    # row_len 20: three packed rows of 15, 17 and 16 tokens, so two of them are padded.
    batch = pad_collate(feats, EOS) if collate == "pad" else pack_collate(feats, EOS, row_len=20)
    covered = covered_positions(batch, feats)
    assert (~covered).any()  # there is padding in this batch, padded with the EOS id
    assert (batch["input_ids"][~covered] == EOS).all()
    assert (batch["labels"][~covered] == -100).all()
    if collate == "pad":
        assert batch["attention_mask"].bool().equal(covered)
    for f in feats:
        row, start = locate(batch["input_ids"], f["input_ids"])
        end = start + len(f["input_ids"])
        assert batch["labels"][row, start:end].tolist() == f["labels"]
        assert batch["labels"][row, end - 1].item() == EOS
    assert batch["num_tokens"].item() == sum(len(f["input_ids"]) for f in feats)
    # Targets the loss sees: every real target label (EOS included), and nothing else.
    assert (batch["labels"][:, 1:] != -100).sum().item() == sum(
        sum(x != -100 for x in f["labels"][1:]) for f in feats
    )


def test_encode_supervised_masks_the_prompt_and_ends_with_eos(tok):
    """encode_supervised: input_ids = prompt + target + EOS, labels = -100 over exactly the prompt, then the
    target tokens and the EOS. Failing means the loss covers the prompt, or the EOS that teaches the model to
    stop is missing or unlabelled."""
    task, cfg = get_task("summarization"), data_cfg("summarization")
    rows = [{"document": "The cat sat on the mat all day.", "summary": "A cat sat."}]
    (ex,) = encode_supervised(task, task.template(cfg), tok, rows, cfg, 64)
    prompt = tok("The cat sat on the mat all day.\nTL;DR:", add_special_tokens=False)["input_ids"]
    target = tok(" A cat sat.", add_special_tokens=False)["input_ids"] + [EOS]
    assert ex["input_ids"] == prompt + target
    assert ex["labels"] == [-100] * len(prompt) + target
    assert not ex["source_truncated"] and not ex["target_truncated"]


def test_over_long_examples_lose_the_end_of_the_source(tok):
    """Over max_seq_len, the source (document) loses its END; the template suffix and the whole target + EOS
    stay. Failing means the target is truncated instead of the source (the model learns cut-off summaries
    without EOS), the source is cut from the wrong end, or the template cue is cut."""
    task, cfg = get_task("summarization"), data_cfg("summarization")
    document = " ".join(f"w{i}" for i in range(80))
    rows = [{"document": document, "summary": "The short summary of it."}]
    (ex,) = encode_supervised(task, task.template(cfg), tok, rows, cfg, 40)
    assert len(ex["input_ids"]) == 40 and ex["source_truncated"] and not ex["target_truncated"]
    target = tok(" The short summary of it.", add_special_tokens=False)["input_ids"] + [EOS]
    suffix = tok("\nTL;DR:", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][-len(target) :] == target and ex["labels"][-len(target) :] == target
    assert ex["labels"][: -len(target)] == [-100] * (40 - len(target))
    source = ex["input_ids"][: -len(target) - len(suffix)]
    assert ex["input_ids"][len(source) : -len(target)] == suffix
    assert source == tok(document, add_special_tokens=False)["input_ids"][: len(source)]  # its beginning
    # A target that alone exceeds the budget is the one case where the target is cut (and has no EOS).
    rows = [{"document": "x", "summary": "long " * 60}]
    (ex,) = encode_supervised(task, task.template(cfg), tok, rows, cfg, 40)
    assert ex["target_truncated"] and len(ex["input_ids"]) == 40 and EOS not in ex["labels"]


@pytest.mark.parametrize("task_name", ["summarization", "qa"])
def test_eval_prompts_truncate_the_source_not_the_template(tok, task_name):
    """encode_prompts fits each generation prompt into its budget by cutting the END of the source field (the
    document / context); the template around it (e.g. "\\nTL;DR:", or the question and "\\nAnswer:") survives
    whole, and prompts within budget are untouched. Failing means the model is asked without its cue or
    without the question, or sees the wrong part of the document."""
    task, cfg = get_task(task_name), data_cfg(task_name)
    long_source = " ".join(f"w{i}" for i in range(100))
    if task_name == "summarization":
        rows = [{"document": long_source, "summary": "s"}, {"document": "Short one.", "summary": "s"}]
        tail, short_text = "\nTL;DR:", "Short one.\nTL;DR:"
    else:
        answers = {"text": ["a"], "answer_start": [0]}
        rows = [
            {"context": long_source, "question": "Where does Ann live ?", "answers": answers},
            {"context": "Short one.", "question": "Who ?", "answers": answers},
        ]
        tail, short_text = (
            "\nQuestion: Where does Ann live ?\nAnswer:",
            "Short one.\nQuestion: Who ?\nAnswer:",
        )
    budget = 30
    long_prompt, short_prompt = encode_prompts(task, task.template(cfg), tok, rows, cfg, budget)
    tail_ids = tok(tail, add_special_tokens=False)["input_ids"]
    assert len(long_prompt) == budget
    assert long_prompt[-len(tail_ids) :] == tail_ids
    source_ids = tok(long_source, add_special_tokens=False)["input_ids"]
    assert long_prompt[: -len(tail_ids)] == source_ids[: budget - len(tail_ids)]
    assert short_prompt == tok(short_text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ positions


def test_packed_documents_restart_positions_in_every_block(tok):
    """encode_documents(packing=True) against a reference built from the token stream: in a block starting at
    stream offset i, the token at j has position j - max(start of its document, i), so positions restart at 0
    at every document start AND at the start of a block that continues a document (also one spanning several
    blocks), never reaching max_len; each document's first token has no label. Failing means a continued
    document carries positions from the previous block (out of range or wrong), or a document's first token is
    trained from the previous document."""
    task, cfg = get_task("generation"), data_cfg("generation")
    texts = [
        "one two three",
        " ".join(f"word{i}" for i in range(20)),
        "a b",
        " ".join(f"x{i}" for i in range(7)),
        "end",
    ]
    max_len = 8
    blocks = encode_documents(task, tok, [{"text": t} for t in texts], cfg, max_len, packing=True)
    stream, starts = [], []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"] + [EOS]
        starts += [len(stream)] * len(ids)
        stream += ids
    expected = []
    for i in range(0, len(stream), max_len):
        js = range(i, min(i + max_len, len(stream)))
        if len(js) > 1:
            expected.append(
                {
                    "input_ids": [stream[j] for j in js],
                    "position_ids": [j - max(starts[j], i) for j in js],
                    "labels": [-100 if j == starts[j] else stream[j] for j in js],
                }
            )
    assert any(
        len(set(starts[i : i + max_len])) == 1 for i in range(0, len(stream), max_len)
    )  # mid-doc block
    assert [{k: b[k] for k in ("input_ids", "position_ids", "labels")} for b in blocks] == expected
    assert all(max(b["position_ids"]) < max_len for b in blocks)


def test_pack_collate_restarts_positions_per_example():
    """pack_collate gives each example positions 0..n-1 (or the example's own position_ids, e.g. a generation
    block), and the trailing padding its own segment from 0. Failing means examples in a row are one long
    sequence to the model (they attend to each other) or get shifted position embeddings."""
    g = torch.Generator().manual_seed(4)
    feats = []
    for n in (6, 9, 4, 7, 3):
        ids = torch.randint(1, 50000, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    feats[1]["position_ids"] = [0, 1, 2, 3, 0, 1, 2, 0, 1]  # a block holding three documents
    batch = pack_collate(feats, EOS, row_len=16)
    assert batch["input_ids"].shape[0] < len(feats)
    covered = covered_positions(batch, feats)
    for f in feats:
        row, start = locate(batch["input_ids"], f["input_ids"])
        expected = f.get("position_ids") or list(range(len(f["input_ids"])))
        assert batch["position_ids"][row, start : start + len(f["input_ids"])].tolist() == expected
    for row in range(batch["input_ids"].shape[0]):
        pad = (~covered[row]).nonzero().flatten().tolist()
        assert batch["position_ids"][row, pad].tolist() == list(range(len(pad)))


# ------------------------------------------------------------------------------------------------ gradients


class SimulatedRank:
    """What backward_window uses of an Accelerator, for rank `rank` of `world` ranks run one after another in
    this process: gather sees every rank's value (given beforehand), backward divides by the accumulation
    steps as accelerate's does, and the caller averages the ranks' gradients as DDP's all-reduce does."""

    def __init__(self, rank: int, world_targets: list[int], accumulation: int):
        self.rank, self.world_targets = rank, world_targets
        self.num_processes, self.gradient_accumulation_steps = len(world_targets), accumulation
        self.device = torch.device("cpu")

    def gather(self, tensor):
        assert tensor.item() == self.world_targets[self.rank]
        return torch.tensor(self.world_targets, dtype=tensor.dtype)

    def no_sync(self, model):
        return contextlib.nullcontext()

    def backward(self, loss):
        (loss / self.gradient_accumulation_steps).backward()

    def reduce(self, tensor, reduction):
        return tensor  # this rank's share; the caller sums the shares


def test_gradient_of_ranks_and_accumulation_equals_one_big_batch():
    """backward_window on 2 ranks × (2 accumulated micro-batches of B), gradients averaged over the ranks as
    DDP does, == backward_window on 1 process with one batch of all 4B examples: gradient of (sum of token
    losses) / (target tokens of the whole window on all ranks). Failing means N processes train with 1/N of
    the gradient (the num_processes factor that undoes DDP's mean is lost), the loss is normalised per rank or
    per micro-batch (examples of short batches over-weighted), or the reported loss is not the window's mean.
    """
    from accelerate import Accelerator

    g = torch.Generator().manual_seed(5)
    feats = []
    for n, masked in ((12, 2), (6, 4), (9, 1), (4, 1), (11, 7), (5, 2), (8, 3), (7, 1)):
        ids = torch.randint(1, 128, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * masked + ids[masked:]})
    big = Accelerator(cpu=True)
    model = tiny_gpt2()
    big_loss = backward_window(big, model, [pad_collate(feats, 0)])
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}

    ranks = [[feats[0:1], feats[1:4]], [feats[4:6], feats[6:8]]]  # uneven targets per micro-batch and rank
    targets = [sum(sum(x != -100 for x in f["labels"][1:]) for m in r for f in m) for r in ranks]
    assert targets[0] != targets[1]
    mean = {k: torch.zeros_like(v) for k, v in expected.items()}
    loss = 0.0
    for rank, micro in enumerate(ranks):
        replica = tiny_gpt2()
        loss += backward_window(SimulatedRank(rank, targets, 2), replica, [pad_collate(m, 0) for m in micro])
        for k, p in replica.named_parameters():
            mean[k] += p.grad / len(ranks)
    assert float(loss) == pytest.approx(float(big_loss), rel=1e-5)
    for k in expected:
        torch.testing.assert_close(mean[k], expected[k], atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ data order


def test_epoch_sampler_reshuffles_every_epoch_deterministically():
    """EpochSampler: a permutation; the same (seed, epoch) gives the same order on any instance (a resumed run
    skips exactly what it consumed), another epoch or another seed a different one, with or without length
    grouping; build_train_loader's batches follow it. Failing means every epoch replays the same order, or a
    resume sees another order than the run it continues."""
    lengths = [random.Random(i).randint(3, 40) for i in range(96)]
    for group in (False, True):
        orders = {}
        for seed, epoch in ((1, 0), (1, 1), (1, 2), (2, 0)):
            sampler = EpochSampler(lengths, seed, group_by_length=group, batch_size=8)
            sampler.set_epoch(epoch)
            orders[seed, epoch] = list(sampler)
            again = EpochSampler(lengths, seed, group_by_length=group, batch_size=8)
            again.set_epoch(epoch)
            assert list(again) == orders[seed, epoch]
            assert sorted(orders[seed, epoch]) == list(range(len(lengths)))
        assert len({tuple(o) for o in orders.values()}) == 4, group

    from datasets import Dataset

    ds = Dataset.from_list([{"input_ids": [i + 1] * 3, "labels": [i + 1] * 3} for i in range(40)])
    loader = build_train_loader(ds, batch_size=4, seed=7, packing=True, pad_id=0, row_len=16)
    epochs = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        epochs.append([sorted(set(b["input_ids"].flatten().tolist()) - {0}) for b in loader])
    assert sorted(i for b in epochs[0] for i in b) == list(range(1, 41))
    assert epochs[0] != epochs[1]


# ------------------------------------------------------------------------------------------------ generation


def chain_model(tok, chain: dict[str, str]):
    """A 1-layer GPT-2 whose greedy next token is a fixed function of the current token: every block output is
    zero, so the last hidden state is LayerNorm(wte[token]), and the untied head maps it to chain[token]."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2, tie_word_embeddings=False,
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = {}
    for text in {*chain, *chain.values()}:
        (ids[text],) = tok(text, add_special_tokens=False)["input_ids"]  # one token each
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        for k, (src, dst) in enumerate(chain.items()):
            model.transformer.wte.weight[ids[src], k] = 1.0
            model.lm_head.weight[ids[dst], k] = 10.0
    return model


def test_stop_strings_end_generation(tok):
    """A model that deterministically writes " sat\\n on on on ..." after "The cat": with stop string "\\n"
    its completion ends right after the newline and is flagged stopped, while the other row of the batch runs
    on to max_new_tokens (not stopped); without stop strings it runs to max_new_tokens. The task's
    post-processing then cuts at the stop string. Failing means completions run past their stop string (slow
    evaluation, junk in predictions) or `stopped` misreports it."""
    model = chain_model(tok, {" cat": " sat", " sat": "\n", "\n": " on", " on": " on"})
    prompts = [
        tok("The cat", add_special_tokens=False)["input_ids"],
        tok("Go on", add_special_tokens=False)["input_ids"],
    ]
    texts, stopped = generate_batch(model, tok, prompts, Decoding(max_new_tokens=8, stop_strings=("\n",)))
    assert texts == [" sat\n", " on" * 8]
    assert stopped == [True, False]
    texts, stopped = generate_batch(model, tok, prompts, Decoding(max_new_tokens=8))
    assert texts == [" sat\n" + " on" * 6, " on" * 8]
    assert stopped == [False, False]
    assert get_task("summarization").postprocess(" sat\n on on", ("\n",)) == "sat"


def test_beam_search_and_sampling_run_and_are_seeded(tok):
    """generate_batch with num_beams > 1: deterministic, each prompt's beams in a left-padded batch equal the
    prompt alone, and the search finds a completion more probable than greedy's. With do_sample: the same
    torch seed gives the same completions, other seeds other ones. Failing means eval.num_beams /
    eval.do_sample do not reach `generate`, beam search or sampling breaks on padded batches, or sampled
    evaluations are not reproducible from the run's seed."""
    model = tiny_gpt2(vocab_size=len(tok), n_positions=64, seed=6).eval()
    prompts = [
        tok(t, add_special_tokens=False)["input_ids"]
        for t in ("Hello there", "A much longer prompt, see", "Hi")
    ]
    beams = Decoding(max_new_tokens=5, num_beams=3)
    batched, _ = generate_batch(model, tok, prompts, beams)
    assert len(batched) == 3
    assert generate_batch(model, tok, prompts, beams)[0] == batched
    assert [generate_batch(model, tok, [p], beams)[0][0] for p in prompts] == batched

    def logprob(prompt: list[int], completion: str) -> float:
        new = tok(completion, add_special_tokens=False)["input_ids"]
        assert tok.decode(new) == completion
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + new])).logits[0].float(), -1)
        return sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(new))

    # The beams really search: some completion differs from greedy's and is more probable under the model.
    greedy, _ = generate_batch(model, tok, prompts, Decoding(max_new_tokens=5))
    assert any(
        b != g and logprob(p, b) > logprob(p, g) for p, b, g in zip(prompts, batched, greedy, strict=True)
    )

    sampling = Decoding(max_new_tokens=6, do_sample=True, temperature=1.0, top_p=1.0)

    def sample(seed: int) -> list[str]:
        torch.manual_seed(seed)
        return generate_batch(model, tok, prompts, sampling)[0]

    assert sample(0) == sample(0)
    assert len({tuple(sample(s)) for s in range(3)}) == 3


def test_default_max_new_tokens_by_hand(tok):
    """default_max_new_tokens = int(longest reference in tokens (with its leading space) × 1.25) + 4, capped
    at 256; 24 with no reference. Failing means evaluations cut completions shorter than their references, or
    waste decoding steps."""
    # " a b c d e f g h i" is 9 GPT-2 tokens: int(9 × 1.25) + 4 = 15.
    assert len(tok(" a b c d e f g h i", add_special_tokens=False)["input_ids"]) == 9
    refs = [["a b c"], ["x", "a b c d e f g h i"], ["a b"]]
    assert default_max_new_tokens(tok, refs) == 15
    # 8 tokens: int(10.0) + 4 = 14; a single reference list.
    assert default_max_new_tokens(tok, [["a b c d e f g h"]]) == 14
    assert default_max_new_tokens(tok, [["word " * 300]]) == 256
    assert default_max_new_tokens(tok, []) == 24
