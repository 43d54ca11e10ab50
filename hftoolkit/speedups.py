"""Model-level speed-ups, applied to every run's model before accelerate wraps it (`speed_up`), and the probe
that decides whether packing is safe for an architecture. None changes what the model computes beyond float
rounding; tests/test_architectures.py checks each against the stock model.

Usage: targets_only = speed_up(model) after loading; token_losses(model, batch, targets_only).
"""

from __future__ import annotations

# Model types whose *ForCausalLM.forward is exactly `lm_head(base_model(...).last_hidden_state)`: no logit scaling,
# soft-capping or bias added after the head (checked in transformers 5.24's modeling files).
TARGET_ONLY_HEAD_TYPES = frozenset(
    {"gpt2", "gpt_neo", "gpt_neox", "gptj", "opt", "bloom", "codegen", "gpt_bigcode", "falcon", "llama", "mistral",
     "qwen2", "phi"}
)  # fmt: skip
TARGET_LABELS = "hftoolkit_target_labels"
TARGET_POSITIONS = "hftoolkit_target_positions"


def _target_only_forward(self, *args, **kwargs):
    """The model's own forward, unless called with `hftoolkit_target_labels=labels`: then it runs the body, applies
    the LM head only at positions whose (shifted) label is a target, and returns (per-row summed cross-entropy,
    per-row target counts) instead of the (batch × length × vocab) logits.

    `hftoolkit_target_positions` (optional): those positions as flat indices, computed by the collator on the
    host. Finding them on the device instead (nonzero) has a data-dependent size: a GPU→CPU sync per forward."""
    labels = kwargs.pop(TARGET_LABELS, None)
    positions = kwargs.pop(TARGET_POSITIONS, None)
    if labels is None:
        return type(self).forward(self, *args, **kwargs)
    import torch

    inputs = {
        k: kwargs.get(k) for k in ("input_ids", "attention_mask", "position_ids") if kwargs.get(k) is not None
    }
    hidden = self.base_model(**inputs, use_cache=False).last_hidden_state
    shifted = target_labels(labels)
    if positions is None:
        positions = (shifted != -100).view(-1).nonzero().squeeze(1)
    logits = self.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions))
    nll = torch.nn.functional.cross_entropy(
        logits.float(), shifted.reshape(-1).index_select(0, positions), reduction="none"
    )
    rows = torch.div(positions, labels.shape[1], rounding_mode="floor")
    per_row = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return per_row, (shifted != -100).sum(dim=1)


def target_labels(labels):
    """Labels aligned with the positions that predict them: position t predicts label t+1, the last predicts
    nothing (-100). Shifting the labels rather than slicing the logits avoids copying the logits."""
    import torch

    return torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]


def target_positions(labels):
    """Flat indices (row × width + column) of the positions that have a target."""
    return (target_labels(labels) != -100).view(-1).nonzero().squeeze(1)


def enable_target_only_head(model) -> bool:
    """Let `token_losses` skip the LM head at positions without a target.

    With the prompt masked, most positions of a summarization or QA batch have no target, and with GPT-2's
    50k-token vocabulary the head and its log-softmax are most of a small model's step (0.27 s instead of 3.28 s
    for head + loss on an [8, 511] SciTLDR batch, see benchmarks/). The selection has to happen inside the module
    that accelerate wraps, so that DDP/FSDP/DeepSpeed see one ordinary forward: the model instance's `forward` is
    replaced by one that takes an extra keyword (the class and every other call, `generate` included, are
    untouched). Liger-Kernel patches forwards the same way. Returns False, leaving the model as it was, for model
    types not known to be plain `head(body(x))`.
    """
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: patch the inner model
    if (
        getattr(hf.config, "model_type", None) not in TARGET_ONLY_HEAD_TYPES
        or hf.get_output_embeddings() is None
    ):
        return False
    import functools
    import types

    # Keep the class forward's signature visible: `generate` inspects it (e.g. for `logits_to_keep`, which spares
    # the prefill the full-vocabulary logits of every prompt position).
    forward = functools.wraps(type(hf).forward)(
        lambda self, *args, **kwargs: _target_only_forward(self, *args, **kwargs)
    )
    hf.forward = types.MethodType(forward, hf)
    return True


def packing_keeps_examples_apart(model) -> bool:
    """Probe: does this model, given restarting position ids and no attention mask, keep packed examples apart?

    transformers builds the block-causal mask from position ids only in architectures whose mask code receives
    them: GPT-2, GPT-Neo, GPT-NeoX and Llama do; OPT (5.24) does not, so its packed examples would silently attend
    to each other. Rather than trust a list, run the model once on two short sequences packed in one row and
    compare the second with the same sequence run alone (two forwards of 11 tokens, before any wrapping).
    """
    import torch

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    vocab = hf.get_input_embeddings().num_embeddings
    device = next(hf.parameters()).device
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(0, vocab, (1, 5), generator=g), torch.randint(0, vocab, (1, 6), generator=g)
    row = torch.cat([first, second], dim=1).to(device)
    positions = torch.cat([torch.arange(5), torch.arange(6)]).unsqueeze(0).to(device)
    was_training = hf.training
    hf.eval()
    try:
        with torch.no_grad():
            packed = hf(input_ids=row, position_ids=positions, use_cache=False).logits[0, 5:].float()
            alone = hf(input_ids=second.to(device), use_cache=False).logits[0].float()
    finally:
        hf.train(was_training)
    return torch.allclose(packed, alone, rtol=1e-3, atol=1e-4 * max(1.0, alone.abs().max().item()))


def fuse_gelu(model) -> int:
    """Swap GPT-2's tanh-approximated GELU, written as 8 elementwise ops (NewGELUActivation, "gelu_new"; and
    FastGELUActivation), for torch's single fused kernel of the same formula (GELUTanh, "gelu_pytorch_tanh").
    Outputs differ by float rounding only (≤ 2.4e-7 measured); a GPT-2-124M step on 2 CPU cores took 8.3 s instead
    of 9.4 s. The config is left as it was, so the saved checkpoint is unchanged. Returns the modules swapped."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def speed_up(model) -> bool:
    """The in-place speed-ups every run applies to its model before accelerate wraps it; none changes what the
    model computes beyond float rounding (each is tested against the stock model). Returns whether the
    targets-only LM head is on (the `targets_only` of token_losses / backward_window)."""
    skip_padding_check(model)
    fuse_gelu(model)
    return enable_target_only_head(model)


def skip_padding_check(model) -> None:
    """Packed batches pass no attention_mask on purpose (position ids carry the example boundaries). transformers
    then inspects input_ids for pad tokens on every forward — a device→host sync in the hot loop, and a warning
    that is wrong here — so turn that check off on this model instance."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.warn_if_padding_and_no_attention_mask = lambda *args, **kwargs: None
