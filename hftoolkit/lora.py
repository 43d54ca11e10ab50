"""LoRA runs: where an adapter's base model lives, and `hftoolkit merge`.

Usage: hftoolkit merge RUN_DIR [--out DIR]      (writes RUN_DIR/merged by default)

A LoRA run's model/ holds only the adapter (peft's adapter_model.safetensors + adapter_config.json), the tokenizer
and hftoolkit.json: megabytes instead of the whole model. An adapter is useless without the exact weights it was
trained against, so a run keeps its base model findable:
- base from the Hub or a local folder (model.name_or_path): adapter_config.json names it and its revision;
- base built by `model.init` (fresh weights, no name anywhere): RUN_DIR/base_model/ holds it (save_pretrained +
  tokenizer), and adapter_config.json points at that folder's absolute path, so peft's
  AutoPeftModelForCausalLM.from_pretrained(RUN_DIR/model) loads as long as the run directory stays where it
  was; `merge` looks for RUN_DIR/base_model first, so it works after a move too.
We save the base rather than always writing a merged copy: the base is the one thing that cannot be rebuilt, it is
written once, and `merge` turns base + adapter into a plain checkpoint on demand.

The base weights are frozen during LoRA training, so they are taken from the final state dict (gathered on the
main process under FSDP/ZeRO-3), with peft's wrapping undone: adapter tensors dropped, `.base_layer.` removed.
"""

from __future__ import annotations

import json
from pathlib import Path

from hftoolkit.errors import UserError
from hftoolkit.rundir import MODEL_INFO, ModelInfo

ADAPTER_CONFIG = "adapter_config.json"
BASE_DIR = "base_model"
PEFT_PREFIX = "base_model.model."


def base_state_dict(peft_state_dict: dict) -> dict:
    """The base model's weights inside a LoRA PeftModel's state dict, under the base model's own key names."""
    return {
        key.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."): tensor
        for key, tensor in peft_state_dict.items()
        if ".lora_" not in key  # lora_A / lora_B (and lora_embedding_*, lora_magnitude_vector)
    }


def save_base_model(peft_model, state_dict: dict, tokenizer, model_cfg, run_dir: Path) -> None:
    """Call before saving the adapter: record (Hub/local base) or save (init-built base) the adapter's base."""
    import torch
    from transformers import AutoModelForCausalLM

    from hftoolkit.modeling import save_pretrained

    adapter = peft_model.peft_config[peft_model.active_adapter]
    if model_cfg.init is None:
        adapter.base_model_name_or_path = model_cfg.name_or_path
        adapter.revision = model_cfg.revision
        return
    base = peft_model.get_base_model()
    with torch.device("meta"):  # the architecture only; the weights come from the state dict
        plain = AutoModelForCausalLM.from_config(base.config)
    plain.load_state_dict(base_state_dict(state_dict), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = base.generation_config
    save_pretrained(plain, tokenizer, run_dir / BASE_DIR)
    adapter.base_model_name_or_path = str((run_dir / BASE_DIR).resolve())
    adapter.revision = None


def is_adapter_dir(path) -> bool:
    """A LoRA run's model/ (adapter files, no config.json of a full model)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def base_reference(adapter_dir: Path) -> tuple[str, str | None]:
    """(base checkpoint, revision) of an adapter: the run's base_model/ when it was saved, else what
    adapter_config.json names (a Hub id)."""
    run_base = adapter_dir.parent / BASE_DIR
    if (run_base / "config.json").is_file():
        return str(run_base), None
    adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base_ref = adapter_config.get("base_model_name_or_path")
    if not base_ref:
        raise UserError(
            f"{adapter_dir / ADAPTER_CONFIG} names no base model and {run_base} does not exist; set "
            "base_model_name_or_path in it to the checkpoint the adapter was trained on"
        )
    return base_ref, adapter_config.get("revision")


def merged_model(adapter_dir, what: str = "model"):
    """(base + adapter merged into one plain model, tokenizer, ModelInfo or None), loaded from a LoRA model/ folder:
    what `generate`, `eval` and `push --merge-adapters` run on a LoRA run directory, and what `merge` saves."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hftoolkit.modeling import set_generation_defaults

    adapter_dir = Path(adapter_dir)
    base_ref, revision = base_reference(adapter_dir)
    try:
        base = AutoModelForCausalLM.from_pretrained(base_ref, revision=revision, dtype="float32")
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"{what}: cannot load the base model '{base_ref}' of {adapter_dir} ({first})"
        ) from None
    # W ← W + (alpha / r)·B·A in every adapted layer, then the LoRA wrappers are removed.
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    set_generation_defaults(merged, tokenizer)
    info = ModelInfo.read(adapter_dir)
    if info:  # the run's decoding, as a non-LoRA run's model/ carries it
        merged.generation_config.max_new_tokens = info.max_new_tokens
        merged.generation_config.num_beams = info.num_beams
    return merged, tokenizer, info


def merge_run(run_dir, out=None) -> Path:
    """`hftoolkit merge`: base + adapter → one plain checkpoint (loads with AutoModelForCausalLM, no peft)."""
    from hftoolkit.modeling import save_pretrained

    run_dir = Path(run_dir)
    adapter_dir = run_dir / "model"
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise UserError(
            f"merge: {adapter_dir} holds no LoRA adapter ({ADAPTER_CONFIG}); only runs trained with model.lora "
            "can be merged (their model/ is already a full checkpoint otherwise)"
        )
    out = Path(out) if out else run_dir / "merged"
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MODEL_INFO).is_file())):
        raise UserError(f"merge: --out {out} exists and is not an earlier merge; choose a new folder")
    merged, tokenizer, info = merged_model(adapter_dir, "merge")
    save_pretrained(merged, tokenizer, out, info=info)
    return out


def upload_model_dir(run_path: Path, dest: Path, repo_id, merge_adapters: bool) -> Path:
    """The folder whose files are the uploaded model: model/, or for a LoRA run pushed with merged weights a
    merged save beside `dest` (removed with the staging folder's parent)."""
    from hftoolkit.card import hub_id

    model_dir = run_path / "model"
    if not is_adapter_dir(model_dir):
        return model_dir
    if merge_adapters:
        from hftoolkit.modeling import save_pretrained

        merged_dir = dest.parent / f".{dest.name}.merged"
        merged, tokenizer, info = merged_model(model_dir, "push")
        save_pretrained(merged, tokenizer, merged_dir, info=info)
        return merged_dir
    base, _ = base_reference(model_dir)
    if hub_id(base) is None:
        raise UserError(
            f"push: {model_dir} is a LoRA adapter whose base ({base}) is not on the Hub, so the adapter alone "
            f"could not be loaded from there; push the merged weights: hftoolkit push {run_path} --repo-id "
            f"{repo_id or 'REPO_ID'} --merge-adapters (or hub.merge_adapters: true)"
        )
    return model_dir
