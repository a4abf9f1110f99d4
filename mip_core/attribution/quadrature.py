"""Quadrature rules for the path integral of integrated gradients: where the copies sit, and what each weighs.

An attribution score integrates a gradient along the straight line ``alpha * a``, ``alpha`` from 0 to 1. With
nodes ``alpha_s`` and weights ``w_s`` (summing to 1, the length of the interval), a score is
``sum_p a_p * sum_s w_s * g_s,p``; one interpolation copy per node runs in the pass, so the node count is the
cost. numpy's Gauss-Legendre table is used rather than a hand-written one.

- ``right``: ``alpha_s = s/m``, ``w_s = 1/m`` (the right Riemann sum of the paper's Eq. 4; the default, so
  today's selection is unchanged). Its last copy is the unscaled input, which is where the original
  activations are read.
- ``log_trapezoid``: ``alpha = 0`` and ``m - 1`` nodes spaced geometrically from ``1e-6`` to 1, trapezoid
  weights. For integrands that change over several decades of small ``alpha`` (a layer whose MLP output is
  a thousand times the residual stream it is added to, as in the demo model): the only rule measured to come
  within 5 % of complete on the demo model's language tower (at ``m = 1024``).
- ``gauss_legendre``: the ``m`` Gauss-Legendre nodes mapped to ``(0, 1)``; exact for polynomials of degree
  ``2m - 1`` where the right sum is exact for constants only. No node is 1, so the original activations come
  from one extra forward of the unscaled items (no backward) before the layers are searched.

Neither rule is accurate on the integrands of a trained model at a few nodes: the answer log-probability
moves sharply for ``alpha`` below about 0.3 and barely above it (docs/attribution.md, "Completeness"), which
is why the completeness gap is measured and reported beside the speed (``make bench``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Rule = Literal["right", "gauss_legendre", "log_trapezoid"]
RULES: tuple[Rule, ...] = ("right", "gauss_legendre", "log_trapezoid")
#: The smallest non-zero node of ``log_trapezoid``.
LOG_TRAPEZOID_FLOOR = 1e-6


def nodes_and_weights(rule: Rule, steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(alphas, weights)`` of ``rule`` with ``steps`` nodes on [0, 1], alphas ascending, weights summing to 1."""
    if rule == "right":
        return tuple(s / steps for s in range(1, steps + 1)), (1 / steps,) * steps
    if rule == "gauss_legendre":
        x, w = np.polynomial.legendre.leggauss(steps)  # nodes on [-1, 1], weights summing to 2
        return tuple(float(v) for v in (x + 1) / 2), tuple(float(v) for v in w / 2)
    if rule == "log_trapezoid":
        if steps < 2:
            raise ValueError("the log_trapezoid rule needs at least 2 nodes (alpha = 0 and alpha = 1)")
        alphas = np.concatenate([[0.0], np.geomspace(LOG_TRAPEZOID_FLOOR, 1.0, steps - 1)])
        alphas[-1] = 1.0  # exactly: the last copy is then the unscaled forward, where originals are read
        gaps = np.diff(alphas)
        weights = np.zeros(steps)
        weights[:-1] += gaps / 2
        weights[1:] += gaps / 2
        return tuple(float(v) for v in alphas), tuple(float(v) for v in weights)
    raise ValueError(f"unknown quadrature rule {rule!r}; choose one of {list(RULES)}")


def reads_originals_from_last_copy(rule: Rule) -> bool:
    """Whether the rule's last node is ``alpha = 1``, so that copy's forward is the unscaled one."""
    return nodes_and_weights(rule, 2)[0][-1] == 1.0
