"""Evaluation: eval loss / perplexity on target tokens, and generate-then-score with `evaluate` metrics.

Sharding: the eval set is split across processes by accelerate's prepared DataLoader; results come back with
`gather_for_metrics`, which drops the samples accelerate duplicated to even out the last batch. Generation
prompts are sorted by length (longest first: an out-of-memory shows up in the first batch) so each batch pads
little; predictions are put back in dataset order before scoring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hftoolkit import metrics as metric_lib
from hftoolkit.data import encode_documents, encode_prompts
from hftoolkit.generation import (
    Decoding,
    can_decode_greedily,
    generate_batch,
    generation_context,
    needs_synced_gpus,
)
from hftoolkit.speedups import TARGET_LABELS, TARGET_POSITIONS, target_labels


def token_losses(model, batch: dict, targets_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed cross-entropy over target tokens, and per-row target-token counts.

    `use_cache=False` matters: with packed rows (position_ids, no attention_mask) it is what makes transformers
    build the block-causal mask; GPT-2 would otherwise create a cache and let examples attend to each other.
    `targets_only`: the model (under any wrapper) went through `enable_target_only_head`, so the LM head runs only
    where there is a target. Decided once by the caller: finding it out here would walk the model every step.
    """
    labels = batch["labels"]
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch.get("attention_mask"),
        "position_ids": batch.get("position_ids"),
    }
    if targets_only:
        return model(**inputs, **{TARGET_LABELS: labels, TARGET_POSITIONS: batch.get("target_positions")})
    logits = model(**inputs, use_cache=False).logits
    # Shift the labels, not the logits: slicing logits[:, :-1] would copy the (batch × length × vocab) tensor,
    # the largest one in a GPT-2 step.
    shift_labels = target_labels(labels)
    nll = torch.nn.functional.cross_entropy(
        logits.view(-1, logits.size(-1)).float(),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    return nll.sum(dim=1), (shift_labels != -100).sum(dim=1)


@torch.no_grad()
def evaluate_loss(accelerator, model, loader, targets_only: bool = False) -> dict:
    """Token-weighted mean NLL over all target tokens of the eval set; perplexity = exp(eval_loss)."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        loss_sum, n = token_losses(model, batch, targets_only)
        gathered = accelerator.gather_for_metrics(torch.stack([loss_sum.double(), n.double()], dim=1))
        total += gathered[:, 0].sum().item()
        count += gathered[:, 1].sum().item()
    model.train()
    eval_loss = total / max(count, 1)
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 700.0))}


def document_stream(task, tokenizer, rows: list[dict], data_cfg) -> tuple[list[int], list[bool]]:
    """The eval split as the one token stream evaluate_loss reads on the generation task (each document + EOS;
    a document's first token is not scored, since it does not follow from the previous document), and which
    positions are scored."""
    blocks = encode_documents(task, tokenizer, rows, data_cfg, max_len=1 << 62, packing=True)
    if not blocks:
        return [], []
    return list(blocks[0]["input_ids"]), [label != -100 for label in blocks[0]["labels"]]


def joined_stream(texts: list[str], join: str, tokenizer) -> tuple[list[int], list[bool]]:
    """All texts joined by `join` and tokenized as one text, every token scored: the corpus as the transformers
    guide reads WikiText ("\n\n".join of the rows)."""
    ids = tokenizer(join.join(texts), add_special_tokens=False)["input_ids"] if texts else []
    return list(ids), [True] * len(ids)


def stride_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window: windows of `window` tokens starting every `stride`
    tokens; a window scores only the tokens the previous one did not reach, so each token is scored once, with up
    to window - 1 tokens of context. stride == window: non-overlapping blocks (a block's first token, having no
    context, is never scored)."""
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        windows.append((begin, end, max(begin + 1, prev_end)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@torch.no_grad()
def sliding_window_perplexity(
    accelerator, model, ids: list[int], scored: list[bool], window: int, stride: int, batch_size: int
) -> dict:
    """Perplexity of a token stream with strided sliding windows (transformers' "perplexity of fixed-length
    models"), token-weighted over the scored tokens; windows are dealt round-robin to the processes, which all run
    the same number of forward passes (sharded models run in lockstep; a process short of one runs a window it
    does not count)."""
    windows = stride_windows(len(ids), window, stride)
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = windows[rank::world]
    per_process = math.ceil(len(windows) / world)
    passes = math.ceil(per_process / batch_size)
    device = accelerator.device
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for k in range(passes):
        chunk = mine[k * batch_size : (k + 1) * batch_size]
        batch = _window_batch(ids, scored, chunk or windows[:1], device)
        loss_sum, n = token_losses(model, batch)
        if chunk:
            total += torch.stack([loss_sum.double().sum(), n.double().sum()])
    total = accelerator.reduce(total, reduction="sum") if world > 1 else total
    model.train()
    nll, count = total[0].item(), int(total[1].item())
    eval_loss = nll / max(count, 1)
    return {
        "eval_loss": eval_loss,
        "perplexity": math.exp(min(eval_loss, 700.0)),
        "ppl_tokens": count,
        "ppl_windows": len(windows),
        "ppl_window": window,
        "ppl_stride": stride,
    }


def _window_batch(ids: list[int], scored: list[bool], windows, device) -> dict:
    """Right-padded windows; labels only where a window scores (positions first..end-1 that are scored)."""
    width = max(end - begin for begin, end, _ in windows)
    input_ids = torch.zeros((len(windows), width), dtype=torch.long)
    labels = torch.full((len(windows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for row, (begin, end, first) in enumerate(windows):
        input_ids[row, : end - begin] = torch.tensor(ids[begin:end])
        mask[row, : end - begin] = 1
        for t in range(first, end):
            if scored[t]:
                labels[row, t - begin] = ids[t]
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


@dataclass
class GenerationSet:
    """What generation-based evaluation needs, built once per run."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    references: list[list[str]]


def default_max_new_tokens(tokenizer, references: list[list[str]]) -> int:
    """Longest reference in tokens, +25% and a little slack for the stop string, capped at 256."""
    longest = max(
        (len(tokenizer(" " + r, add_special_tokens=False)["input_ids"]) for refs in references for r in refs),
        default=16,
    )
    return min(256, int(longest * 1.25) + 4)


def build_generation_set(task, tokenizer, rows: list[dict], data_cfg, prompt_budget: int) -> GenerationSet:
    template = task.template(data_cfg)
    prompts = encode_prompts(task, template, tokenizer, rows, data_cfg, prompt_budget)
    references = [task.references(r, data_cfg) for r in rows]
    texts = tokenizer.batch_decode(prompts)
    return GenerationSet(prompts=prompts, prompt_texts=texts, references=references)


def generation_batches(
    prompt_lengths: list[int], budget: int, new_tokens: int, max_rows: int
) -> list[list[int]]:
    """Example indices grouped longest prompt first, each group as many rows as fit `budget` tokens.

    A row of a left-padded batch costs (its batch's longest prompt + new_tokens) positions of KV cache, so a
    group of prompts of ~30 tokens can hold ten times the rows of one of ~400 within the same memory. Sorting first
    also leaves little padding within a group. At least one row per group, at most max_rows.
    """
    order = sorted(range(len(prompt_lengths)), key=lambda i: -prompt_lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            rows = len(batches[-1]) + 1
            # Sorted longest first: the group's first prompt is its longest.
            if rows <= max_rows and rows * (prompt_lengths[batches[-1][0]] + new_tokens) <= budget:
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


def generation_batch_sizes(eval_cfg, prompt_budget: int, max_new_tokens: int) -> dict:
    """build_generation_loader's sizing from the recipe's eval section. The default budget fits
    per_device_eval_batch_size rows of the longest prompt allowed, so no batch has fewer rows than that."""
    budget = eval_cfg.batch_tokens or eval_cfg.per_device_eval_batch_size * (prompt_budget + max_new_tokens)
    return {
        "budget": budget // eval_cfg.num_beams,  # beam search decodes num_beams rows per prompt
        "new_tokens": max_new_tokens,
        # A bound on the rows of one decoding step (its logits are rows × vocabulary floats).
        "max_rows": max(256, eval_cfg.per_device_eval_batch_size),
    }


def build_generation_loader(
    accelerator, gen_set: GenerationSet, budget: int, new_tokens: int, max_rows: int, limit: int | None = None
) -> list[list[int]]:
    """This process's share of `generation_batches` (dealt round-robin, longest first).

    Every process gets the same number of batches, because sharded models (FSDP, ZeRO-3) generate in lockstep:
    a process short of one repeats a batch, and `generate_predictions` drops the duplicate predictions.
    """
    n = len(gen_set.prompts) if limit is None else min(limit, len(gen_set.prompts))
    batches = generation_batches([len(p) for p in gen_set.prompts[:n]], budget, new_tokens, max_rows)
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = batches[rank::world]
    per_process = -(-len(batches) // world)
    return GenerationLoader(
        mine + [mine[-1] if mine else batches[0]] * (per_process - len(mine)), budget, max_rows
    )


class GenerationLoader(list):
    """This process's generation batches (lists of example indices), with the KV-cache budget and row bound
    they were sized by: greedy decoding takes the process's prompts in this order and keeps its running rows
    within the same bounds, refilling the room of finished rows (generation.greedy_decode)."""

    def __init__(self, batches: list[list[int]], budget: int, max_rows: int):
        super().__init__(batches)
        self.budget, self.max_rows = budget, max_rows

    def prompt_order(self) -> list[int]:
        """Every index once, in batch order (the repeated batch that evens out lockstep processes dropped)."""
        return list(dict.fromkeys(i for batch in self for i in batch))


@torch.no_grad()
def generate_predictions(
    accelerator, model, tokenizer, task, gen_set, loader, decoding: Decoding
) -> list[dict]:
    """[{index, prediction, completion, stopped}] in dataset order, identical on every process.

    `loader`: this process's batches of example indices (build_generation_loader)."""
    from accelerate.utils import gather_object

    model.eval()
    results = []
    synced = needs_synced_gpus(accelerator)
    with generation_context(accelerator, model) as gen_model:
        # Greedy search refills finished rows from the rest of this process's prompts: one call for them all.
        # Beam search, sampling and lockstep generation go batch by batch through `generate`.
        greedy = can_decode_greedily(gen_model, decoding, synced)
        for indices in [loader.prompt_order()] if greedy else loader:
            texts, stopped = generate_batch(
                gen_model, tokenizer, [gen_set.prompts[i] for i in indices], decoding, synced,
                loader.budget, loader.max_rows,
            )  # fmt: skip
            local = [
                {
                    "index": i,
                    "completion": t,
                    "prediction": task.postprocess(t, decoding.stop_strings),
                    "stopped": s,
                }
                for i, t, s in zip(indices, texts, stopped, strict=True)
            ]
            results.extend(gather_object(local) if accelerator.num_processes > 1 else local)
    model.train()
    return sorted({r["index"]: r for r in results}.values(), key=lambda r: r["index"])


def score_generations(task, data_cfg, names, gen_set, preds: list[dict], settings: dict | None = None):
    """(scores, each metric's configuration) of generate_predictions' output: the metrics `names`, the task's extra
    scores, and stopped_pct — how many completions ended by themselves (EOS or a stop string) rather than at
    max_new_tokens. One scoring for the training evals, `hftoolkit eval` and the suites."""
    texts = [task.scoring_text(p["prediction"], data_cfg) for p in preds]
    refs = [gen_set.references[p["index"]] for p in preds]
    scores, config = compute_scores(names, texts, refs, settings)
    scores.update(task.extra_scores(texts, refs, data_cfg))
    scores["stopped_pct"] = 100.0 * sum(p["stopped"] for p in preds) / max(len(preds), 1)
    return scores, config


def prediction_rows(task, data_cfg, gen_set, preds: list[dict]) -> list[dict]:
    """predictions.jsonl's rows: prompt, references, prediction, the task's per-example score, stopped."""
    texts = [task.scoring_text(p["prediction"], data_cfg) for p in preds]
    refs = [gen_set.references[p["index"]] for p in preds]
    return [
        {"prompt": gen_set.prompt_texts[p["index"]], "references": gen_set.references[p["index"]],
         "prediction": p["prediction"], "score": None if score is None else round(score, 2), "stopped": p["stopped"]}
        for p, score in zip(preds, task.score_examples(texts, refs), strict=True)
    ]  # fmt: skip


def compute_scores(
    names, predictions: list[str], references: list[list[str]], settings: dict | None = None
) -> tuple[dict, dict]:
    """Scores on a 0–100 scale (the `evaluate` modules keep their own scales) and each metric's configuration
    (metrics.describe: e.g. sacreBLEU's signature) for results.json. `settings`: {metric: compute() keyword
    arguments} on top of the defaults (an evaluation suite's pinned configuration, e.g. sacreBLEU's tokenizer)."""
    scores, config = {}, {}
    settings = settings or {}
    for name in names:
        extra = dict(settings.get(name) or {})
        if name == "perplexity":
            continue  # corpus perplexity comes from the eval loss; the module would reload the model
        module = metric_lib.load(name)
        if name == "rouge":
            kwargs = {"use_stemmer": True, **extra}
            out = module.compute(predictions=predictions, references=references, **kwargs)
            scores.update({k: 100.0 * float(v) for k, v in out.items()})
        elif name in ("sacrebleu", "chrf"):
            # Several references per example may differ in number: the bundled modules pad them for sacreBLEU.
            kwargs = {"references": references, **extra}
            out = module.compute(predictions=predictions, **kwargs)
            scores["bleu" if name == "sacrebleu" else "chrf"] = float(out["score"])
        elif name == "exact_match":
            kwargs = {}
            out = module.compute(predictions=predictions, references=references)
            scores["exact_match"] = 100.0 * float(out["exact_match"])
        elif name in ("squad", "squad_v2"):
            kwargs = {}
            preds, refs = metric_lib.squad_inputs(predictions, references)
            if name == "squad_v2":
                for p in preds:
                    p["no_answer_probability"] = 0.0
                for r in refs:  # no answer text: an unanswerable question, as squad_v2 counts them
                    if not any(t.strip() for t in r["answers"]["text"]):
                        r["answers"] = {"text": [], "answer_start": []}
            out = module.compute(predictions=preds, references=refs)
            scores["exact_match"] = float(out.get("exact_match", out.get("exact", 0.0)))
            scores["f1"] = float(out["f1"])
            scores.update({k: float(v) for k, v in out.items() if k.startswith(("HasAns_", "NoAns_"))})
        else:
            kwargs = {}
            out = module.compute(predictions=predictions, references=[r[0] for r in references])
            scores.update(
                {
                    k if k == name else f"{name}_{k}": float(v)
                    for k, v in out.items()
                    if isinstance(v, (int, float))
                }
            )
        config[name] = metric_lib.describe(module, **kwargs)
    return scores, config
