"""Task registry: a plain dict from the recipe's `task:` value to the task object."""

from hftoolkit.errors import UserError
from hftoolkit.tasks.base import LOSS_METRICS, PromptTemplate, Task
from hftoolkit.tasks.completion import CompletionTask
from hftoolkit.tasks.generation import GenerationTask
from hftoolkit.tasks.qa import QATask
from hftoolkit.tasks.summarization import SummarizationTask
from hftoolkit.tasks.translation import TranslationTask

TASKS: dict[str, Task] = {
    "generation": GenerationTask(),
    "summarization": SummarizationTask(),
    "translation": TranslationTask(),
    "qa": QATask(),
    "completion": CompletionTask(),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"task: unknown task '{name}' (choose one of: {', '.join(TASKS)})")
    return TASKS[name]


def lower_is_better(name: str) -> tuple[str, ...]:
    """The score names where smaller wins for task `name` (the losses for a task this version does not know)."""
    return TASKS[name].lower_is_better if name in TASKS else LOSS_METRICS


__all__ = ["TASKS", "PromptTemplate", "Task", "get_task", "lower_is_better"]
