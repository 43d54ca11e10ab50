"""The shipped recipes: find, list, copy. Works from a source checkout and from an installed package
(the package carries them as data under hftoolkit/recipes_shipped, a link to the top-level recipes/ folder)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from hftoolkit.errors import UserError


def recipes_root() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "recipes_shipped", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise UserError("no shipped recipes found next to the hftoolkit package (broken install?)")


def list_recipes() -> list[dict]:
    root = recipes_root()
    rows = []
    for path in sorted(root.rglob("*.yaml")):
        rel = path.relative_to(root)
        if rel.parts[0] == "accelerate":
            continue  # launch configs, not recipes
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        model = raw.get("model") or {}
        data = raw.get("data") or {}
        init = model.get("init")
        dataset = (
            data.get("dataset_name")
            or data.get("train_file")
            or ("synthetic" if data.get("synthetic") else None)
            or (f"mixture of {len(data['sources'])}" if data.get("sources") else "-")
        )
        if data.get("dataset_config_name"):
            dataset += f" ({data['dataset_config_name']})"
        rows.append({
            "name": str(rel.with_suffix("")),
            "task": raw.get("task", "generation"),
            "model": f"init:{init.get('preset', 'tiny')}" if init else model.get("name_or_path", "gpt2"),
            "dataset": dataset,
            "description": _description(path),
        })  # fmt: skip
    return rows


def _description(path: Path) -> str:
    """The first comment line that is not the command (recipes open with `# Run: ...` then a description)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("# ").strip()
        if not line.startswith("#"):
            break
        if text and not text.lower().startswith(("run:", "usage:", "accelerate", "hftoolkit")):
            return text
    return ""


def format_table(rows: list[dict]) -> str:
    cols = ["name", "task", "model", "dataset", "description"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def resolve_recipe_path(name_or_path: str) -> Path:
    """A file path as given, else the name of a shipped recipe (e.g. quickstart/qa)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml") and path.parent != Path("."):
        return path
    shipped = recipes_root() / f"{name_or_path.removesuffix('.yaml')}.yaml"
    return shipped if shipped.is_file() else path


def copy_recipe(name: str, dest: str) -> Path:
    src = recipes_root() / f"{name.removesuffix('.yaml')}.yaml"
    if not src.is_file():
        names = ", ".join(r["name"] for r in list_recipes())
        raise UserError(f"recipes cp: no shipped recipe '{name}' (available: {names})")
    target = Path(dest)
    if target.is_dir():
        target = target / src.name
    if target.exists():
        raise UserError(f"recipes cp: {target} exists; choose another destination")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    return target
