"""Evaluation: the harness (:mod:`.harness`: one loop over tasks, each mode's prompts generated through a
backend and graded by the task's grader; tables), the real benchmark suites (:mod:`.suites`) and the estimators
of its tables (:mod:`.estimators`: pass@k, maj@n)."""

from .harness import (CHAT_MODES, TEXT_MODES, Answers, EvalSettings, IFEvalTask, MathSuiteTask, NanoTask,
                      budget_sweep, build_prompt, chat_ids, decoded, evaluate, evaluate_ifeval, evaluate_items,
                      evaluate_phrased, format_table, grade, if_check, item_prompt, models_table, quick_accuracy, resolve_prompting, run_task,
                      suites_table, toggle_check)

__all__ = ["CHAT_MODES", "TEXT_MODES", "Answers", "EvalSettings", "IFEvalTask", "MathSuiteTask", "NanoTask",
           "budget_sweep", "build_prompt", "chat_ids", "decoded", "evaluate", "evaluate_ifeval", "evaluate_items",
           "evaluate_phrased", "format_table", "grade", "if_check", "item_prompt", "models_table", "quick_accuracy", "resolve_prompting", "run_task",
           "suites_table", "toggle_check"]
