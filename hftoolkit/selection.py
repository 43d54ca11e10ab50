"""Which step to publish: the best periodic evaluation by the task's metric, and early stopping.

Keys (TrainingArguments' names): train.metric_for_best_model (default: the task's headline metric, e.g. rougeL;
perplexity for generation; with data.eval_sets the plain name is the first set's, "<set>/<metric>" another's), train.greater_is_better (default: from the metric), train.load_best_model_at_end
(default: on whenever train.eval_steps is set), train.early_stopping_patience / early_stopping_threshold.

Candidates are the periodic evaluations (on eval.max_eval_samples_during_training prompts when set), the last step
included. A new best is checkpointed at once (even between save_steps) and that checkpoint is never rotated away.
The best and the patience counter live in `Progress`, so a resume continues them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from hftoolkit.errors import UserError


@dataclass(frozen=True)
class Selection:
    metric: str
    greater_is_better: bool
    load_best: bool
    patience: int | None
    threshold: float

    def improves(self, value: float, best: float | None) -> bool:
        """Better than `best` by at least the threshold (any value beats no best)."""
        if best is None:
            return True
        gain = value - best if self.greater_is_better else best - value
        return gain > 0 and gain >= self.threshold


def selection_for(recipe, task) -> Selection | None:
    """The run's selection settings; None when there are no periodic evaluations to choose from."""
    t = recipe.train
    if not t.eval_steps:
        return None
    # "<set>/<metric>" picks by one of data.eval_sets; the trackers' "eval/" prefix is accepted too.
    metric = (t.metric_for_best_model or task.headline_metric(recipe.data)).removeprefix("eval/")
    lower = metric.rpartition("/")[2] in task.lower_is_better
    greater = t.greater_is_better if t.greater_is_better is not None else not lower
    load_best = t.load_best_model_at_end if t.load_best_model_at_end is not None else True
    return Selection(metric, greater, load_best, t.early_stopping_patience, t.early_stopping_threshold)


def update(selection: Selection, progress, scores: dict) -> tuple[bool, str | None]:
    """Record a periodic evaluation in `progress` → (a new best, the reason to stop early or None)."""
    if selection.metric not in scores:
        raise UserError(
            f"train.metric_for_best_model: '{selection.metric}' is not among the evaluation's scores "
            f"({', '.join(sorted(scores))})"
        )
    value = scores[selection.metric]
    if selection.improves(value, progress.best.get("value")):
        progress.best = {"step": progress.step, "metric": selection.metric, "value": value}
        progress.evals_without_improvement = 0
        return True, None
    progress.evals_without_improvement += 1
    if selection.patience is not None and progress.evals_without_improvement >= selection.patience:
        best = progress.best
        return False, (
            f"early stopping: {selection.metric} has not improved by ≥ {selection.threshold:g} for "
            f"{selection.patience} evaluation(s) since step {best['step']} ({selection.metric} {best['value']:g})"
        )
    return False, None
