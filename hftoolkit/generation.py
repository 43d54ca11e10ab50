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
    itself (EOS or a stop string) rather than running into max_new_tokens."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, device)
    kwargs = decoding.generate_kwargs()
    eos_ids = [tokenizer.eos_token_id, *stop_token_ids(tokenizer, decoding.stop_strings)]
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids,
        use_cache=True,
        synced_gpus=synced_gpus,
        **kwargs,
    )
    new = out[:, ids.shape[1] :]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    stopped = []
    eos_set = set(eos_ids)
    for row, text in zip(new.tolist(), texts, strict=True):
        ended_by_eos = not eos_set.isdisjoint(row)
        ended_by_stop = any(s and s in text for s in decoding.stop_strings)
        stopped.append(ended_by_eos or ended_by_stop or len(row) < decoding.max_new_tokens)
    return texts, stopped


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
