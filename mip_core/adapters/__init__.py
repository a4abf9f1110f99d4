"""Architecture adapters, chosen by ``config.model_type``. Adding one: a module here and a line in ADAPTERS."""

from __future__ import annotations

from torch import nn

from mip_core.adapters.base import TINY_SIZES, MLPLayout, ModelAdapter, TinySize, unwrap
from mip_core.adapters.llava import LlavaAdapter
from mip_core.adapters.qwen2_5_vl import Qwen25VLAdapter
from mip_core.adapters.qwen2_vl import Qwen2VLAdapter
from mip_core.errors import UnsupportedModelError

ADAPTERS: dict[str, type[ModelAdapter]] = {
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen25VLAdapter,
    "llava": LlavaAdapter,
}
#: The architecture the demo and the CLI build when none is named (the paper's main model family).
DEFAULT_ARCH = "qwen2_5_vl"


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


__all__ = ["ADAPTERS", "DEFAULT_ARCH", "TINY_SIZES", "MLPLayout", "ModelAdapter", "TinySize", "adapter_class", "get_adapter",
           "unwrap"]
