"""Example reward functions for `config.reward.functions` ("examples.rewards:<name>", run from
the repository root), each called as `fn(prompts, completions, answers, **columns)` on one
prompt's responses and returning one float per completion (see `gxpo.rl.rewards`).

    python launch.py --config=configs/smollm2_arith.py \\
        --config.reward.functions='("correct", "examples.rewards:length_penalty")' \\
        --config.reward.weights='(1.0, 0.5)'
"""

from __future__ import annotations

DEFAULT_BUDGET = 200  # characters, where a row has no `max_chars` field


def length_penalty(prompts, completions, answers, max_chars=None, **columns) -> list[float]:
    """0 for a completion within its budget, then down linearly to -1 at twice the budget.

    The budget is the data's `max_chars` field where a row has one (a column reaches the
    function as a keyword argument, one value per completion), else `DEFAULT_BUDGET`. With a
    weight below 1 next to "correct", a right answer always pays more than a short one.
    """
    budgets = max_chars or [None] * len(completions)
    penalties = []
    for completion, budget in zip(completions, budgets):
        budget = budget or DEFAULT_BUDGET
        over = max(len(completion) - budget, 0) / budget
        penalties.append(-min(over, 1.0))
    return penalties
