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


# On CPU a prefill runs fastest in forwards of about this many positions: then the activations of the
# element-wise ops (GPT-2's tanh GELU is six of them) stay in cache. GPT-2-tiny, 16 prompts of 400 tokens:
# 100 ms in one forward, 73 ms in four; 211 of 31: 109 ms, 89 ms in four (benchmarks/README.md, b).
CPU_PREFILL_POSITIONS = 2048


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    # One tensor from Python lists, not a copy per row (256 QA prompts: 0.8 ms instead of 3.7).
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts])
    mask = (torch.arange(width) >= width - lengths[:, None]).long()
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
def generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    decoding: Decoding,
    synced_gpus: bool = False,
    budget: int | None = None,
    max_rows: int | None = None,
):
    """Completions (decoded, special tokens dropped) for token-id prompts, plus whether each one stopped by
    itself (EOS or a stop string) rather than running into max_new_tokens.

    Greedy decoding goes through `greedy_decode` (continuous batching within `budget` tokens of KV cache and
    `max_rows` rows; unbounded: one batch); beam search, sampling and lockstep generation (synced_gpus) through
    `model.generate`, all prompts in one left-padded batch."""
    eos_ids = [tokenizer.eos_token_id, *stop_token_ids(tokenizer, decoding.stop_strings)]
    if can_decode_greedily(model, decoding, synced_gpus):
        rows = greedy_decode(
            model, prompts, tokenizer.pad_token_id, eos_ids, decoding.max_new_tokens, budget, max_rows
        )
    else:
        ids, mask = left_pad(prompts, tokenizer.pad_token_id, next(model.parameters()).device)
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
    model,
    prompts: list[list[int]],
    pad_id: int,
    eos_ids,
    max_new_tokens: int,
    budget: int | None = None,
    max_rows: int | None = None,
) -> list[list[int]]:
    """Greedy search with continuous batching: each prompt's new tokens up to and including its first EOS id,
    the tokens `model.generate(do_sample=False, num_beams=1)` produces for it, without trailing padding.

    Why not `generate`: it keeps decoding a finished row until its whole batch is done, so a batch costs its
    slowest row × its number of rows, and the next batch waits for it. Here a row leaves the batch, and its KV
    cache, at its EOS, and the next prompts (in the order given) take its place: they are prefilled in one
    forward once there is room for enough of them (`worth_admitting`), then decode alongside the rows already
    running. Room: rows × (their longest prompt + max_new_tokens) ≤ `budget`, and ≤ `max_rows` rows (a prompt
    that alone exceeds the budget still runs, alone). Once the longest prompts have left, the padding columns no
    row needs are cut from the cache too. A fine-tuned model stops at varied lengths, so this is most of the
    decoding work of an eval set.

    Each row computes what it would alone: its own inputs, positions from its own mask as `generate` derives
    them, and keys of other rows (or padding) never mix in, so the tokens match `generate`'s (tested against it).
    Models whose cache keeps only a window of columns keep their batches whole (`columns_movable`): the next
    prompts start when the running ones are done.

    For the GPT-2 family (`plain_head`) the output embedding is applied here, to the rows' last hidden states:
    rows just prefilled take their first token from the same pass as the running rows' next one, and on CPU large
    batches' logits go a vocabulary block at a time (`greedy_linear`). The cache changes in place (`ColumnBuffer`);
    on CPU, prefills run in forwards of at most CPU_PREFILL_POSITIONS positions and each row's largest logit is
    found lane by lane (`row_max`).
    """
    from collections import deque

    from transformers import DynamicCache

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(hf.parameters()).device
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    refill = columns_movable(DynamicCache(config=hf.config))
    # A row feeds at most max_new_tokens - 1 tokens after its prompt: the columns its cache can still need.
    reserve = max_new_tokens if refill else None
    chunk = CPU_PREFILL_POSITIONS if refill and device.type == "cpu" else None
    head = plain_head(hf)
    out: list[list[int]] = [[] for _ in prompts]
    queue = deque(range(len(prompts)))
    live: Rows | None = None
    while queue or live is not None:
        take = admissible(queue, prompts, live, budget, max_new_tokens, max_rows)
        if take and (live is None or (refill and worth_admitting(len(take), len(queue), len(live.index)))):
            for _ in take:
                queue.popleft()
            new, last = Rows.prefill(
                hf, head, take, [prompts[i] for i in take], pad_id, device, reserve, chunk
            )
            if live is not None and head is not None:
                # One pass over the output embedding for the running rows' step and the new rows' prefill.
                running = len(live.index)
                tokens = greedy_linear(torch.cat([live.step(hf, head), last]), head)
                live = live.pick(tokens[:running], out, eos, max_new_tokens)
                live = join(live, new.pick(tokens[running:], out, eos, max_new_tokens))
                continue
            live = join(live, new.pick(next_tokens(last, head), out, eos, max_new_tokens))
            if live is None:
                continue
        live = live.pick(next_tokens(live.step(hf, head), head), out, eos, max_new_tokens)
    return out


def admissible(queue, prompts, live, budget, max_new_tokens: int, max_rows) -> list[int]:
    """The next prompts of `queue` that fit beside the running rows: rows × (longest prompt + max_new_tokens)
    ≤ budget, rows ≤ max_rows (None: no bound). With nothing running, at least one."""
    rows = 0 if live is None else len(live.index)
    longest = 0 if live is None else max(live.prompt_len)
    take = []
    for i in queue:
        longest = max(longest, len(prompts[i]))
        over_budget = budget is not None and (rows + 1) * (longest + max_new_tokens) > budget
        if (rows or take) and (over_budget or (max_rows is not None and rows + 1 > max_rows)):
            break
        take.append(i)
        rows += 1
    return take


def worth_admitting(fits: int, waiting: int, running: int) -> bool:
    """A refill costs one prefill forward, whatever its rows; wait until it brings a third as many rows as are
    running (or every prompt left), so the forwards stay few and the batch stays full."""
    return fits == waiting or 3 * fits >= running


def columns_movable(cache) -> bool:
    """Whether every layer of a KV cache is a plain `DynamicLayer`: full attention, or a window counted back from
    each query as GPT-Neo's local layers count it. Then cache columns can be padded on the left and leading
    padding cut without moving any key relative to the queries that see it (tested on GPT-2, GPT-Neo, GPT-NeoX
    and OPT). Caches that keep only a window of columns (`DynamicSlidingWindowLayer`) cannot."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


class Rows:
    """The running rows of `greedy_decode`: prompt index, prompt length, KV cache, attention mask over the cache
    (left padding 0), the position and the input token of each row's next step."""

    def __init__(self, index, prompt_len, cache, mask, position):
        self.index, self.prompt_len, self.cache = index, prompt_len, cache
        self.mask, self.position, self.tokens = mask, position, None

    @classmethod
    def prefill(
        cls,
        hf,
        head,
        index: list[int],
        prompts: list[list[int]],
        pad_id: int,
        device,
        reserve=None,
        chunk=None,
    ):
        """New rows after their prompts' forward (left-padded together), and `forward_last` of it.
        `reserve`: the cache is `ColumnBuffer`s with that many spare columns (None: plain `DynamicCache`).
        `chunk`: one forward per group of consecutive prompts of at most that many positions once padded, the
        groups' caches then stacked (needs `reserve`)."""
        groups = prefill_groups(prompts, chunk) if chunk is not None else [range(len(prompts))]
        if len(groups) > 1:
            parts = [
                cls.prefill(hf, head, [index[i] for i in g], [prompts[i] for i in g], pad_id, device, reserve)
                for g in groups
            ]
            return cls.stack([rows for rows, _ in parts]), torch.cat([last for _, last in parts])
        from transformers import DynamicCache

        from hftoolkit.kv_cache import ColumnBuffer

        ids, mask = left_pad(prompts, pad_id, device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=hf.config)
        if reserve is not None:
            cache.layers = [ColumnBuffer(reserve) for _ in cache.layers]
        last = forward_last(hf, head, input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache)
        return cls(list(index), [len(p) for p in prompts], cache, mask, positions[:, -1:] + 1), last

    def step(self, hf, head) -> torch.Tensor:
        """One decoding forward, each row's last token in: `forward_last` of it."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        last = forward_last(
            hf,
            head,
            input_ids=self.tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.position,
            cache=self.cache,
        )
        self.position = self.position + 1
        return last

    def pick(self, tokens, out: list[list[int]], eos: torch.Tensor, max_new_tokens: int) -> Rows | None:
        """The greedy token of each row appended to its output; rows that end (an EOS id, or max_new_tokens
        tokens) leave, with their cache. None once no row is left."""
        finished = torch.isin(tokens, eos)
        for row, (i, token) in enumerate(zip(self.index, tokens.tolist(), strict=True)):
            out[i].append(token)
            if len(out[i]) >= max_new_tokens:
                finished[row] = True
        self.tokens = tokens
        if not finished.any():
            return self
        from hftoolkit.kv_cache import compacting_order

        rows = compacting_order(finished.tolist())
        if not rows:
            return None
        keep = torch.tensor(rows, device=tokens.device)
        self.cache.batch_select_indices(keep)
        self.index = [self.index[r] for r in rows]
        self.prompt_len = [self.prompt_len[r] for r in rows]
        self.tokens, self.mask, self.position = tokens[keep], self.mask[keep], self.position[keep]
        self.mask = drop_padding_columns(self.cache, self.mask)
        return self

    @staticmethod
    def stack(parts: list[Rows]) -> Rows:
        """The rows of `parts` (caches of `ColumnBuffer`s), in order, in one batch (the first part's object): each
        cache and mask padded on the left to the widest one's columns, then stacked."""
        rows = parts[0]
        width = max(part.mask.shape[1] for part in parts)
        for i, layer in enumerate(rows.cache.layers):
            layer.stack([part.cache.layers[i] for part in parts], width)
        rows.mask = torch.cat(
            [torch.nn.functional.pad(part.mask, (width - part.mask.shape[1], 0)) for part in parts]
        )
        rows.position = torch.cat([part.position for part in parts])
        tokens = [part.tokens for part in parts]
        rows.tokens = None if any(t is None for t in tokens) else torch.cat(tokens)
        rows.index = [i for part in parts for i in part.index]
        rows.prompt_len = [n for part in parts for n in part.prompt_len]
        return rows


def join(live: Rows | None, new: Rows | None) -> Rows | None:
    """The running rows and new ones in one batch (either may be None: none)."""
    if live is None or new is None:
        return new if live is None else live
    return Rows.stack([live, new])


def prefill_groups(prompts: list[list[int]], positions: int) -> list[range]:
    """Consecutive groups of `prompts`, each at most `positions` positions once left-padded to its longest
    prompt (a longer prompt alone)."""
    groups, start, longest = [], 0, 0
    for i, prompt in enumerate(prompts):
        longest = max(longest, len(prompt))
        if i > start and (i - start + 1) * longest > positions:
            groups.append(range(start, i))
            start, longest = i, len(prompt)
    groups.append(range(start, len(prompts)))
    return groups


# Architectures whose logits are their output embedding, a plain Linear, applied to the base model's last
# hidden state and nothing more (tested against `generate` on each): greedy decoding calls the two itself.
PLAIN_HEAD_MODELS = ("gpt2", "gpt_neo", "gpt_neox", "opt")

# On CPU, greedy decoding computes at most about this many logits at once (4 MB in float32): more rows' logits
# go a block of the vocabulary at a time, each block's best kept, so the logits never leave the cache.
# GPT-2-tiny, 211 rows: 37 ms for the logits and their argmax at once, 19 ms in blocks (benchmarks/README.md, b).
CPU_LOGITS_BLOCK = 1 << 20


def plain_head(hf):
    """The output embedding of `hf` when its logits are that Linear applied to `hf.base_model`'s last hidden
    state (PLAIN_HEAD_MODELS; a LoRA-wrapped head does not count), else None."""
    head = hf.get_output_embeddings()
    return head if hf.config.model_type in PLAIN_HEAD_MODELS and type(head) is torch.nn.Linear else None


def forward_last(hf, head, **inputs) -> torch.Tensor:
    """A forward with a cache, reduced to what the next token needs: each row's last hidden state when `head`
    (`plain_head`) is given, else its greedy next token."""
    if head is not None:
        return hf.base_model(**inputs, use_cache=True).last_hidden_state[:, -1]
    return row_max(hf(**inputs, use_cache=True, **last_logits(hf)).logits[:, -1].float())[1]


def next_tokens(last: torch.Tensor, head) -> torch.Tensor:
    """The greedy next tokens from `forward_last`'s result."""
    return last if head is None else greedy_linear(last, head)


def greedy_linear(hidden: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
    """Each row's index of the largest `head(hidden)` value, the first one on ties, as `generate` picks it
    (argmax of the logits in float32). On CPU, logits of more than CPU_LOGITS_BLOCK values are computed a block of
    vocabulary rows at a time: the same values (a logit is one row's dot product, whatever the block), never all
    in memory."""
    rows, vocab = hidden.shape[0], head.out_features
    if hidden.device.type != "cpu" or rows * vocab <= CPU_LOGITS_BLOCK:
        return row_max(head(hidden).float())[1]
    size = max(1, CPU_LOGITS_BLOCK // rows)
    best = None
    for start in range(0, vocab, size):
        bias = None if head.bias is None else head.bias[start : start + size]
        block = row_max(torch.nn.functional.linear(hidden, head.weight[start : start + size], bias).float())
        best = block if best is None else later_wins(best, block, start)
    return best[1]


# PyTorch's CPU max/argmax over a row does not vectorise; amax does, about 15x faster. row_max takes the amax of
# each lane of this many values, then argmax only over the lanes' maxima and within the winning lane: 16 rows of
# GPT-2's 50,257 logits, 0.09 ms instead of 0.42 (benchmarks/README.md, b).
CPU_ARGMAX_LANE = 256


def row_max(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's largest value of a 2-D tensor and its index as `argmax` picks it: the first on ties, the first
    NaN if there is one. Off CPU, or with fewer columns than a lane, through argmax itself."""
    rows, width = scores.shape
    full = width - width % CPU_ARGMAX_LANE
    if scores.device.type != "cpu" or full == 0:
        index = scores.argmax(-1)
        return scores.gather(-1, index[:, None]).squeeze(-1), index
    lanes = scores[:, :full].unflatten(1, (-1, CPU_ARGMAX_LANE))
    lane_max = lanes.amax(-1)  # NaN when the lane holds one
    lane = lane_max.argmax(-1)  # the first lane holding the row's maximum (or its first NaN)
    row = torch.arange(rows, device=scores.device)
    best = lane_max[row, lane], lane * CPU_ARGMAX_LANE + lanes[row, lane].argmax(-1)
    return best if full == width else later_wins(best, row_max(scores[:, full:]), full)


def later_wins(best, later, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`row_max` of a row's first columns merged with `row_max` of its columns from `offset` on: the later ones win
    only with a larger value (ties keep the first index), or with NaN, which argmax treats as the largest."""
    (value, index), (later_value, later_index) = best, later
    wins = (later_value > value) | (later_value.isnan() & ~value.isnan())
    return torch.where(wins, later_value, value), torch.where(wins, later_index + offset, index)


def last_logits(hf) -> dict:
    """The prefill needs the logits of the last position only; most models can skip the others."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(hf).forward).parameters else {}


def drop_padding_columns(cache, mask: torch.Tensor) -> torch.Tensor:
    """Cut the leading cache columns that are padding in every remaining row (they were the left padding of rows
    that have left the batch); returns the mask to match. Only a cache of `ColumnBuffer`s is cut: greedy_decode
    makes one when the columns can move (`columns_movable`)."""
    from hftoolkit.kv_cache import ColumnBuffer

    first = int(mask.any(dim=0).long().argmax())
    if first == 0 or not all(isinstance(layer, ColumnBuffer) for layer in cache.layers):
        return mask
    for layer in cache.layers:
        layer.drop_leading_columns(first)
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
