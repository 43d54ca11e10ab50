"""Architecture-dependent paths. speedups.speed_up (targets-only LM head, fused GELU): same losses and gradients
as the stock model on every architecture, packed and padded, with LoRA; `generate` untouched; the head refused
where it is not plain `head(body(x))`. The packing probe, and checkpoints of other architectures end to end."""

import copy

import pytest
import torch
import transformers

from hftoolkit.data import pack_collate, pad_collate
from hftoolkit.evaluation import token_losses
from hftoolkit.generation import Decoding
from hftoolkit.speedups import enable_target_only_head, packing_keeps_examples_apart, speed_up
from tests.conftest import tiny_overrides

QS = "recipes/quickstart"


def _tiny(arch: str, vocab_size: int = 128):
    common = {"vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    configs = {
        "gpt2": lambda: transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, **common),
        "gpt_neo": lambda: transformers.GPTNeoConfig(
            max_position_embeddings=64, hidden_size=32, num_layers=2, num_heads=2,
            attention_types=[[["global", "local"], 1]], window_size=8, **common,
        ),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(
            max_position_embeddings=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, **common,
        ),
        "opt": lambda: transformers.OPTConfig(
            max_position_embeddings=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
            word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0, layerdrop=0.0, **common,
        ),
    }  # fmt: skip
    torch.manual_seed(0)
    attn = "eager" if arch == "gpt_neo" else "sdpa"  # GPT-Neo has no SDPA attention in transformers 5.x
    model = transformers.AutoModelForCausalLM.from_config(configs[arch](), attn_implementation=attn)
    model.train()
    for m in model.modules():  # deterministic: compare two forwards exactly
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for n, prompt in ((14, 9), (6, 3), (11, 8), (5, 1)):
        ids = torch.randint(1, 128, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return feats


def _loss_and_grads(model, batch, targets_only=False):
    model.zero_grad()
    per_row, counts = token_losses(model, batch, targets_only)
    (per_row.sum() / counts.sum()).backward()
    return (
        per_row.detach(),
        counts,
        {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
    )


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo", "gpt_neox", "opt"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_speed_up_equals_the_stock_model(arch, layout):
    from transformers.activations import NewGELUActivation

    full = _tiny(arch)
    fast = copy.deepcopy(full)
    assert speed_up(fast)  # the targets-only head is on
    assert not any(isinstance(m, NewGELUActivation) for m in fast.modules())  # GPT-2/GPT-Neo: fused GELU
    feats = _features()
    batch = pad_collate(feats, 0) if layout == "padded" else pack_collate(feats, 0, 24)
    if layout == "packed":
        assert batch["input_ids"].shape[0] < len(feats)
    loss_full, n_full, g_full = _loss_and_grads(full, batch)
    loss_fast, n_fast, g_fast = _loss_and_grads(fast, batch, targets_only=True)
    assert torch.equal(n_full, n_fast)
    assert n_fast.sum() < batch["input_ids"].numel() / 2  # the head really ran on few positions
    torch.testing.assert_close(loss_fast, loss_full, atol=1e-5, rtol=1e-5)
    assert g_full.keys() == g_fast.keys()
    for k in g_full:
        torch.testing.assert_close(g_fast[k], g_full[k], atol=1e-6, rtol=1e-4)
    # The collators hand over the target positions (no device→host sync to find them); without them the forward
    # finds them itself, with the same result.
    batch.pop("target_positions")
    loss_found, _, _ = _loss_and_grads(fast, batch, targets_only=True)
    torch.testing.assert_close(loss_found, loss_fast)


def test_targets_only_head_keeps_forward_and_generate():
    full = _tiny("gpt2").eval()
    fast = copy.deepcopy(full)
    assert enable_target_only_head(fast)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, full(input_ids=ids).logits)
        kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(fast.generate(ids, **kw), full.generate(ids, **kw))
    # generate reads the forward's signature: it must still see logits_to_keep (prefill then skips the LM head
    # on all prompt positions but the last).
    assert fast._supports_logits_to_keep()
    # A deep copy keeps the fast path, bound to the copy rather than the original.
    twin = copy.deepcopy(fast)
    assert twin.forward.__self__ is twin


def test_targets_only_head_with_lora():
    from hftoolkit.config import LoraConfig
    from hftoolkit.modeling import apply_lora

    full = apply_lora(_tiny("gpt2"), LoraConfig(r=4, alpha=8, dropout=0.0))
    for name, p in full.named_parameters():  # LoRA B starts at 0: move it so the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    fast = copy.deepcopy(full)
    assert enable_target_only_head(fast)
    batch = pack_collate(_features(1), 0, 24)
    loss_full, _, g_full = _loss_and_grads(full, batch)
    loss_fast, _, g_fast = _loss_and_grads(fast, batch, targets_only=True)
    torch.testing.assert_close(loss_fast, loss_full, atol=1e-5, rtol=1e-5)
    assert g_full.keys() == g_fast.keys() and any("lora_B" in k for k in g_fast)
    for k in g_full:
        torch.testing.assert_close(g_fast[k], g_full[k], atol=1e-6, rtol=1e-4)


def test_targets_only_head_refuses_soft_capped_logits():
    """Gemma 2 soft-caps its logits after the head: running the head alone would change the loss."""
    config = transformers.Gemma2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert not enable_target_only_head(model)
    assert "forward" not in vars(model)


@pytest.mark.parametrize(
    "arch,isolated", [("gpt2", True), ("gpt_neo", True), ("gpt_neox", True), ("opt", False)]
)
def test_packing_probe(arch, isolated):
    """OPT's mask code in transformers 5.24 ignores position ids, so packed OPT examples attend to each other;
    the probe must say so (and pass the architectures that build the block-causal mask)."""
    model = _tiny(arch)
    assert packing_keeps_examples_apart(model) is isolated
    assert model.training  # the probe restores the mode it found


@pytest.mark.parametrize("arch", ["opt", "gpt_neo"])
def test_other_architectures_train_from_a_checkpoint(arch, tmp_path, cli, gpt2_tokenizer):
    """OPT: its packed examples would attend to each other, so the run pads instead and says so. GPT-Neo: no SDPA
    in transformers 5.x, so a default that demanded SDPA would fail every GPT-Neo run."""
    ckpt = tmp_path / arch
    _tiny(arch, vocab_size=len(gpt2_tokenizer)).save_pretrained(ckpt)
    gpt2_tokenizer.save_pretrained(ckpt)
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(out) if not o.startswith("model.init")]
    code, stdout, stderr = cli(
        "train",
        f"{QS}/qa.yaml",
        *overrides,
        "model.init=null",
        f"model.name_or_path={ckpt}",
        "train.max_steps=2",
        "data.max_seq_len=64",
    )
    assert code == 0, stderr
    leak = "data.packing: OPTForCausalLM lets packed examples attend to each other"
    assert (leak in stdout) == (arch == "opt")
    assert (out / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo", "gpt_neox", "opt"])
def test_greedy_decode_equals_generate_on_every_architecture(arch):
    """greedy_decode's tokens are model.generate's on each architecture: for one left-padded batch, rows leaving at
    different steps; and under a budget that makes it refill, each prompt's tokens alone. GPT-Neo's local layers
    (window 8, prompts up to 20 tokens) count their window back from each query, so padding columns added on the
    left of a row or cut from it move nothing it sees; a cache that keeps only a window of columns (Mistral-style
    sliding layers) is not refilled."""
    from transformers import DynamicCache

    from hftoolkit.generation import can_decode_greedily, columns_movable, greedy_decode, left_pad
    from tests.test_generation import _generate_reference

    model = _tiny(arch).eval()
    assert can_decode_greedily(model, Decoding(), synced_gpus=False)
    assert columns_movable(DynamicCache(config=model.config))
    sliding = transformers.MistralConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, sliding_window=4
    )
    assert not columns_movable(DynamicCache(config=sliding))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (12, 3, 9, 20, 5, 14, 7)]
    ids, mask = left_pad(prompts, 0, "cpu")
    free = _generate_reference(model, ids, mask, {0}, 10)
    eos = {free[1][2], free[3][4]}
    batch = _generate_reference(model, ids, mask, eos, 10)
    assert len({len(r) for r in batch}) >= 2
    assert greedy_decode(model, prompts, 0, eos, 10) == batch
    alone = [_generate_reference(model, *left_pad([p], 0, "cpu"), eos, 10)[0] for p in prompts]
    assert greedy_decode(model, prompts, 0, eos, 10, budget=3 * (20 + 10), max_rows=3) == alone
