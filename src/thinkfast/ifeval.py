"""Moved to :mod:`thinkfast.tasks.ifeval` (IFEval's checkers, as evaluation's grader and as RL rewards).

This name stays only until ``stages/eval.py`` imports ``load_ifeval`` from there; import from
:mod:`thinkfast.tasks.ifeval`.
"""

from .tasks.ifeval import *  # noqa: F401,F403
from .tasks.ifeval import __all__  # noqa: F401
