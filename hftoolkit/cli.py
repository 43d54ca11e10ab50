"""The `hftoolkit` command: parse arguments and dispatch. No logic lives here.

Usage: hftoolkit train RECIPE.yaml [key.sub=value ...]   (see `hftoolkit --help`)
"""

from __future__ import annotations

import argparse
import os
import sys

from hftoolkit.errors import UserError
from hftoolkit.tasks import TASKS

RECIPE_HELP = "recipe YAML: a path, or the name of a shipped recipe (see `hftoolkit recipes ls`)"
OVERRIDE_HELP = "key.sub=value overrides, parsed as YAML (e.g. train.max_steps=100 data.packing=false)"


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help=RECIPE_HELP)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hftoolkit",
        description="Fine-tune GPT-2-class decoder-only models (generation, summarization, translation, QA, any "
        "prompt → completion) "
        "with transformers + accelerate, and score them with evaluate metrics.",
        epilog="Add --debug to any command to see the full traceback of an error.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_recipe_commands(sub)
    _add_model_commands(sub)
    _add_push_recipes_report(sub)
    _add_merge_quickstart(sub)
    return parser


def _add_recipe_commands(sub) -> None:
    """train, eval, plan: RECIPE [key.sub=value ...]."""
    p = sub.add_parser("train", help="fine-tune per a recipe", description="Fine-tune per a recipe; writes the run directory "
                       "(config.yaml, metrics.jsonl, results.json, predictions.jsonl, model/, ...). Same under "
                       "`accelerate launch [args] -m hftoolkit train RECIPE.yaml`.")  # fmt: skip
    _recipe_args(p)

    p = sub.add_parser("eval", help="score a checkpoint on the recipe's eval data, or on evaluation suites",
                       description="Score model.name_or_path on the recipe's eval data without training; writes "
                       "results.json {'final': ...} and predictions.jsonl into output_dir. With --suite, the first "
                       "argument is MODEL_OR_RUN_DIR and the benchmark of eval/SUITE.yaml is scored (see "
                       "eval/README.md); results go to results.json's 'suites'.")  # fmt: skip
    _recipe_args(p)
    p.add_argument("--suite", metavar="SUITE",
                   help="an evaluation suite: eval/NAME.yaml, a shipped name (xsum, wmt16_ro_en, ...), or all "
                   "(every suite of the model's task); RECIPE is then a model folder, Hub id or run directory")  # fmt: skip
    p.add_argument("--limit", type=int, metavar="N", help="--suite: score only the first N examples")
    p.add_argument("--output-dir", help="--suite: where results.json goes (default: the run directory given, "
                   "else runs/suites/MODEL)")  # fmt: skip

    p = sub.add_parser("plan", help="dry run: resolved config, masked examples, lengths, estimates",
                       description="Show what a recipe would train on, without training.")  # fmt: skip
    _recipe_args(p)
    p.add_argument("--examples", type=int, default=2, help="rendered training examples to show (default 2)")
    p.add_argument(
        "--no-color", action="store_true", help="mark the loss-masked prompt with [[ ]] instead of colour"
    )
    p.add_argument(
        "--tokens-per-second",
        type=float,
        help="throughput for the time estimate (default: a previous run's in output_dir)",
    )

    p = sub.add_parser("preprocess", help="tokenize a recipe's data into the tokenize-once cache, ahead of training",
                       description="Load and tokenize the recipe's splits exactly as `train` would (tokenizer, "
                       "template, max_seq_len, packing; no model weights) into the tokenize-once cache, e.g. on a "
                       "CPU box before the GPU job; prints each entry's location and size. train, plan and eval of "
                       "the same recipe then load it instead of tokenizing. Workers: "
                       "data.preprocessing_num_workers=N; location: data.cache_dir or $HFTOOLKIT_CACHE.")  # fmt: skip
    _recipe_args(p)


def _add_model_commands(sub) -> None:
    """generate, init-model: a model folder in or out."""
    p = sub.add_parser("generate", help="apply a task's prompt template + decoding to inputs",
                       description="Run a trained model on inputs through its task's prompt template and decoding. "
                       "Inputs: --input (repeatable), else stdin lines, else an interactive prompt.")  # fmt: skip
    p.add_argument("model_dir", help="a model folder (RUN_DIR/model) or Hub id")
    p.add_argument(
        "--task",
        help=f"{' | '.join(TASKS)} (default: from MODEL_DIR/hftoolkit.json)",
    )
    p.add_argument("--input", action="append", dest="inputs", metavar="TEXT",
                   help="the source text (document / sentence / context), or a JSON object of template fields")  # fmt: skip
    p.add_argument("--field", action="append", default=[], metavar="NAME=VALUE",
                   help="another template field, e.g. --field question='Who?' for qa")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, help="decoding budget (default: the model's)")
    p.add_argument("--num-beams", type=int, help="beam width (default: the model's)")
    p.add_argument(
        "--show-prompt", action="store_true", help="print the rendered prompt before each completion"
    )

    p = sub.add_parser("init-model", help="create a GPT-2-architecture checkpoint offline",
                       description="Write a freshly initialised GPT-2-architecture model + tokenizer folder, offline.")  # fmt: skip
    p.add_argument("out_dir", help="new folder to create")
    p.add_argument(
        "--preset", default="tiny", choices=["tiny", "small", "gpt2"], help="size (gpt2 = the 124M shape)"
    )
    p.add_argument(
        "--tokenizer", default="gpt2", help="gpt2 (real GPT-2 BPE) | bpe:TEXT_FILE (train a byte-level BPE)"
    )
    p.add_argument(
        "--vocab-size", type=int, default=1024, help="vocabulary size for bpe:TEXT_FILE (default 1024)"
    )
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")


def _add_push_recipes_report(sub) -> None:
    """push, recipes, report."""
    p = sub.add_parser("push", help="publish a run to the Hugging Face Hub",
                       description="Upload RUN_DIR/model, the card, config, results and plots to a Hub repo. "
                       "Token from HF_TOKEN or `hf auth login`.")  # fmt: skip
    p.add_argument("run_dir")
    p.add_argument("--repo-id", required=True, help="namespace/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to push to (created if missing)")
    p.add_argument(
        "--dry-run", action="store_true", help="write the folder that would be uploaded, upload nothing"
    )
    p.add_argument(
        "--merge-adapters",
        action="store_true",
        help="LoRA runs: upload base + adapter merged (needed when the base is not a Hub model, e.g. model.init)",
    )

    p = sub.add_parser(
        "recipes", help="list or copy the shipped recipes", description="List or copy the shipped recipes."
    )
    rsub = p.add_subparsers(dest="recipes_command", metavar="ls|cp", required=True)
    rsub.add_parser(
        "ls", help="list shipped recipes", description="List shipped recipes: name, task, model, dataset."
    )
    cp = rsub.add_parser(
        "cp", help="copy a shipped recipe", description="Copy a shipped recipe to DEST to edit it."
    )
    cp.add_argument("name", help="recipe name from `hftoolkit recipes ls`")
    cp.add_argument("dest", help="destination file or folder")

    p = sub.add_parser(
        "report", help="compare runs", description="Print a comparison table of runs' results."
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")


def _add_merge_quickstart(sub) -> None:
    """merge, quickstart."""
    p = sub.add_parser("merge", help="merge a LoRA run's adapters into a plain checkpoint",
                       description="Write RUN_DIR/merged: the base model with LoRA adapters merged; loads without peft.")  # fmt: skip
    p.add_argument("run_dir")
    p.add_argument("--out", help="destination folder (default RUN_DIR/merged)")

    p = sub.add_parser("quickstart", help="train + evaluate the offline quickstart recipes, print a before/after table",
                       description="Run the offline quickstart recipes (eval/quickstart.yaml) on CPU and print baseline vs final scores.")  # fmt: skip
    p.add_argument(
        "--output-root", default="runs/quickstart", help="where the runs go (default runs/quickstart)"
    )
    p.add_argument("--tasks", nargs="*", default=None, help=f"subset of: {' '.join(TASKS)}")


# Long on purpose: one short branch per subcommand, each importing only what that command needs.
def dispatch(args) -> int:
    if args.command == "eval" and args.suite:
        from hftoolkit.suites import run_suites

        if args.limit is not None and args.limit < 1:
            raise UserError(f"--limit: must be ≥ 1, got {args.limit}")
        run_suites(args.suite, args.recipe, args.limit, args.overrides, args.output_dir)
        return 0
    if args.command in ("train", "eval", "plan", "preprocess"):
        from hftoolkit.config import load_recipe
        from hftoolkit.recipes import resolve_recipe_path

        recipe = load_recipe(resolve_recipe_path(args.recipe), args.overrides)
        if args.command == "train":
            from hftoolkit.train import train

            train(recipe)
        elif args.command == "preprocess":
            from hftoolkit.preprocess import preprocess

            preprocess(recipe)
        elif args.command == "eval":
            from hftoolkit.train import evaluate_only

            evaluate_only(recipe)
        else:
            from hftoolkit.plan import plan

            color = not args.no_color and sys.stdout.isatty()
            plan(recipe, examples=args.examples, color=color, tokens_per_second=args.tokens_per_second)
        return 0
    if args.command == "generate":
        from hftoolkit.predict import run_generate

        return run_generate(args)
    if args.command == "init-model":
        from hftoolkit.modeling import init_model_dir

        out = init_model_dir(args.out_dir, args.preset, args.tokenizer, args.vocab_size, args.seed)
        print(f"wrote {out}")
        return 0
    if args.command == "push":
        from hftoolkit.hub import push_run

        where = push_run(
            args.run_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            dry_run=args.dry_run,
            merge_adapters=args.merge_adapters,
        )
        print(f"{'dry run: the upload folder is' if args.dry_run else 'pushed:'} {where}")
        return 0
    if args.command == "recipes":
        from hftoolkit import recipes

        if args.recipes_command == "ls":
            print(recipes.format_table(recipes.list_recipes()))
        else:
            print(f"wrote {recipes.copy_recipe(args.name, args.dest)}")
        return 0
    if args.command == "report":
        from hftoolkit.report import compare_runs

        print(compare_runs(args.run_dirs))
        return 0
    if args.command == "merge":
        from hftoolkit.lora import merge_run

        print(f"wrote {merge_run(args.run_dir, args.out)}")
        return 0
    if args.command == "quickstart":
        from hftoolkit.quickstart import run_quickstart

        print(run_quickstart(args.output_root, args.tasks))
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("HFTOOLKIT_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides after an option (`eval --suite S MODEL --limit 5 data.x=y`): argparse stops the
    # positional list at the option and leaves the rest over.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return dispatch(args)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # an unexpected failure: still one line unless --debug
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(
            f"error: {type(e).__name__}: {first} (run again with --debug for the traceback)", file=sys.stderr
        )
        return 1
