"""Architecture adapters, chosen by ``config.model_type``. Adding one: a module here, a line in ADAPTERS and its
``model_type`` in ARCHITECTURES.

The package itself stays light (no torch, no transformers): ``mip --help`` lists the architectures and tiny
sizes from the names below in well under a second; the adapter classes load on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

#: ``config.model_type`` values with an adapter (checked against ADAPTERS by tests/unit/test_adapters.py).
ARCHITECTURES = ("llava", "qwen2_5_vl", "qwen2_vl")
#: The architecture the demo and the CLI build when none is named (the paper's main model family).
DEFAULT_ARCH = "qwen2_5_vl"
#: Names of the tiny model sizes (``TINY_SIZES`` holds their shapes).
TINY_SIZE_NAMES = ("demo", "scale2", "test")

if TYPE_CHECKING:
    from mip_core.adapters.base import TINY_SIZES, MLPLayout, ModelAdapter, TinySize, unwrap
    from mip_core.adapters.registry import ADAPTERS, adapter_class, get_adapter

_LAZY = {"ADAPTERS": "registry", "adapter_class": "registry", "get_adapter": "registry", "TINY_SIZES": "base",
         "MLPLayout": "base", "ModelAdapter": "base", "TinySize": "base", "unwrap": "base"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mip_core.adapters' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"mip_core.adapters.{_LAZY[name]}"), name)


__all__ = ["ADAPTERS", "ARCHITECTURES", "DEFAULT_ARCH", "TINY_SIZES", "TINY_SIZE_NAMES", "MLPLayout", "ModelAdapter",
           "TinySize", "adapter_class", "get_adapter", "unwrap"]
