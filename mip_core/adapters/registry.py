"""The adapter registry: ``config.model_type`` -> adapter class (imports torch and transformers)."""

from __future__ import annotations

from torch import nn

from mip_core.adapters.base import ModelAdapter, unwrap
from mip_core.adapters.llava import LlavaAdapter
from mip_core.adapters.qwen2_5_vl import Qwen25VLAdapter
from mip_core.adapters.qwen2_vl import Qwen2VLAdapter
from mip_core.errors import UnsupportedModelError

ADAPTERS: dict[str, type[ModelAdapter]] = {
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen25VLAdapter,
    "llava": LlavaAdapter,
}


def adapter_class(model_type: str) -> type[ModelAdapter]:
    """The adapter class for a ``config.model_type``; raises listing the supported types."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no adapter; supported: {', '.join(sorted(ADAPTERS))}. "
            "Use one of these architectures, or add an adapter under mip_core/adapters/."
        ) from None


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Build the adapter of a live model (wrappers stripped), resolving its MLP sites once."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(base).__name__} has no HF config; pass a transformers model")
    return adapter_class(getattr(config, "model_type", "<none>"))(base)


__all__ = ["ADAPTERS", "adapter_class", "get_adapter"]
