"""Configuration of the influential-neuron path search (docs/method.md sections 2, 3)."""

from __future__ import annotations

from dataclasses import dataclass

from mip_core.attribution.quadrature import RULES, Rule, nodes_and_weights
from mip_core.types import TOWERS, Tower


@dataclass(frozen=True, slots=True)
class AttributionConfig:
    """How the greedy layer-by-layer path search runs. A bad value raises ``ValueError`` naming its field."""

    steps: int = 4  # m: interpolation copies per layer (quadrature nodes; alpha_s = s/m for the default rule)
    top_k: int = 5  # neurons kept per layer (the paper's experiments; its Algorithm 1 keeps 1)
    batch_items: int = 4  # B: items per forward/backward, i.e. B * steps rows per pass
    towers: tuple[Tower, ...] = ("language", "vision")  # branches run: text -> language, multimodal -> vision
    rule: Rule = "right"  # where the m copies sit on [0, 1] and what each weighs (attribution/quadrature.py)

    def __post_init__(self) -> None:
        for name in ("steps", "top_k", "batch_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AttributionConfig.{name} must be a positive integer, got {value!r}")
        towers = tuple(self.towers) if isinstance(self.towers, (list, tuple)) else None
        if not towers or any(t not in TOWERS for t in towers) or len(set(towers)) != len(towers):
            raise ValueError(f"AttributionConfig.towers must be a non-empty tuple of distinct towers from "
                             f"{list(TOWERS)}, got {self.towers!r}")
        object.__setattr__(self, "towers", towers)
        if self.rule not in RULES:
            raise ValueError(f"AttributionConfig.rule must be one of {list(RULES)}, got {self.rule!r}")
        try:
            nodes_and_weights(self.rule, self.steps)
        except ValueError as exc:
            raise ValueError(f"AttributionConfig.steps={self.steps} with rule={self.rule!r}: {exc}") from None
