"""Mutation check: break one invariant at a time in a copy of the library and expect its tests to fail.

Usage: python tests/mutants.py [--list] [--only NAME[,NAME...]] [--jobs N] [--keep-going] [--no-fork]

Each mutant is one line-level edit (name, file, original text, replacement, tests). For each, hftoolkit/,
tests/, recipes/, eval/ and pyproject.toml are copied to a temporary folder and the original text is replaced.
It must occur exactly once in the file: mutants match on content, never on line numbers, so a refactor that
moves a line changes nothing and one that rewrites it makes that mutant an ERROR (and the script fail) instead
of testing nothing. The mutant's tests then run there with the copy first on the import path: in the test
process itself, which imports hftoolkit and checks it came from the copy before any test runs (the editable
install must not shadow it), and through PYTHONPATH for the processes that tests launch (checked in a fresh
interpreter).

A mutant is killed when pytest reports failing tests; a collection error, an import or syntax error, or a file
that does not compile is an ERROR (not a kill). The unmutated copy must pass every selected test first. Prints
`mutants: K/N killed` and exits non-zero unless every mutant was killed.

Speed: importing torch/transformers/evaluate is most of a pytest start, so this process imports them once
(never hftoolkit) and forks one test process per mutant (--no-fork starts fresh interpreters instead); two run
side by side (--jobs)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("hftoolkit", "tests", "recipes", "eval", "pyproject.toml")

UNIT = "tests/test_invariants.py"
E2E = "tests/test_invariants_e2e.py"
PADDED_LOSS = f"{UNIT}::test_padded_loss_equals_transformers_loss"
PACKED_LOSS = f"{UNIT}::test_packed_loss_equals_each_example_alone"
LABELS = f"{UNIT}::test_eos_keeps_its_label_and_padding_never_has_one"
GRADIENT = f"{UNIT}::test_gradient_of_ranks_and_accumulation_equals_one_big_batch"
MULTIPROC = f"{E2E}::test_two_processes_of_b_have_the_gradient_of_one_process_of_2b"
DOC_POSITIONS = f"{UNIT}::test_packed_documents_restart_positions_in_every_block"
PACK_POSITIONS = f"{UNIT}::test_pack_collate_restarts_positions_per_example"
SUPERVISED = f"{UNIT}::test_encode_supervised_masks_the_prompt_and_ends_with_eos"
TRUNCATION = f"{UNIT}::test_over_long_examples_lose_the_end_of_the_source"
PROMPTS = f"{UNIT}::test_eval_prompts_truncate_the_source_not_the_template"
SAMPLER = f"{UNIT}::test_epoch_sampler_reshuffles_every_epoch_deterministically"
STOP = f"{UNIT}::test_stop_strings_end_generation"
GEN = "tests/test_generation.py"
FAST_GREEDY = f"{GEN}::test_greedy_decode_equals_generate_when_rows_finish_at_different_steps"
REFILL = f"{GEN}::test_continuous_batching_equals_generate_prompt_by_prompt"
GREEDY_LINEAR = f"{GEN}::test_greedy_linear_equals_argmax_of_the_whole_logits"
ROW_MAX = f"{GEN}::test_row_max_equals_torch_max_and_argmax"
ACC_STATE = "tests/test_distributed.py::test_a_run_does_not_inherit_an_earlier_accelerators_precision"
REPEATED_BATCH = f"{GEN}::test_a_batch_repeated_for_lockstep_gives_each_prediction_once"
FAST_GREEDY_STOP = f"{GEN}::test_fast_greedy_path_equals_generate_then_cut_at_the_stop_string"
DECODING = f"{UNIT}::test_beam_search_and_sampling_run_and_are_seeded"
MAX_NEW = f"{UNIT}::test_default_max_new_tokens_by_hand"
SUBSET = f"{E2E}::test_periodic_evals_generate_exactly_their_budgeted_subset"
ROTATION = f"{E2E}::test_save_total_limit_keeps_exactly_the_newest_checkpoints"
LEARNS = f"{E2E}::test_a_short_run_learns_to_summarize_and_to_stop"
BAD_EXTENSION = f"{E2E}::test_bad_extension_is_the_documented_line"
SUITES = "tests/test_suites.py"
STRIDE_LOOP = f"{SUITES}::test_sliding_window_perplexity_equals_the_guide_loop"
STRIDE_TODAY = f"{SUITES}::test_non_overlapping_stride_equals_todays_eval_loss"
SUITE_JOIN = f"{SUITES}::test_perplexity_suite_reads_the_split_as_one_joined_text"
NO_ANSWER = f"{SUITES}::test_no_answer_text_is_the_empty_answer_for_squad_v2"
RESUME_UNPACKED = "tests/test_resume.py::test_resume_unpacked_across_an_epoch_boundary_is_exact"
RESUME_SIGTERM = "tests/test_resume.py::test_sigterm_saves_a_checkpoint_and_says_how_to_resume"
PACKED_APART = f"{UNIT}::test_packed_examples_never_predict_each_other"
BEST = "tests/test_selection.py::test_best_checkpoint_is_published_and_reproducible"
ELASTIC = "tests/test_elastic.py::test_two_processes_resume_on_one"
EARLY_STOP = "tests/test_selection.py::test_early_stopping_and_a_resume_that_keeps_patience"
BAD_ROWS = "tests/test_tasks.py::test_rows_the_task_cannot_use_are_dropped_counted_and_not_scored"
EMPTY_COMPLETION = "tests/test_completion.py::test_empty_completion_rows_are_dropped_and_counted"
EMPTY_FILE = f"{E2E}::test_empty_train_file_says_the_split_is_empty"
RESOLVED_CONFIG = "tests/test_tasks.py::test_config_yaml_is_the_resolved_recipe"
COMPLETION_MASK = "tests/test_completion.py::test_only_the_prompt_is_masked_and_eos_keeps_its_label"
OUT_OF_SET = "tests/test_completion.py::test_labels_score_out_of_set_predictions_as_wrong"
MIX_SHARES = "tests/test_mixture.py::test_weights_3_to_1_realise_75_25_in_the_same_order_on_reload"
MIX_COLUMNS = "tests/test_mixture.py::test_each_source_reaches_the_task_fields_through_its_own_columns"
STREAM_RESUME = "tests/test_streaming.py::test_resumed_stream_trains_like_the_straight_run"
STREAM_RANGES = "tests/test_streaming.py::test_byte_ranges_read_every_row_once"
CACHE_TEMPLATE = "tests/test_cache.py::test_a_changed_template_misses"
CACHE_TOKENIZER = "tests/test_cache.py::test_a_changed_tokenizer_misses_even_under_the_same_name"
CACHE_CONTENT = "tests/test_cache.py::test_preprocess_misses_when_the_data_file_changes"
CACHE_WORKERS = "tests/test_cache.py::test_the_worker_count_does_not_change_packed_documents"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest node ids, fastest first (pytest stops at the first failure)


M = Mutant
MUTANTS = [
    # -- EOS keeps its label, padding never has one
    M("pack-masks-pad-id-labels", "hftoolkit/data.py",
      "pos[r, at:] = torch.arange(width - at)",
      "pos[r, at:] = torch.arange(width - at); labels[r][ids[r] == pad_id] = -100",
      (LABELS, LEARNS)),
    M("pad-masks-pad-id-labels", "hftoolkit/data.py",
      'labels[row, :n] = torch.tensor(f["labels"])',
      'labels[row, :n] = torch.tensor(f["labels"]).masked_fill(torch.tensor(f["input_ids"]) == pad_id, -100)',
      (LABELS, PADDED_LOSS)),
    M("eos-not-appended-to-target", "hftoolkit/data.py",
      "target = t + [eos]", "target = t",
      (SUPERVISED, TRUNCATION)),
    # -- the loss: labels shifted, examples apart, on both LM-head paths
    M("token-losses-unshifted", "hftoolkit/evaluation.py",
      "shift_labels = target_labels(labels)", "shift_labels = labels",
      (PADDED_LOSS, PACKED_LOSS)),
    M("targets-only-head-unshifted", "hftoolkit/speedups.py",
      "shifted = target_labels(labels)", "shifted = labels",
      (PADDED_LOSS, PACKED_LOSS)),
    M("target-labels-unshifted", "hftoolkit/speedups.py",
      "return torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]", "return labels",
      (PADDED_LOSS, PACKED_LOSS)),
    M("token-losses-with-cache-leaks-packing", "hftoolkit/evaluation.py",
      "logits = model(**inputs, use_cache=False).logits", "logits = model(**inputs).logits",
      (PACKED_LOSS,)),
    M("targets-only-head-with-cache-leaks-packing", "hftoolkit/speedups.py",
      "hidden = self.base_model(**inputs, use_cache=False).last_hidden_state",
      "hidden = self.base_model(**inputs).last_hidden_state",
      (PACKED_LOSS,)),
    # -- gradients: N processes × B == 1 process × N·B, accumulation == one big batch
    M("backward-drops-num-processes", "hftoolkit/train.py",
      "acc.backward(loss_sum.sum() * (acc.gradient_accumulation_steps * acc.num_processes) / n_targets)",
      "acc.backward(loss_sum.sum() * acc.gradient_accumulation_steps / n_targets)",
      (GRADIENT, MULTIPROC)),
    M("backward-drops-accumulation", "hftoolkit/train.py",
      "acc.backward(loss_sum.sum() * (acc.gradient_accumulation_steps * acc.num_processes) / n_targets)",
      "acc.backward(loss_sum.sum() * acc.num_processes / n_targets)",
      (GRADIENT,)),
    M("loss-normalised-per-rank", "hftoolkit/train.py",
      "n_targets = acc.gather(n_targets.reshape(1)).sum().clamp(min=1)",
      "n_targets = n_targets.clamp(min=1)",
      (GRADIENT, MULTIPROC)),
    # -- position ids
    M("continued-document-keeps-positions", "hftoolkit/data.py",
      "block = [p - block[0] for p in block[:reset]] + block[reset:]", "block = list(block)",
      (DOC_POSITIONS,)),
    M("document-first-token-labelled", "hftoolkit/data.py",
      "labels.extend([-100] + d[1:])", "labels.extend(d)",
      (DOC_POSITIONS,)),
    M("pack-positions-do-not-restart", "hftoolkit/data.py",
      'torch.tensor(f["position_ids"]) if f.get("position_ids") else torch.arange(n)',
      "torch.arange(at, at + n)",
      (PACK_POSITIONS, PACKED_LOSS)),
    # -- truncation
    M("source-truncated-from-the-wrong-end", "hftoolkit/data.py",
      "s = s[:room]", "s = s[-room:]",
      (TRUNCATION,)),
    M("target-truncated-instead-of-source", "hftoolkit/data.py",
      "room = max_len - fixed - len(target)",
      "room, target = len(s), target[: max(max_len - fixed - len(s), 0)]",
      (TRUNCATION,)),
    M("eval-prompt-source-from-the-wrong-end", "hftoolkit/data.py",
      "out.append(a + s[:room] + b)", "out.append(a + s[len(s) - room :] + b)",
      (PROMPTS,)),
    M("eval-prompt-cuts-the-template", "hftoolkit/data.py",
      "out.append(a + s[:room] + b)", "out.append((a + s + b)[:budget])",
      (PROMPTS,)),
    # -- data order and resume
    M("sampler-ignores-epoch", "hftoolkit/data.py",
      "rng = random.Random(self.seed * 1000003 + self.epoch)", "rng = random.Random(self.seed * 1000003)",
      (SAMPLER,)),
    M("sampler-set-epoch-is-a-no-op", "hftoolkit/data.py",
      "self.epoch = epoch", "self.epoch = 0",
      (SAMPLER,)),
    M("resume-skips-no-batches", "hftoolkit/train.py",
      "loader = skip_first_batches(train_loader, progress.batches_in_epoch)", "loader = train_loader",
      (RESUME_UNPACKED,)),
    M("resume-counts-steps-not-micro-batches", "hftoolkit/train.py",
      "progress.batches_in_epoch += len(window)", "progress.batches_in_epoch += 1",
      (RESUME_SIGTERM,)),
    # -- evaluation
    M("periodic-eval-on-the-full-set", "hftoolkit/run.py",
      'loader = gen_loaders["subset" if subset and "subset" in gen_loaders else "full"]',
      'loader = gen_loaders["full"]',
      (SUBSET,)),
    M("generation-loader-ignores-limit", "hftoolkit/evaluation.py",
      "n = len(gen_set.prompts) if limit is None else min(limit, len(gen_set.prompts))",
      "n = len(gen_set.prompts)",
      (SUBSET,)),
    M("eval-loss-gather-keeps-duplicates", "hftoolkit/evaluation.py",
      "accelerator.gather_for_metrics(", "accelerator.gather(",
      (MULTIPROC,)),
    M("predictions-keep-duplicates", "hftoolkit/evaluation.py",
      'return sorted({r["index"]: r for r in results}.values(), key=lambda r: r["index"])',
      'return sorted(results, key=lambda r: r["index"])',
      (MULTIPROC, REPEATED_BATCH)),
    M("default-max-new-tokens-without-slack", "hftoolkit/evaluation.py",
      "return min(256, int(longest * 1.25) + 4)", "return min(256, int(longest * 1.25))",
      (MAX_NEW,)),
    # -- generation
    M("stop-strings-not-passed-to-generate", "hftoolkit/generation.py",
      "eos_ids = [tokenizer.eos_token_id, *stop_token_ids(tokenizer, decoding.stop_strings)]",
      "eos_ids = [tokenizer.eos_token_id]",
      (STOP,)),
    M("num-beams-ignored", "hftoolkit/generation.py",
      '"num_beams": self.num_beams,', '"num_beams": 1,',
      (DECODING,)),
    M("do-sample-ignored", "hftoolkit/generation.py",
      '"do_sample": self.do_sample,', '"do_sample": False,',
      (DECODING,)),
    M("greedy-decode-cuts-columns-a-row-needs", "hftoolkit/generation.py",
      "first = int(mask.any(dim=0).long().argmax())", "first = int(mask.all(dim=0).long().argmax())",
      (FAST_GREEDY, FAST_GREEDY_STOP)),
    M("greedy-decode-keeps-finished-rows-positions", "hftoolkit/generation.py",
      "self.tokens, self.mask, self.position = tokens[keep], self.mask[keep], self.position[keep]",
      "self.tokens, self.mask, self.position = tokens[keep], self.mask[keep], self.position[: len(keep)]",
      (FAST_GREEDY, REFILL)),
    M("refill-merges-positions-in-the-wrong-order", "hftoolkit/generation.py",
      "rows.position = torch.cat([part.position for part in parts])",
      "rows.position = torch.cat([part.position for part in parts[::-1]])",
      (REFILL,)),
    M("prefill-chunks-give-their-tokens-in-the-wrong-order", "hftoolkit/generation.py",
      "return cls.stack([rows for rows, _ in parts]), torch.cat([last for _, last in parts])",
      "return cls.stack([rows for rows, _ in parts]), torch.cat([last for _, last in parts[::-1]])",
      (REFILL,)),
    M("refill-logits-split-at-the-wrong-row", "hftoolkit/generation.py",
      "tokens = greedy_linear(torch.cat([live.step(hf, head), last]), head)",
      "tokens = greedy_linear(torch.cat([last, live.step(hf, head)]), head)",
      (REFILL,)),
    M("later-columns-win-ties", "hftoolkit/generation.py",
      "wins = (later_value > value) | (later_value.isnan() & ~value.isnan())",
      "wins = (later_value >= value) | (later_value.isnan() & ~value.isnan())",
      (ROW_MAX, GREEDY_LINEAR)),
    M("argmax-index-misses-the-lane-offset", "hftoolkit/generation.py",
      "best = lane_max[row, lane], lane * CPU_ARGMAX_LANE + lanes[row, lane].argmax(-1)",
      "best = lane_max[row, lane], lane * (CPU_ARGMAX_LANE - 1) + lanes[row, lane].argmax(-1)",
      (ROW_MAX,)),
    M("compaction-keeps-a-finished-row", "hftoolkit/kv_cache.py",
      "order[hole] = mover", "order[hole] = hole",
      (FAST_GREEDY, REFILL)),
    M("compaction-moves-rows-without-their-cache", "hftoolkit/kv_cache.py",
      "moved = [row for row, source in enumerate(order) if source != row]", "moved = []",
      (FAST_GREEDY, REFILL)),
    M("decode-step-writes-its-column-at-the-wrong-place", "hftoolkit/kv_cache.py",
      "end = self.start + held", "end = held",
      (FAST_GREEDY, REFILL)),
    M("finished-rows-never-refilled", "hftoolkit/generation.py",
      "if take and (live is None or (refill and worth_admitting(len(take), len(queue), len(live.index)))):",
      "if take and (live is None or (False and worth_admitting(len(take), len(queue), len(live.index)))):",
      (REFILL,)),
    M("refill-ignores-the-kv-budget", "hftoolkit/generation.py",
      "over_budget = budget is not None and (rows + 1) * (longest + max_new_tokens) > budget",
      "over_budget = False",
      (REFILL,)),
    M("run-inherits-an-earlier-accelerators-state", "hftoolkit/run.py",
      "reset_accelerate_state()  # this run's recipe and environment only, not an earlier Accelerator's settings",
      "pass", (ACC_STATE,)),
    # -- checkpoints and errors
    M("save-total-limit-off-by-one", "hftoolkit/checkpoint.py",
      "for old in list_checkpoints(checkpoints_dir)[:-keep]:",
      "for old in list_checkpoints(checkpoints_dir)[: -keep - 1]:",
      (ROTATION,)),
    M("bad-extension-not-checked", "hftoolkit/data.py",
      "if path.suffix not in EXTENSION_BUILDERS:", "if False:",
      (BAD_EXTENSION,)),
    M("empty-file-not-checked", "hftoolkit/data.py",
      'if _check_text_file(path, f"data.{key}") <= (path.suffix == ".csv"):',
      'if _check_text_file(path, f"data.{key}") < 0:',
      (EMPTY_FILE,)),
    # -- packed examples never predict each other's first token
    M("pack-keeps-first-label", "hftoolkit/data.py",
      "labels[r, at] = -100", "pass",
      (PACKED_APART,)),
    # -- rows without a target are dropped and counted, never trained on
    M("bad-rows-kept", "hftoolkit/data.py",
      "if (problem := task.row_problem(dict(zip(batch, values, strict=True)), data_cfg)) is not None:",
      "if (problem := None) is not None:",
      (BAD_ROWS, EMPTY_COMPLETION)),
    M("null-field-read-as-empty-string", "hftoolkit/tasks/base.py",
      'return "null"', "return None",
      (BAD_ROWS,)),
    # -- config.yaml is the resolved recipe (task defaults filled in before it is written)
    M("config-saved-unresolved", "hftoolkit/run.py",
      "task = resolve_recipe(recipe)\n", "task = get_task(recipe.task)\n",
      (RESOLVED_CONFIG,)),
    # -- task: completion masks its prompt and scores out-of-set labels as wrong
    # -- a resume on another process count continues at the same global position and learning rate
    M("elastic-position-not-rescaled", "hftoolkit/checkpoint.py",
      'state["batches_in_epoch"] = state["batches_in_epoch"] * saved // now', "pass",
      (ELASTIC,)),
    M("elastic-schedule-not-rescaled", "hftoolkit/checkpoint.py",
      'inner.last_epoch = state["step"] * now', 'inner.last_epoch = state["step"] * saved',
      (ELASTIC,)),
    # -- the published model is the best periodic evaluation's, which rotation never deletes
    M("best-checkpoint-rotated", "hftoolkit/checkpoint.py",
      "if keep_also is None or old.resolve() != keep_also.resolve():", "if True:",
      (BEST, EARLY_STOP)),
    M("best-not-loaded-at-end", "hftoolkit/train.py",
      'acc.load_state(str(run.out / best["checkpoint"]))', "None",
      (EARLY_STOP,)),
    M("patience-not-restored", "hftoolkit/checkpoint.py",
      'state.get("evals_without_improvement", 0),', "0,",
      (EARLY_STOP,)),
    M("best-compared-the-wrong-way", "hftoolkit/selection.py",
      "gain = value - best if self.greater_is_better else best - value",
      "gain = best - value if self.greater_is_better else value - best",
      (BEST, EARLY_STOP)),
    M("completion-prompt-not-masked", "hftoolkit/data.py",
      '"labels": [-100] * len(prompt) + target,', '"labels": prompt + target,',
      (COMPLETION_MASK, SUPERVISED)),
    M("completion-out-of-set-not-counted", "hftoolkit/tasks/completion.py",
      '"out_of_label_set": float(sum(p not in labels for p in predictions)),', '"out_of_label_set": 0.0,',
      (OUT_OF_SET,)),
    # -- mixtures: the weights are the shares, each source's columns reach the task's fields
    M("mixture-weights-ignored", "hftoolkit/mixture.py",
      "parts, probabilities=[w / total for w in weights], seed=seed, stopping_strategy=stopping",
      "parts, probabilities=[1 / len(weights) for w in weights], seed=seed, stopping_strategy=stopping",
      (MIX_SHARES,)),
    M("mixture-source-columns-swapped", "hftoolkit/mixture.py",
      "ds = ds.rename_columns({a: b for a, b in zip(own, canonical, strict=True) if a != b})",
      "ds = ds.rename_columns({a: b for a, b in zip(own, canonical[::-1], strict=True) if a != b})",
      (MIX_COLUMNS,)),
    # -- sliding-window perplexity: each token scored once, with the context before it (tests/test_suites.py)
    M("stride-window-rescores-overlap", "hftoolkit/evaluation.py",
      "windows.append((begin, end, max(begin + 1, prev_end)))", "windows.append((begin, end, begin + 1))",
      (STRIDE_LOOP,)),
    M("stride-stream-scores-document-starts", "hftoolkit/evaluation.py",
      'return list(blocks[0]["input_ids"]), [label != -100 for label in blocks[0]["labels"]]',
      'return list(blocks[0]["input_ids"]), [True for label in blocks[0]["labels"]]',
      (STRIDE_TODAY,)),
    M("suite-join-drops-blank-rows", "hftoolkit/evaluation.py",
      'ids = tokenizer(join.join(texts), add_special_tokens=False)["input_ids"] if texts else []',
      'ids = tokenizer(join.join(t for t in texts if t.strip()), add_special_tokens=False)["input_ids"] if texts else []',
      (SUITE_JOIN,)),
    M("no-answer-text-not-mapped", "hftoolkit/tasks/qa.py",
      'if no_answer and " ".join(prediction.split()).lower() == " ".join(no_answer.split()).lower():',
      "if False:",
      (NO_ANSWER,)),
    # -- streaming: a resume restarts at the checkpoint's position; byte ranges read each row once
    M("stream-resume-forgets-used-examples", "hftoolkit/streaming.py",
      'self._chunk, self._skip = None, state["used"]', "self._chunk, self._skip = None, 0",
      (STREAM_RESUME,)),
    M("stream-resume-empties-the-buffer", "hftoolkit/streaming.py",
      'self.buffer = list(snap["buffer"])', "self.buffer = []",
      (STREAM_RESUME,)),
    M("paragraph-range-misses-continuation", "hftoolkit/streaming.py",
      "prev_blank = _previous_line_blank(f, pos)", "prev_blank = True",
      (STREAM_RANGES,)),
    # -- the tokenize-once cache: a stale entry would train on the wrong examples without a word
    M("cache-key-ignores-the-template", "hftoolkit/cache.py",
      '"template": dataclasses.asdict(template),', '"template": None,', (CACHE_TEMPLATE,)),
    M("cache-key-is-the-tokenizer-name", "hftoolkit/cache.py",
      '"tokenizer": tokenizer_fingerprint(tokenizer),', '"tokenizer": getattr(tokenizer, "name_or_path", ""),',
      (CACHE_TOKENIZER,)),
    M("cache-key-ignores-the-content", "hftoolkit/cache.py",
      '"raw_content": content_fingerprint(ds),', '"raw_content": len(ds),', (CACHE_CONTENT,)),
    M("documents-packed-per-worker-shard", "hftoolkit/data.py",
      "packed = documents and packing", "packed = False", (CACHE_WORKERS,)),
]  # fmt: skip

# A failure that says the copy could not be imported or compiled is not a kill: the test never ran the mutant.
NOT_A_KILL = re.compile(r"\b(ImportError|ModuleNotFoundError|SyntaxError|IndentationError|NameError)\b")
# Imported once by this process before it forks a test process per mutant (unless --no-fork): they
# are most of a pytest start (~8 s here), and none of them imports hftoolkit.
PRELOAD = (
    "torch", "numpy", "yaml", "pytest", "safetensors.torch", "tokenizers", "transformers", "datasets",
    "evaluate", "accelerate", "accelerate.utils", "transformers.models.gpt2.modeling_gpt2", "peft",
    "sacrebleu", "rouge_score", "matplotlib",
)  # fmt: skip
ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}


class MutantError(Exception):
    pass


def make_copy(root: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, root / name)
    return root


def apply(mutant: Mutant, root: Path) -> None:
    path = root / mutant.file
    if not path.is_file():
        raise MutantError(f"{mutant.file}: no such file")
    text = path.read_text(encoding="utf-8")
    count = text.count(mutant.original)
    if count != 1:
        raise MutantError(
            f"{mutant.file}: the original text occurs {count} times (need 1): {mutant.original!r}"
        )
    text = text.replace(mutant.original, mutant.replacement)
    try:
        compile(text, str(path), "exec")
    except SyntaxError as e:
        raise MutantError(
            f"{mutant.file}: the mutated file does not compile ({e.msg}, line {e.lineno})"
        ) from None
    path.write_text(text, encoding="utf-8")


def environment(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORLD_SIZE")}
    env.update(ENVIRONMENT)
    # For the processes tests launch (accelerate launch -m hftoolkit ...): the copy first.
    env["PYTHONPATH"] = str(root)
    # datasets' map cache is keyed by the data and the mapped function's own code, not the library functions
    # it calls: a cache shared with an unmutated run could hand a mutant the unmutated tokenization.
    env["HF_DATASETS_CACHE"] = str(root / ".hf_datasets_cache")
    return env


def check_import_path(root: Path, env: dict) -> None:
    """A fresh interpreter, started as the processes tests launch are, imports hftoolkit from the copy."""
    probe = "import hftoolkit, tests; print(hftoolkit.__file__); print(tests.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True)
    files = out.stdout.split()
    if (
        out.returncode != 0
        or len(files) != 2
        or not all(Path(f).resolve().is_relative_to(root) for f in files)
    ):
        raise MutantError(f"hftoolkit/tests are not imported from the copy {root}: {out.stdout}{out.stderr}")


def pytest_args(root: Path, tests: tuple[str, ...], fail_fast: bool) -> list[str]:
    return [
        "-q", "-p", "no:cacheprovider", "-o", "addopts=", f"--junitxml={root / '.junit.xml'}",
        f"--basetemp={root / '.pytest_tmp'}", *(["-x"] if fail_fast else []), *tests,
    ]  # fmt: skip


def run_in_this_process(root: Path, args: list[str]) -> int:
    """The test process: the copy first on sys.path, hftoolkit imported from it (checked), then pytest."""
    os.chdir(root)
    os.environ.update(environment(root))
    sys.path[:] = [str(root), *(p for p in sys.path if Path(p or ".").resolve() != REPO / "tests")]
    if "datasets" in sys.modules:  # preloaded before the variable was set for this copy
        sys.modules["datasets"].config.HF_DATASETS_CACHE = Path(os.environ["HF_DATASETS_CACHE"])
    import hftoolkit

    if not Path(hftoolkit.__file__).resolve().is_relative_to(root):
        print(f"MUTANTS: hftoolkit imported from {hftoolkit.__file__}, not from {root}", file=sys.stderr)
        return 99
    import pytest

    return int(pytest.main(args))


# --no-fork: the same, in a new interpreter.
RUNNER = "import sys; sys.path.insert(0, sys.argv[1]); from tests.mutants import *; " \
         "sys.exit(run_in_this_process(Path(sys.argv[1]).resolve(), sys.argv[2:]))"  # fmt: skip


class TestProcess:
    """One pytest run in a copy, forked from this process (preloaded libraries) or started fresh."""

    def __init__(self, root: Path, tests: tuple[str, ...], fail_fast: bool, fork: bool):
        self.root, self.log = root, root / ".pytest.log"
        args = pytest_args(root, tests, fail_fast)
        self.started = time.perf_counter()
        if fork:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: never returns
                code = 98
                try:
                    os.setpgid(0, 0)  # its own group, so a timeout ends whatever it launched too
                    fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    code = run_in_this_process(root, args)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            self.pid, self.popen = pid, None
        else:
            with self.log.open("w") as log:
                self.popen = subprocess.Popen(
                    [sys.executable, "-c", RUNNER, str(root), *args],
                    cwd=root, env=environment(root), stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            self.pid = self.popen.pid

    def poll(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        return None if pid == 0 else os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        while self.poll() is None:
            time.sleep(0.1)

    def failures(self) -> list[tuple[str, str]]:
        junit, found = self.root / ".junit.xml", []
        if junit.is_file():
            for case in ET.parse(junit).getroot().iter("testcase"):
                for bad in [*case.findall("failure"), *case.findall("error")]:
                    node = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
                    found.append((node, f"{bad.get('message', '')}\n{bad.text or ''}"))
        return found

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else ""


@dataclass
class Job:
    name: str
    mutant: Mutant | None  # None: the baseline (unmutated copy)
    tests: tuple[str, ...]


@dataclass
class Outcome:
    name: str
    status: str  # killed | survived | error; baseline: passed | failed
    detail: str
    seconds: float


def classify(job: Job, code: int | None, proc: TestProcess, seconds: float, timeout: float) -> Outcome:
    output = proc.output()
    if job.mutant is None:
        if code == 0:
            return Outcome(job.name, "passed", f"{len(job.tests)} test ids", seconds)
        return Outcome(job.name, "failed", f"exit {code}\n{output}", seconds)
    if code is None:
        return Outcome(job.name, "killed", f"(timed out after {timeout:.0f} s)", seconds)
    if code == 0:
        return Outcome(job.name, "survived", "all its tests passed", seconds)
    if code != 1:
        return Outcome(
            job.name, "error", f"pytest exit {code} (collection/usage error, not a kill)\n{output}", seconds
        )
    failures = proc.failures()
    real = [node for node, text in failures if not NOT_A_KILL.search(text)]
    if not real:
        shown = "\n".join(
            f"{node}: {text.strip().splitlines()[0] if text.strip() else ''}" for node, text in failures
        )
        return Outcome(
            job.name, "error", f"only import/syntax errors, not a kill:\n{shown}\n{output}", seconds
        )
    return Outcome(job.name, "killed", "by " + ", ".join(sorted(set(real))), seconds)


def run_jobs(
    jobs: list[Job], parallel: int, fail_fast: bool, fork: bool, timeout: float, report
) -> list[Outcome]:
    """Run the jobs, `parallel` at a time, from this single-threaded process; report(outcome) as each ends."""
    pending, running, outcomes = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            tmp = tempfile.TemporaryDirectory(prefix=f"mutant-{job.name}-")
            root = make_copy(Path(tmp.name).resolve())
            try:
                if job.mutant is not None:
                    apply(job.mutant, root)
                check_import_path(root, environment(root))
            except MutantError as e:
                tmp.cleanup()
                outcomes[job.name] = report(Outcome(job.name, "error", str(e), 0.0))
                continue
            running.append((job, tmp, TestProcess(root, job.tests, fail_fast, fork)))
        time.sleep(0.2)
        for item in list(running):
            job, tmp, proc = item
            code = proc.poll()
            seconds = time.perf_counter() - proc.started
            if code is None and seconds > timeout:
                proc.kill()
            elif code is None:
                continue
            running.remove(item)
            outcomes[job.name] = report(classify(job, code, proc, seconds, timeout))
            tmp.cleanup()
    return [outcomes[j.name] for j in jobs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", action="append", default=[], help="run only these mutants (repeat or a,b)")
    parser.add_argument("--jobs", type=int, default=2, help="test processes at a time (default 2)")
    parser.add_argument("--keep-going", action="store_true", help="run all of a mutant's tests (no -x)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test process (default 600)")
    parser.add_argument(
        "--no-fork", dest="fork", action="store_false", default=hasattr(os, "fork"),
        help="start each test process fresh instead of forking this one after preloading",
    )  # fmt: skip
    args = parser.parse_args(argv)

    names = [n for item in args.only for n in item.split(",") if n]
    unknown = sorted(set(names) - {m.name for m in MUTANTS})
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(unknown)} (see --list)")
    if len({m.name for m in MUTANTS}) != len(MUTANTS):
        parser.error("duplicate mutant names")
    selected = [m for m in MUTANTS if not names or m.name in names]
    if args.list:
        for m in selected:
            print(f"{m.name:45} {m.file:28} {' '.join(t.split('::')[-1] for t in m.tests)}")
        return 0

    start = time.perf_counter()
    os.environ.update(ENVIRONMENT)  # before the preloaded libraries read them
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "tests"]
    if args.fork:
        if "hftoolkit" in sys.modules or "tests" in sys.modules:
            parser.error(
                "--fork needs a process that has not imported hftoolkit: run python tests/mutants.py"
            )
        import importlib
        import threading

        for name in PRELOAD:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        if threading.active_count() > 1 or "hftoolkit" in sys.modules:
            args.fork = False  # forking a multi-threaded process is unsafe
            print("mutants: a preloaded library started a thread or imported hftoolkit; using --no-fork")

    def report(o: Outcome) -> Outcome:
        label = "baseline " + o.status if o.name.startswith("baseline") else o.status.upper()
        print(f"{label:9} {o.name} ({o.seconds:.0f} s) {o.detail}", flush=True)
        return o

    tests = tuple(dict.fromkeys(t for m in selected for t in m.tests))
    # The baseline in two halves side by side: the multi-process test, and all the rest.
    halves = [tuple(t for t in tests if t == MULTIPROC), tuple(t for t in tests if t != MULTIPROC)]
    baseline = [Job(f"baseline-{i}", None, h) for i, h in enumerate(halves) if h]
    if any(
        o.status != "passed" for o in run_jobs(baseline, args.jobs, False, args.fork, args.timeout, report)
    ):
        print("mutants: the unmutated copy fails its tests; fix that first")
        return 2
    jobs = [Job(m.name, m, m.tests) for m in selected]
    outcomes = run_jobs(jobs, args.jobs, not args.keep_going, args.fork, args.timeout, report)
    killed = sum(o.status == "killed" for o in outcomes)
    for o in outcomes:
        if o.status != "killed":
            print(f"NOT KILLED: {o.name}: {o.status}")
    print(f"mutants: {killed}/{len(outcomes)} killed in {time.perf_counter() - start:.0f} s")
    return 0 if killed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
