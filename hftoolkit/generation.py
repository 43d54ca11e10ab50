"""Batched, left-padded, KV-cached generation with stop strings.

Decoder-only models continue from the last position of each row, so batched prompts are padded on the LEFT;
the attention mask hides the padding and `generate` derives position ids from it, so a prompt gives the same
greedy output alone or in a padded batch (tested).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Decoding:
    """Decoding settings shared by evaluation, `hftoolkit generate` and the model card."""

    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()

    def generate_kwargs(self) -> dict:
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


_STOP_TOKEN_CACHE: dict[tuple[int, int, tuple[str, ...]], tuple[int, ...]] = {}


def stop_token_ids(tokenizer, stop_strings: tuple[str, ...]) -> tuple[int, ...]:
    """Ids of the tokens whose text contains a stop string, computed once per tokenizer.

    They are passed to `generate` as extra EOS ids, so a row stops at the first token carrying "\n" with no
    per-step string matching. transformers' own `stop_strings` builds its token tables on every `generate`
    call (≈ 0.4 s for GPT-2's 50k vocabulary, measured in benchmarks/) — more than a whole eval batch of a small
    model. A stop string split across several tokens is still cut by the task's post-processing.
    """
    key = (id(tokenizer), len(tokenizer), tuple(stop_strings))
    if key not in _STOP_TOKEN_CACHE:
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _STOP_TOKEN_CACHE[key] = tuple(
            i for i, text in enumerate(pieces) if any(s and s in text for s in stop_strings)
        )
    return _STOP_TOKEN_CACHE[key]


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], decoding: Decoding, synced_gpus: bool = False):
    """Completions (decoded, special tokens dropped) for token-id prompts, plus whether each one stopped by
    itself (EOS or a stop string) rather than running into max_new_tokens.

    Greedy decoding goes through `greedy_decode` (finished rows leave the batch); beam search, sampling and
    lockstep generation (synced_gpus) through `model.generate`."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, device)
    eos_ids = [tokenizer.eos_token_id, *stop_token_ids(tokenizer, decoding.stop_strings)]
    if can_decode_greedily(model, decoding, synced_gpus):
        rows = greedy_decode(model, ids, mask, eos_ids, decoding.max_new_tokens)
    else:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids,
            use_cache=True,
            synced_gpus=synced_gpus,
            **decoding.generate_kwargs(),
        )
        rows = out[:, ids.shape[1] :].tolist()
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    stopped = []
    eos_set = set(eos_ids)
    for row, text in zip(rows, texts, strict=True):
        ended_by_eos = not eos_set.isdisjoint(row)
        ended_by_stop = any(s and s in text for s in decoding.stop_strings)
        stopped.append(ended_by_eos or ended_by_stop or len(row) < decoding.max_new_tokens)
    return texts, stopped


def can_decode_greedily(model, decoding: Decoding, synced_gpus: bool) -> bool:
    """Whether `greedy_decode` can stand in for `model.generate`: greedy search, no lockstep with other processes
    (greedy_decode stops as soon as this process's rows are done, while ZeRO-3 / FSDP need every process to run
    the same number of forwards), and a decoder-only model whose forward takes a transformers `Cache`."""
    import inspect

    if decoding.num_beams != 1 or decoding.do_sample or synced_gpus:
        return False
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(hf.config, "is_encoder_decoder", False):
        return False
    return "cache" in inspect.signature(type(hf).forward).parameters


def greedy_decode(
    model, ids: torch.Tensor, mask: torch.Tensor, eos_ids, max_new_tokens: int
) -> list[list[int]]:
    """Greedy search over a left-padded batch, returning each row's new tokens up to and including its first EOS
    id: the tokens `model.generate(do_sample=False, num_beams=1)` produces, without its trailing padding.

    Why not `generate`: it keeps decoding a finished row until the whole batch is done, so a batch costs its
    slowest row × its number of rows. Here a row leaves the batch, and its KV cache, at its EOS; once the longest
    prompts have left, the padding columns no row needs are cut from the cache too. A fine-tuned model stops at
    varied lengths, so this is most of the decoding work of an eval batch. Each remaining row computes what it
    would in the full batch (the same inputs, positions from the mask as `generate` derives them, and keys of
    other rows never mix), so the tokens match `generate`'s (tested against it).
    """
    from transformers import DynamicCache

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache = DynamicCache(config=hf.config)
    mask = mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    eos = torch.tensor(sorted(set(eos_ids)), device=ids.device)
    rows: list[list[int]] = [[] for _ in range(ids.shape[0])]
    alive = list(range(ids.shape[0]))  # batch row → index into `rows`
    logits = hf(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        **last_logits(hf),
    ).logits
    position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        tokens = logits[:, -1].float().argmax(-1)
        finished = torch.isin(tokens, eos)
        for row, token in zip(alive, tokens.tolist(), strict=True):
            rows[row].append(token)
        if step == max_new_tokens - 1:
            break
        if finished.any():
            keep = (~finished).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            alive = [alive[i] for i in keep.tolist()]
            cache.batch_select_indices(keep)
            tokens, mask, position = tokens[keep], mask[keep], position[keep]
            mask = drop_padding_columns(cache, mask)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = hf(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=position, cache=cache, use_cache=True
        ).logits
        position = position + 1
    return rows


def last_logits(hf) -> dict:
    """The prefill needs the logits of the last position only; most models can skip the others."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(hf).forward).parameters else {}


def drop_padding_columns(cache, mask: torch.Tensor) -> torch.Tensor:
    """Cut the leading cache columns that are padding in every remaining row (they were the left padding of rows
    that have left the batch); returns the mask to match. Only full-attention dynamic layers are cut: a sliding
    window layer's columns are not aligned with the mask."""
    from transformers.cache_utils import DynamicLayer

    first = int(mask.any(dim=0).long().argmax())
    if first == 0 or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return mask
    for layer in cache.layers:
        layer.keys = layer.keys[..., first:, :]
        layer.values = layer.values[..., first:, :]
    return mask[:, first:]


@contextlib.contextmanager
def generation_context(accelerator, model):
    """Make a (possibly sharded) model usable by `generate` on every rank.

    DDP / single device: nothing to do. FSDP(1): gather full parameters for the duration (GPT-2-class models
    fit on one device). DeepSpeed ZeRO-3: parameters are gathered per layer on the fly, but every rank must run
    the same number of forward passes, so generation runs with synced_gpus=True (see `needs_synced_gpus`).
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2 is False:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False, recurse=True):
            yield accelerator.unwrap_model(model)
        return
    yield accelerator.unwrap_model(model)


def needs_synced_gpus(accelerator) -> bool:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3
    return accelerator.distributed_type == DistributedType.FSDP and accelerator.num_processes > 1
