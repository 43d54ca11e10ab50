"""`hftoolkit generate`: a trained model's task template + decoding applied to user inputs.

Usage: hftoolkit generate runs/qa/model --input '{"context": "Ann lives in Oslo.", "question": "Where does Ann live?"}'
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

from hftoolkit.errors import UserError
from hftoolkit.generation import Decoding, generate_batch
from hftoolkit.lora import is_adapter_dir, merged_model
from hftoolkit.rundir import ModelInfo
from hftoolkit.tasks import PromptTemplate, get_task


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


def read_inputs(given: list[str] | None, field: str):
    """--input values, else stdin lines when piped, else an interactive prompt (until EOF)."""
    if given:
        yield from given
    elif sys.stdin.isatty():
        while True:
            try:
                line = input(f"{field}> ")
            except EOFError:
                return
            if line.strip():
                yield line
    else:
        yield from (line.rstrip("\n") for line in sys.stdin if line.strip())


def run_generate(args) -> int:
    from hftoolkit.modeling import load_tokenizer

    info = ModelInfo.read(args.model_dir)
    trained_for = info.task if info else None
    task = get_task(args.task or trained_for or "generation")
    if trained_for and args.task and args.task != trained_for:
        raise UserError(f"--task: {args.model_dir} was trained for '{trained_for}', not '{args.task}'")
    data = info.data if info else {}
    # The recipe keys the task reads (column names, languages) as the training run resolved them.
    data_cfg = SimpleNamespace(
        **{"source_lang": None, "target_lang": None, **data, "prompt_template": info and info.prompt_template}
    )
    template = task.template(data_cfg)
    if info and info.prompt_template:
        template = PromptTemplate(
            info.prompt_template, info.source_field or template.source_field, info.target_prefix
        )
    extra = task.fixed_fields(data_cfg)
    for item in args.field:
        if "=" not in item:
            raise UserError(f"--field: '{item}' is not NAME=VALUE")
        k, v = item.split("=", 1)
        extra[k] = v

    from transformers import AutoModelForCausalLM

    if is_adapter_dir(
        args.model_dir
    ):  # a LoRA run: its base with the adapter merged in, as `merge` would save
        model, tokenizer, _ = merged_model(args.model_dir, "generate")
    else:
        tokenizer = load_tokenizer(args.model_dir)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    model.eval()
    decoding = Decoding(
        max_new_tokens=args.max_new_tokens or (info and info.max_new_tokens) or 64,
        num_beams=args.num_beams or (info and info.num_beams) or 1,
        stop_strings=tuple(info.stop_strings if info else task.stop_strings),
    )
    for text in read_inputs(args.inputs, template.source_field):
        prompt = render_prompt(template, text, extra)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completions, _ = generate_batch(model, tokenizer, [ids], decoding)
        if args.show_prompt:
            print(prompt, end="")
        print(task.postprocess(completions[0], decoding.stop_strings))
    return 0
