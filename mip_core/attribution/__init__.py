"""Influential neuron path attribution: IGI on the language tower, IFI on the vision tower.

Method: docs/method.md sections 2 and 3.

``attribute_items`` is the entry point for benchmark items; ``path_search`` runs on encoded examples;
``layer_scores`` scores one layer given a fixed earlier path (the single-layer case, e.g. against Captum);
``completeness`` measures how far a quadrature rule (``quadrature.py``) is from the integral it estimates.
"""

from mip_core.attribution.config import AttributionConfig
from mip_core.attribution.quadrature import RULES, Rule, nodes_and_weights
from mip_core.attribution.items import EncodedItem, attribute_examples, attribute_items, tower_for
from mip_core.attribution.path_search import (
    METHOD_BY_TOWER,
    answer_logprob,
    check_example,
    completeness,
    frozen,
    layer_scores,
    path_search,
    top_k,
)

__all__ = [
    "METHOD_BY_TOWER",
    "RULES",
    "Rule",
    "completeness",
    "nodes_and_weights",
    "AttributionConfig",
    "EncodedItem",
    "answer_logprob",
    "attribute_examples",
    "attribute_items",
    "check_example",
    "frozen",
    "layer_scores",
    "path_search",
    "top_k",
    "tower_for",
]
