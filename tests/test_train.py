"""End-to-end training on CPU with a tiny GPT-2: files, overrides, reload, accumulation, EOS."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hftoolkit.evaluation import token_losses
from tests.conftest import tiny_gpt2, tiny_overrides

QS = "recipes/quickstart"


def test_tiny_model_overfits_one_batch():
    """The loss function and a plain AdamW loop can drive a tiny GPT-2's loss down on one batch."""
    from hftoolkit.data import pack_collate

    model = tiny_gpt2()
    g = torch.Generator().manual_seed(1)
    feats = [
        {
            "input_ids": (ids := torch.randint(1, 128, (10,), generator=g).tolist()),
            "labels": [-100] * 4 + ids[4:],
        }
        for _ in range(4)
    ]
    batch = pack_collate(feats, 0, 40)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        s, n = token_losses(model, batch)
        loss = s.sum() / n.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_train_writes_the_run_directory(tmp_path, cli):
    """`hftoolkit train` writes every file of the contract, the model reloads with plain transformers and
    generates through pipeline(), and `hftoolkit generate` / `hftoolkit eval` work on it."""
    out = tmp_path / "run"
    code, _, err = cli("train", f"{QS}/summarization.yaml", *tiny_overrides(out))
    assert code == 0, err
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "results.json",
        "predictions.jsonl",
        "report.md",
        "README.md",
    ):
        assert (out / name).is_file(), name
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "hftoolkit.json",
    ):
        assert (out / "model" / name).is_file(), name
    assert list((out / "plots").glob("*.png"))
    results = json.loads((out / "results.json").read_text())
    assert set(results["baseline"]) >= {"rouge1", "rouge2", "rougeL", "rougeLsum", "eval_loss"}
    assert set(results["final"]) >= {"rouge1", "rougeL"}
    assert all(0 <= results["final"][k] <= 100 for k in ("rouge1", "rougeL"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train_lines] == [2, 4]
    assert {"loss", "learning_rate", "tokens_per_second"} <= set(train_lines[0])
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and {"prompt", "references", "prediction", "score"} <= set(preds[0])

    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.generation_config.eos_token_id == tok.eos_token_id == model.generation_config.pad_token_id
    gen = pipeline("text-generation", model=str(out / "model"))
    text = gen(preds[0]["prompt"], max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith(preds[0]["prompt"])

    code, stdout, err = cli(
        "generate", out / "model", "--input", "Zoe likes cake . The main news is that Zoe won ."
    )
    assert code == 0, err
    assert stdout.strip() != "" or stdout == "\n"

    eval_out = tmp_path / "eval"
    code, _, err = cli(
        "eval",
        f"{QS}/summarization.yaml",
        *tiny_overrides(eval_out),
        "model.init=null",
        f"model.name_or_path={out / 'model'}",
    )
    assert code == 0, err
    scored = json.loads((eval_out / "results.json").read_text())
    assert "baseline" not in scored
    # Same model, same eval set, same decoding: the eval command reproduces the training run's final scores.
    assert scored["final"]["rougeL"] == pytest.approx(results["final"]["rougeL"])


def test_override_changes_behaviour(tmp_path, cli):
    """An override reaches the run: max_steps changes the number of optimizer steps, and config.yaml says so."""
    out = tmp_path / "run"
    code, _, err = cli(
        "train",
        f"{QS}/generation.yaml",
        *tiny_overrides(out, **{"train.max_steps": 2, "train.logging_steps": 1}),
    )
    assert code == 0, err
    steps = [
        json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x
    ]
    assert steps == [1, 2]
    assert "max_steps: 2" in (out / "config.yaml").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["final"]["perplexity"] < results["baseline"]["perplexity"]


def test_backward_window_gradient_equals_one_big_batch():
    """Two accumulated micro-batches of uneven target counts give the gradient of one batch holding both:
    the loss is normalised by the window's target tokens (a mean of micro-batch means would not)."""
    from accelerate import Accelerator

    from hftoolkit.data import pad_collate
    from hftoolkit.train import backward_window

    g = torch.Generator().manual_seed(3)
    feats = []
    for n, masked in ((12, 2), (6, 4), (9, 1), (4, 1)):
        ids = torch.randint(1, 128, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * masked + ids[masked:]})
    grads = []
    for accum, micro in ((1, [feats]), (2, [feats[:1], feats[1:]])):
        acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
        model = tiny_gpt2()
        backward_window(acc, model, [pad_collate(m, 0) for m in micro])
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-4)


def test_accumulation_equals_one_big_batch(tmp_path, cli):
    """Through `hftoolkit train`: 8 examples × 1 micro-batch and 4 × 2 accumulated log the same losses and end
    with the same weights. Adam's first steps move a weight by ≈ lr·sign(gradient), so float noise in a gradient
    that is ≈ 0 would move it by ±lr either way; an epsilon of 1e-3 damps those updates and keeps the real ones."""
    common = {
        "train.adam_epsilon": 1e-3,
        "model.dropout": 0.0,
        "train.max_steps": 3,
        "train.learning_rate": 1e-2,
        "eval.baseline": "false",
        "train.max_grad_norm": 0,
    }
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("train", f"{QS}/qa.yaml", *tiny_overrides(a, **common))[0] == 0
    assert (
        cli(
            "train",
            f"{QS}/qa.yaml",
            *tiny_overrides(
                b,
                **common,
                **{"train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 2},
            ),
        )[0]
        == 0
    )
    losses = [
        [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
        for d in (a, b)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=5e-4, rtol=1e-3)


def test_periodic_eval_on_a_budgeted_subset(tmp_path, cli):
    """eval_steps evaluates during training on max_eval_samples_during_training prompts; baseline and final use
    the whole eval set (a run could otherwise report a subset score as its final result)."""
    out = tmp_path / "run"
    extra = {"train.eval_steps": 2, "eval.max_eval_samples_during_training": 3}
    code, _, err = cli("train", f"{QS}/translation.yaml", *tiny_overrides(out, **extra))
    assert code == 0, err
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    # Step 4 twice: the last step competes for the best checkpoint on the subset, then the final eval on all.
    assert [e["step"] for e in evals] == [0, 2, 4, 4]
    assert all({"bleu", "chrf", "eval_loss"} <= set(e) for e in evals)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 8
