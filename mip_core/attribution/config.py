"""Configuration of the influential-neuron path search (docs/method.md sections 2, 3)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from mip_core.attribution.quadrature import Rule, nodes_and_weights
from mip_core.config import Count, config_class
from mip_core.types import Tower


@config_class
class AttributionConfig:
    """How the greedy layer-by-layer path search runs. A bad value raises ``InputError`` naming its field."""

    steps: Count = 4  # m: interpolation copies per layer (quadrature nodes; alpha_s = s/m for the default rule)
    top_k: Count = 5  # neurons kept per layer (the paper's experiments; its Algorithm 1 keeps 1)
    batch_items: Count = 4  # B: items per forward/backward, i.e. B * steps rows per pass
    # branches run, each once: text -> language, multimodal -> vision
    towers: Annotated[tuple[Tower, ...], Field(min_length=1)] = ("language", "vision")
    rule: Rule = "right"  # where the m copies sit on [0, 1] and what each weighs (attribution/quadrature.py)

    @field_validator("towers")
    @classmethod
    def _distinct(cls, towers: tuple[Tower, ...]) -> tuple[Tower, ...]:
        if len(set(towers)) != len(towers):
            raise ValueError("name each tower once")
        return towers

    @model_validator(mode="after")
    def _rule_fits_steps(self) -> AttributionConfig:
        """Some rules need more than one node; the quadrature module knows which."""
        try:
            nodes_and_weights(self.rule, self.steps)
        except ValueError as exc:
            raise ValueError(f"AttributionConfig.steps={self.steps} with rule={self.rule!r}: {exc}") from None
        return self
