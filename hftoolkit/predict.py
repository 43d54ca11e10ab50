"""`hftoolkit generate`: a trained model's task template + decoding applied to user inputs.

Usage: hftoolkit generate runs/qa/model --input '{"context": "Ann lives in Oslo.", "question": "Where does Ann live?"}'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

from hftoolkit.errors import UserError
from hftoolkit.generation import Decoding, generate_batch
from hftoolkit.tasks import PromptTemplate, get_task


def load_task_info(model_dir: str) -> dict:
    path = Path(model_dir) / "hftoolkit.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def render_prompt(template: PromptTemplate, text: str, extra: dict[str, str]) -> str:
    """Fields from a JSON object input, or the plain text as the source field, plus --field values."""
    fields = dict(extra)
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            fields.update({k: str(v) for k, v in json.loads(stripped).items()})
        except json.JSONDecodeError as e:
            raise UserError(
                f"--input: looks like JSON but does not parse ({e.msg}); pass plain text or valid JSON"
            ) from None
    else:
        fields[template.source_field] = text
    missing = [n for n in template.field_names() if n not in fields]
    if missing:
        raise UserError(
            f"--input: the template needs {{{missing[0]}}}; pass --field {missing[0]}=... or a JSON object input"
        )
    return template.render(fields)


def run_generate(args) -> int:
    from hftoolkit.modeling import load_tokenizer

    info = load_task_info(args.model_dir)
    task = get_task(args.task or info.get("task") or "generation")
    if info.get("task") and args.task and args.task != info["task"]:
        raise UserError(f"--task: {args.model_dir} was trained for '{info['task']}', not '{args.task}'")
    data_cfg = SimpleNamespace(
        prompt_template=info.get("prompt_template"), **{k: None for k in ("source_lang", "target_lang")}
    )
    template = task.template(data_cfg)
    if info.get("prompt_template"):
        template = PromptTemplate(
            info["prompt_template"],
            info.get("source_field", template.source_field),
            info.get("target_prefix", " "),
        )
    extra = {}
    langs = info.get("data", {})
    if task.name == "translation":
        from hftoolkit.tasks.translation import language_name

        extra = {
            "source_lang": language_name(langs.get("source_lang") or "en"),
            "target_lang": language_name(langs.get("target_lang") or "de"),
        }
    for item in args.field:
        if "=" not in item:
            raise UserError(f"--field: '{item}' is not NAME=VALUE")
        k, v = item.split("=", 1)
        extra[k] = v

    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    model.eval()
    decoding = Decoding(
        max_new_tokens=args.max_new_tokens or info.get("max_new_tokens") or 64,
        num_beams=args.num_beams or info.get("num_beams") or 1,
        stop_strings=tuple(info.get("stop_strings", task.stop_strings)),
    )
    interactive = not args.inputs and sys.stdin.isatty()

    def inputs():
        if args.inputs:
            yield from args.inputs
        elif interactive:
            while True:
                try:
                    line = input(f"{template.source_field}> ")
                except EOFError:
                    return
                if line.strip():
                    yield line
        else:
            yield from (line.rstrip("\n") for line in sys.stdin if line.strip())

    for text in inputs():
        prompt = render_prompt(template, text, extra)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tokenizer.padding_side = "left"
        completions, _ = generate_batch(model, tokenizer, [ids], decoding)
        if args.show_prompt:
            print(prompt, end="")
        print(task.postprocess(completions[0], decoding.stop_strings) if task.generates else completions[0])
    return 0
