"""Every shipped recipe loads and validates; discovery commands list and copy them."""

from __future__ import annotations

from pathlib import Path

import pytest

from hftoolkit.config import load_recipe
from hftoolkit.recipes import list_recipes, recipes_root

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_loads_and_says_how_to_run(path):
    """A shipped recipe that does not validate, or does not say how to run it, is a broken promise."""
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run") and "hftoolkit" in first
    real = "quickstart" not in path.parts
    sources = recipe.data.sources or []
    if real:  # real recipes keep real Hub ids and say what to expect
        hub_ids = [s.dataset_name for s in sources] if sources else [recipe.data.dataset_name]
        assert recipe.model.name_or_path and recipe.model.init is None and all(hub_ids)
        assert "Expected" in path.read_text()
    elif sources:  # an offline mixture: files shipped next to the recipe
        assert all((ROOT / s.train_file).is_file() for s in sources)
        assert all((ROOT / s.validation_file).is_file() for s in (recipe.data.eval_sets or {}).values())
    else:
        assert recipe.data.synthetic is not None  # runs offline


def test_every_task_has_a_quickstart_and_a_real_recipe():
    """Each task ships an offline quickstart and a real Hub recipe."""
    from hftoolkit.tasks import TASKS

    rows = list_recipes()
    quickstart_name = {"completion": "classification"}  # the completion quickstart is a classifier
    for task in TASKS:
        names = [r["name"] for r in rows if r["task"] == task]
        assert f"quickstart/{quickstart_name.get(task, task)}" in names
        assert any(not n.startswith("quickstart/") for n in names), task


def test_recipes_ls_and_cp(cli, tmp_path):
    """`recipes ls` shows name/task/model/dataset; `recipes cp` copies a loadable file and refuses to overwrite."""
    code, out, _ = cli("recipes", "ls")
    assert code == 0 and "quickstart/qa" in out and "rajpurkar/squad" in out
    code, out, _ = cli("recipes", "cp", "quickstart/qa", tmp_path)
    assert code == 0 and (tmp_path / "qa.yaml").is_file()
    load_recipe(tmp_path / "qa.yaml")
    code, _, err = cli("recipes", "cp", "quickstart/qa", tmp_path)
    assert code == 2 and "exists" in err and "Traceback" not in err
    code, _, err = cli("recipes", "cp", "nope", tmp_path)
    assert code == 2 and "available:" in err
    assert recipes_root().is_dir()


def test_quickstart_suite_matches_the_recipes():
    """eval/quickstart.yaml names existing quickstart recipes and each task's headline metric, with a bar."""
    from hftoolkit.quickstart import load_suite, passed
    from hftoolkit.tasks import get_task

    entries = load_suite()
    assert {e["recipe"] for e in entries} == {
        f"quickstart/{t}" for t in ("generation", "summarization", "translation", "qa", "classification")
    }
    for e in entries:
        recipe = load_recipe(recipes_root() / f"{e['recipe']}.yaml")
        task = get_task(recipe.task)
        task.resolve(recipe.data)
        assert e["metric"] == task.headline_metric(recipe.data)
        assert ("min_gain" in e) == e["higher_is_better"]
    qa = next(e for e in entries if e["recipe"] == "quickstart/qa")
    assert passed(qa, 0.0, 31.0) and not passed(qa, 0.0, 29.0)
    gen = next(e for e in entries if e["recipe"] == "quickstart/generation")
    assert passed(gen, 600.0, 100.0) and not passed(gen, 600.0, 200.0)
