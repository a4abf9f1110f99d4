"""Model building, loading, saving and input encoding."""

from mip_core.modeling.inputs import collate, encode, prompt_text
from mip_core.modeling.io import LoadedModel, load_model, save_model
from mip_core.modeling.tiny import build_tiny

__all__ = ["LoadedModel", "build_tiny", "collate", "encode", "load_model", "prompt_text", "save_model"]
