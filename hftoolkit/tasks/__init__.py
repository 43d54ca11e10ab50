"""Task registry: a plain dict from the recipe's `task:` value to the task object."""

from hftoolkit.errors import UserError
from hftoolkit.tasks.base import PromptTemplate, Task
from hftoolkit.tasks.generation import GenerationTask
from hftoolkit.tasks.qa import QATask
from hftoolkit.tasks.summarization import SummarizationTask
from hftoolkit.tasks.translation import TranslationTask

TASKS: dict[str, Task] = {
    "generation": GenerationTask(),
    "summarization": SummarizationTask(),
    "translation": TranslationTask(),
    "qa": QATask(),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"task: unknown task '{name}' (choose one of: {', '.join(TASKS)})")
    return TASKS[name]


__all__ = ["TASKS", "PromptTemplate", "Task", "get_task"]
