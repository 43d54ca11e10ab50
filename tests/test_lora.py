"""LoRA through peft: only the adapters train, model/ holds just the adapter, `hftoolkit merge` writes a plain
checkpoint with the same logits, and a LoRA run resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, tiny_overrides
from tests.test_resume import cut_back, reset_accelerate, train_losses

QA = str(REPO_ROOT / "recipes/quickstart/qa.yaml")
# The tiny model is built by model.init (no Hub id): the run must keep its base weights itself.
LORA = {
    "model.lora": "{r: 4, alpha: 8}",
    "train.max_steps": 4,
    "train.save_steps": 2,
    "train.logging_steps": 1,
    "eval.baseline": "false",
}
ADAPTED = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2 defaults c_attn/c_proj/c_fc


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    from hftoolkit.cli import main

    out = tmp_path_factory.mktemp("lora") / "run"
    try:
        assert main(["train", QA, *tiny_overrides(out, **LORA)]) == 0
    finally:
        reset_accelerate()
    return out


def test_lora_trains_only_the_adapters_and_saves_only_them(lora_run):
    """model/ holds the adapter (adapter_model.safetensors + adapter_config.json), tokenizer and hftoolkit.json,
    no full weights; every GPT-2 target module got trained A/B matrices; base_model/ holds the base, unchanged
    from its initialisation (frozen); the final evaluation generated with the peft model. Failing means LoRA
    trains (or saves) the whole model, misses target modules, or an init-built base is lost."""
    from transformers import AutoTokenizer

    from hftoolkit.modeling import create_model

    model_dir = lora_run / "model"
    names = {p.name for p in model_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "hftoolkit.json"} <= names
    assert not names & {"model.safetensors", "config.json"}
    adapter = load_file(model_dir / "adapter_model.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
    for layer in (0, 1):
        for module in ADAPTED:
            b = [v for k, v in adapter.items() if f".h.{layer}.{module}.lora_B." in k]
            assert len(b) == 1 and b[0].abs().sum() > 0, (layer, module)  # lora_B starts at 0: it trained
    config = json.loads((model_dir / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == (lora_run / "base_model").resolve()

    # The base weights after training == a fresh build with the run's seed: frozen, and saved as they were.
    tokenizer = AutoTokenizer.from_pretrained(lora_run / "base_model")
    fresh = create_model("tiny", tokenizer, seed=42).state_dict()
    saved = load_file(lora_run / "base_model" / "model.safetensors")
    assert saved.keys() <= fresh.keys() and "transformer.wte.weight" in saved
    for k in saved:
        torch.testing.assert_close(saved[k], fresh[k], atol=0, rtol=0)

    results = json.loads((lora_run / "results.json").read_text())
    assert {"exact_match", "f1", "eval_loss"} <= set(results["final"])
    assert len((lora_run / "predictions.jsonl").read_text().splitlines()) == 8


def test_merge_writes_a_plain_checkpoint_with_the_same_logits(lora_run, tmp_path, cli):
    """`hftoolkit merge RUN_DIR` writes base + merged adapters that load with AutoModelForCausalLM alone and
    give the logits of base + adapter through peft (which also finds the base from adapter_config.json alone).
    Failing means merged checkpoints are not what was trained (e.g. GPT-2's transposed Conv1D weights merged
    the wrong way round) or the adapter cannot be loaded back."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    code, stdout, err = cli("merge", lora_run, "--out", out)
    assert code == 0, err
    assert str(out) in stdout
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(merged).__name__ == "GPT2LMHeadModel"
    assert not any("lora" in name for name, _ in merged.named_modules())
    assert (out / "hftoolkit.json").is_file() and (out / "tokenizer.json").is_file()
    assert merged.generation_config.eos_token_id == merged.generation_config.pad_token_id

    with_adapter = AutoPeftModelForCausalLM.from_pretrained(lora_run / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(lora_run / "base_model").eval()
    ids = torch.randint(1, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-4)  # the adapter matters

    code, _, err = cli("merge", tmp_path / "not-a-run")
    assert code == 2 and "merge:" in err


def test_lora_resume_is_exact(lora_run, tmp_path, cli):
    """A LoRA run stopped after checkpoint 2 and resumed ends with the straight run's adapter and losses.
    Failing means the checkpoint does not restore the adapter/optimizer state of a peft model."""
    resumed = tmp_path / "resumed"
    cut_back(lora_run, resumed, 2)
    code, stdout, err = cli(
        "train", QA, *tiny_overrides(resumed, **LORA), "train.resume_from_checkpoint=latest"
    )
    assert code == 0, err
    assert "at step 2" in stdout
    assert train_losses(resumed) == pytest.approx(train_losses(lora_run), rel=1e-6)
    a = load_file(lora_run / "model" / "adapter_model.safetensors")
    b = load_file(resumed / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)


INPUT = '{"context": "Ann lives in Oslo .", "question": "Where does Ann live ?"}'


def test_generate_and_eval_work_on_the_lora_run_itself(lora_run, tmp_path, cli):
    """If this fails, a LoRA run's model/ cannot be used without a manual `hftoolkit merge` first, or using it
    directly gives other text or scores than the merged model (and than the run's own final evaluation)."""
    code, direct, err = cli("generate", lora_run / "model", "--input", INPUT, "--max-new-tokens", "6")
    assert code == 0, err
    merged = tmp_path / "merged"
    assert cli("merge", lora_run, "--out", merged)[0] == 0
    code, via_merge, err = cli("generate", merged, "--input", INPUT, "--max-new-tokens", "6")
    assert code == 0, err
    assert direct == via_merge and direct.strip()
    out = tmp_path / "eval"
    code, _, err = cli(
        "eval", QA, *tiny_overrides(out), "model.init=null", f"model.name_or_path={lora_run / 'model'}"
    )
    assert code == 0, err
    final = json.loads((out / "results.json").read_text())["final"]
    trained = json.loads((lora_run / "results.json").read_text())["final"]
    assert (
        final["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-5) and final["f1"] == trained["f1"]
    )


def test_push_of_a_lora_run_names_no_local_path(lora_run, cli):
    """If this fails, a pushed adapter points at a base that exists only on this machine (adapter_config.json's
    base is the run's base_model/ folder), or the upload folder leaks where the run lived."""
    code, _, err = cli("push", lora_run, "--repo-id", "alice/qa-lora", "--dry-run")
    line = next(x for x in err.splitlines() if x.startswith("error"))
    assert code == 2 and line == (
        f"error: push: {lora_run / 'model'} is a LoRA adapter whose base ({lora_run / 'base_model'}) is not on the "
        f"Hub, so the adapter alone could not be loaded from there; push the merged weights: hftoolkit push "
        f"{lora_run} --repo-id alice/qa-lora --merge-adapters (or hub.merge_adapters: true)"
    )
    code, out, err = cli("push", lora_run, "--repo-id", "alice/qa-lora", "--dry-run", "--merge-adapters")
    assert code == 0, err
    staged = lora_run / "hub_dry_run"
    names = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert {
        "model.safetensors",
        "config.json",
        "hftoolkit.json",
    } <= names and "adapter_config.json" not in names
    for path in staged.rglob("*"):
        if path.is_file():
            assert str(lora_run.parent).encode() not in path.read_bytes(), path
    assert not list(lora_run.glob(".hub_dry_run*"))  # the merged save beside the staging folder is gone
