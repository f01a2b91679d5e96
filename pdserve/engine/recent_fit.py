"""Exponentially weighted least squares over recent observations: what the engines' time estimates fit."""

from __future__ import annotations

from typing import Sequence

import numpy as np


class RecentFit:
    """``y ~ coef . x`` over observations weighted ``decay ** age`` (the first feature is the constant 1).

    ``coef`` is None before the first observation and while the observations are too alike to tell the
    terms apart (a negative coefficient); callers then fall back to a rate or a mean, from the decayed sums
    ``sum_x`` (``sum_x[0]``: the decayed count) and ``sum_y``."""

    def __init__(self, terms: int, decay: float) -> None:
        self.decay = decay
        self._xx = np.zeros((terms, terms))
        self._xy = np.zeros(terms)
        self.sum_x = np.zeros(terms)
        self.sum_y = 0.0
        self.coef: tuple[float, ...] | None = None

    def add(self, x: Sequence[float], y: float) -> None:
        x = np.asarray(x, dtype=float)
        self._xx = self.decay * self._xx + np.outer(x, x)
        self._xy = self.decay * self._xy + x * y
        self.sum_x = self.decay * self.sum_x + x
        self.sum_y = self.decay * self.sum_y + y
        coef = np.linalg.lstsq(self._xx + 1e-9 * np.eye(len(x)), self._xy, rcond=None)[0]
        self.coef = tuple(float(c) for c in coef) if (coef >= 0).all() else None

    def predict(self, x: Sequence[float]) -> float | None:
        """``coef . x``, or None without a fit."""
        if self.coef is None:
            return None
        return sum(c * v for c, v in zip(self.coef, x))
