"""What a step costs, learned while serving: a fixed part per pass plus a part per fed position.

A joining request's prompt can be fed in the same pass as the others' next tokens (one pass,
but every row is padded to the prompt's length) or in a pass of its own (no padding, one more
pass). Which is cheaper depends on the machine: streamed from disk or on a GPU the pass is mostly
the weight read and padding is nearly free; warm on two CPU cores a padded position costs about a
twentieth of a pass (measured on the 2 GB bench model: 0.27 s for one row, 0.94 s for sixteen).
So the scheduler fits `seconds = fixed + per_position * positions` over its recent steps and
splits only when the padding would cost more than a pass.
"""

from __future__ import annotations

DECAY = (
    0.9  # weight of older steps: the regime changes (page cache warms, other load comes and goes)
)
MIN_SPREAD = 0.25  # positions must vary this much (std / mean) before the slope means anything


class StepCost:
    def __init__(self) -> None:
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, positions: int, seconds: float) -> None:
        d = DECAY
        self._w = self._w * d + 1.0
        self._x = self._x * d + positions
        self._y = self._y * d + seconds
        self._xx = self._xx * d + positions * positions
        self._xy = self._xy * d + positions * seconds

    def estimate(self) -> tuple[float, float] | None:
        """(fixed seconds per pass, seconds per position), or None while the steps seen so far
        all fed about the same number of positions."""
        if self._w == 0:
            return None
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mean_x * mean_x
        if mean_x <= 0 or var <= (MIN_SPREAD * mean_x) ** 2:
            return None
        slope = max(0.0, (self._xy / self._w - mean_x * mean_y) / var)
        return max(0.0, mean_y - slope * mean_x), slope

    def separate_pass_pays(self, saved_positions: int) -> bool:
        """Whether one more pass costs less than computing `saved_positions` padded positions."""
        fit = self.estimate()
        if fit is None or saved_positions <= 0:
            return False
        fixed, per_position = fit
        return per_position * saved_positions > fixed
