"""Pieces shared by the two Qwen-VL adapters: the image-only processors and the tiny model's chat format.

The image-only processors exist because the shipped ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` require a video
processor, which requires torchvision, which not every environment that runs this project can import. They are
an in-process stand-in only: what they save names the standard classes (``processor_class`` in
``processor_config.json`` and ``tokenizer_config.json``) and carries the video processor's config, so that a
checkpoint loads with plain ``AutoProcessor.from_pretrained`` where torchvision is installed. This project loads
it back through the subclass explicitly (the adapter's ``load_processor``), whatever class the files name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from mip_core.adapters.base import TinySize

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)

# ChatML, as Qwen checkpoints ship it, reduced to what the benchmark uses (text parts and images).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _init_image_only(self: Any, image_processor: Any, tokenizer: Any, chat_template: str | None) -> None:
    # The shipped processors require a video processor, which requires torchvision; we never feed video.
    self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
    self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
    self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
    self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
    ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


#: The video processor class ``AutoVideoProcessor`` resolves for both Qwen-VL model types.
VIDEO_PROCESSOR_TYPE = "Qwen2VLVideoProcessor"
#: Image processor settings the video processor shares (same patching, resizing bounds and normalisation).
_SHARED_WITH_VIDEO = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
                      "merge_size", "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size")


def video_processor_config(image_processor_config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``video_processor`` entry the standard processor needs, consistent with the image processor's config.

    Frames are patched, resized and normalised exactly as images are (the vision tower is the same); frame
    sampling is left off (``do_sample_frames`` false, the class default).
    """
    video = {k: image_processor_config[k] for k in _SHARED_WITH_VIDEO if k in image_processor_config}
    video["do_sample_frames"] = False
    video["video_processor_type"] = VIDEO_PROCESSOR_TYPE
    return video


def _write_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Replace ``path`` by a new file (never writes through a hard link into another checkpoint's file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def standardize_saved_processor(folder: str | os.PathLike[str], processor_class: str) -> list[str]:
    """Make a saved Qwen-VL processor name the standard classes; returns the files it rewrote.

    ``processor_config.json``: ``processor_class`` set to ``processor_class`` and a ``video_processor`` entry
    derived from the image processor's config (added when missing). ``tokenizer_config.json``:
    ``processor_class``. Idempotent; files already standard are left untouched.
    """
    root = Path(folder)
    rewritten = []
    proc_file = root / "processor_config.json"
    if proc_file.is_file():
        doc = json.loads(proc_file.read_text(encoding="utf-8"))
        new = dict(doc, processor_class=processor_class)
        if "video_processor" not in new and isinstance(new.get("image_processor"), Mapping):
            new["video_processor"] = video_processor_config(new["image_processor"])
        if new != doc:
            _write_json(proc_file, new)
            rewritten.append(proc_file.name)
    tok_file = root / "tokenizer_config.json"
    if tok_file.is_file():
        doc = json.loads(tok_file.read_text(encoding="utf-8"))
        if doc.get("processor_class") != processor_class:
            _write_json(tok_file, dict(doc, processor_class=processor_class))
            rewritten.append(tok_file.name)
    return rewritten


class _SavesAsStandard:
    """Mixin: serialise as the standard processor class (``STANDARD``), with its video processor config."""

    STANDARD: str

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()  # type: ignore[misc]
        out["processor_class"] = self.STANDARD
        if isinstance(out.get("image_processor"), Mapping):
            out["video_processor"] = video_processor_config(out["image_processor"])
        return out

    def save_pretrained(self, save_directory: str | os.PathLike[str], push_to_hub: bool = False,
                        **kwargs: Any) -> list[str]:
        if push_to_hub:
            raise NotImplementedError(f"{type(self).__name__} saves locally only; push the saved folder instead")
        files = super().save_pretrained(save_directory, **kwargs)  # type: ignore[misc]
        # the tokenizer recorded this subclass's name as its processor_class while saving
        standardize_saved_processor(save_directory, self.STANDARD)
        return files


class ImageOnlyQwen2VLProcessor(_SavesAsStandard, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video processor (works without torchvision); saves as the standard one."""

    STANDARD = "Qwen2VLProcessor"

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        _init_image_only(self, image_processor, tokenizer, chat_template)


class ImageOnlyQwen2_5_VLProcessor(_SavesAsStandard, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor (works without torchvision); saves as the standard one."""

    STANDARD = "Qwen2_5_VLProcessor"

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        _init_image_only(self, image_processor, tokenizer, chat_template)


def tiny_image_processor(size: TinySize) -> Qwen2VLImageProcessorPil:
    """Keeps a ``size.image_size`` square image at its size: ``(image/patch)^2`` patches, merged 2x2."""
    pixels = size.image_size * size.image_size
    return Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=size.patch,
                                    merge_size=2, temporal_patch_size=2)


def tiny_text_config(size: TinySize, tokenizer: Any) -> dict[str, Any]:
    head_dim = size.hidden // size.heads
    half = head_dim // 2  # M-RoPE splits the rotary half-dimension over (time, height, width)
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return dict(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.mlp,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": section},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def token_ids(tokenizer: Any) -> dict[str, int]:
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return ids


def split_packed_patches(activation: Tensor, batch: Mapping[str, Tensor]) -> list[Tensor]:
    """Qwen's vision tower runs on one packed ``[sum_i t*h*w, d]`` patch sequence: split it by ``image_grid_thw``."""
    rows = activation.reshape(-1, activation.shape[-1])  # [n_patches_total, d_mlp]
    sizes = batch["image_grid_thw"].prod(dim=-1).tolist()
    if sum(sizes) != rows.shape[0]:
        raise ValueError(f"image_grid_thw accounts for {sum(sizes)} patches, activation has {rows.shape[0]}")
    return list(rows.split(sizes))


def rope_position_ids(model: Any, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Qwen-VL's 3D rotary positions of a multimodal batch, as its forward would compute them (``get_rope_index``).

    Text-only batches get nothing: the model's own 1D positions are already cheap.
    """
    if "image_grid_thw" not in batch or "mm_token_type_ids" not in batch:
        return {}
    inner = getattr(model, "module", model).model
    position_ids, _ = inner.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                           image_grid_thw=batch["image_grid_thw"],
                                           attention_mask=batch["attention_mask"])
    return {"position_ids": position_ids}
