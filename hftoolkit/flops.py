"""Model FLOPs per token and MFU (nanoGPT's convention: 6·N + 12·L·H·Q·T per trained token).

The convention counts the LM head (N includes the tied token embeddings) at every token. With the prompt masked,
hftoolkit runs the head only at target positions (speedups.enable_target_only_head), so for summarization/QA the
logged MFU is the utilisation a full-head step would need for the same tokens/s, above what the hardware executes.
For generation (every position a target) the two agree."""

from __future__ import annotations

# Dense bf16 tensor-core peaks (FLOP/s), per device, from the vendors' spec sheets (no sparsity).
PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16
    "T4": 65e12,  # fp16
}


def flops_per_token(model, seq_len: int) -> float | None:
    """6·N (forward + backward of the weights) + 12·L·H·Q·T (attention scores and values), N without embeddings
    of positions (nanoGPT counts token embeddings because they are tied to the LM head)."""
    config = getattr(model, "config", None)
    n_layer = getattr(config, "n_layer", None) or getattr(config, "num_hidden_layers", None)
    n_head = getattr(config, "n_head", None) or getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "n_embd", None) or getattr(config, "hidden_size", None)
    if not (n_layer and n_head and hidden):
        return None
    n_params = sum(p.numel() for p in model.parameters())
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)
    if wpe is not None:
        n_params -= wpe.weight.numel()
    return 6.0 * n_params + 12.0 * n_layer * n_head * (hidden // n_head) * seq_len


def device_peak_flops(device) -> float | None:
    """bf16 dense peak of a CUDA device from the table above (None on CPU/unknown: MFU is then not reported)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    return None
