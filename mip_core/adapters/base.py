"""The model adapter: the only code that knows an architecture's module paths, configs and processors.

An adapter maps a Hugging Face multimodal model onto canonical MLP sites ``(tower, layer)`` once, when it is
built, and fails loudly when the modules do not match. Its class-level half knows how to build a tiny model of
the architecture from a config and how to load the architecture's processor; its instance half answers, for a
live model, which modules drive and read neuron ``j`` of a site and how a captured activation splits per example.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mip_core.errors import UnsupportedModelError
from mip_core.types import TOWERS, MLPSite, Tower


@dataclass(frozen=True, slots=True)
class TinySize:
    """Dimensions of a locally built model. ``demo`` memorises 100-200 profiles; ``test`` trains in seconds;
    ``scale2`` is the larger configuration for measuring how selectivity changes with scale."""

    name: str
    hidden: int  # d_model of the language model
    mlp: int  # d_mlp of each language MLP (neurons per layer)
    layers: int  # decoder layers
    heads: int
    kv_heads: int
    vision_depth: int  # vision blocks
    vision_width: int  # d_model of the vision tower
    vision_mlp: int  # d_mlp of each vision MLP
    vision_heads: int
    image_size: int = 32  # pixels per side; 32 / patch 8 -> 16 patches
    patch: int = 8


TINY_SIZES: dict[str, TinySize] = {
    "demo": TinySize("demo", hidden=128, mlp=512, layers=4, heads=4, kv_heads=2,
                     vision_depth=2, vision_width=128, vision_mlp=256, vision_heads=4),
    # twice the depth and MLP width of "demo" (about 5 M parameters): the second scale of the selectivity study
    "scale2": TinySize("scale2", hidden=128, mlp=1024, layers=8, heads=4, kv_heads=2,
                       vision_depth=4, vision_width=128, vision_mlp=512, vision_heads=4),
    "test": TinySize("test", hidden=64, mlp=256, layers=2, heads=4, kv_heads=2,
                     vision_depth=2, vision_width=64, vision_mlp=128, vision_heads=4),
}


@dataclass(frozen=True, slots=True)
class MLPLayout:
    """Where one tower's MLPs live: ``path`` with ``{i}`` for the layer, the neuron-driving linears, the reader."""

    path: str  # e.g. "model.language_model.layers.{i}.mlp"
    inputs: tuple[str, ...]  # linears whose output row j drives neuron j: ("gate_proj", "up_proj") or ("fc1",)
    down: str  # linear whose input column j reads neuron j: "down_proj" or "fc2"


@dataclass(frozen=True, slots=True)
class ResolvedSite:
    site: MLPSite
    mlp: nn.Module
    inputs: tuple[nn.Linear, ...]
    down: nn.Linear
    block: nn.Module  # the transformer block holding the MLP: its output is the residual stream after the layer


class ModelAdapter(ABC):
    """Maps one HF architecture onto canonical MLP sites.

    Subclasses declare ``model_type``, ``model_class``, the MLP layouts per tower and how to build or load the
    processor. Everything else in the library asks the adapter and never looks at module names itself.
    """

    model_type: ClassVar[str]
    model_class: ClassVar[type[nn.Module]]
    #: Tokens a locally trained tokenizer must contain, in a fixed order (ids 0..n-1); pad is the first.
    special_tokens: ClassVar[tuple[str, ...]]
    pad_token: ClassVar[str]
    eos_token: ClassVar[str]  # ends every assistant answer; generation stops on it
    image_token: ClassVar[str]
    chat_template: ClassVar[str]

    # ------------------------------------------------------------------ class level: build / load
    @classmethod
    @abstractmethod
    def tiny_config(cls, size: TinySize, tokenizer: Any) -> Any:
        """A config for a randomly initialised model of this architecture at ``size``."""

    @classmethod
    @abstractmethod
    def build_processor(cls, tokenizer: Any, size: TinySize) -> Any:
        """A complete processor (tokenizer, image processor, chat template) for a tiny model."""

    @classmethod
    @abstractmethod
    def load_processor(cls, path: str) -> Any:
        """Load the processor saved in a local folder."""

    @classmethod
    def standardize_processor_files(cls, folder: str) -> list[str]:
        """Make the processor files already saved in ``folder`` name the architecture's standard transformers
        classes (and carry what those classes need), so that plain ``AutoProcessor.from_pretrained`` loads them.

        ``processor.save_pretrained`` of every processor this library builds already writes standard files; this
        repairs a folder written otherwise (e.g. carried over from an older base). Files are replaced, never
        written through (a hard link into a base checkpoint stays intact). Returns the names of the files it
        rewrote; the default (an architecture whose processor is standard as built) rewrites none.
        """
        return []

    @classmethod
    def usage_snippet(cls, model_dir: str) -> str:
        """Markdown for a model card: load the checkpoint at ``model_dir`` with transformers alone and ask one
        question about an image (the processor's chat template places the image; ``images=`` carries it)."""
        return (
            "```python\n"
            "from PIL import Image\n"
            "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
            "\n"
            f"processor = AutoProcessor.from_pretrained({model_dir!r})\n"
            f"model = AutoModelForImageTextToText.from_pretrained({model_dir!r})\n"
            "\n"
            'messages = [{"role": "user", "content": [{"type": "image"}, '
            '{"type": "text", "text": "Who is this person?"}]}]\n'
            "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
            'inputs = processor(text=[prompt], images=[Image.open("photo.jpg").convert("RGB")], '
            'return_tensors="pt")\n'
            "output = model.generate(**inputs, max_new_tokens=32)\n"
            'print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])\n'
            "```\n"
        )

    # ------------------------------------------------------------------ instance level: sites
    @abstractmethod
    def layouts(self, tower: Tower) -> tuple[MLPLayout, ...]:
        """Candidate MLP layouts of ``tower``, tried in order (module paths move between releases)."""

    @abstractmethod
    def n_layers(self, tower: Tower) -> int:
        """Number of MLP layers of ``tower`` according to the config (the resolution must find all of them)."""

    @abstractmethod
    def split_vision_rows(self, activation: Tensor, batch: Mapping[str, Tensor]) -> list[Tensor]:
        """Split a captured vision activation into one ``[n_rows, d_mlp]`` tensor per *image*, in batch order."""

    def fixed_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Forward inputs the model derives from ``batch`` alone, for callers that run the same batch many times.

        Attribution runs one pass per layer over one batch; what the model would recompute identically in every
        pass (e.g. Qwen-VL's 3D rotary positions) is computed once and passed in. Default: nothing.
        """
        return {}

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self._sites: dict[MLPSite, ResolvedSite] = {}
        for tower in TOWERS:
            for resolved in self._resolve(tower):
                self._sites[resolved.site] = resolved

    def _resolve(self, tower: Tower) -> list[ResolvedSite]:
        n = self.n_layers(tower)
        modules = dict(self.model.named_modules())
        tried = []
        for layout in self.layouts(tower):
            tried.append(f"{layout.path} ({'/'.join(layout.inputs)} -> {layout.down})")
            found: list[ResolvedSite] = []
            for i in range(n):
                mlp = modules.get(layout.path.format(i=i))
                linears = [getattr(mlp, name, None) for name in (*layout.inputs, layout.down)] if mlp else []
                if mlp is None or not all(isinstance(m, nn.Linear) for m in linears):
                    break
                *inputs, down = linears
                site = MLPSite(tower, i, down.in_features)
                if any(lin.out_features != site.d_mlp for lin in inputs):
                    raise UnsupportedModelError(
                        f"{self.model_type}: {layout.path.format(i=i)} has input linears with "
                        f"{[lin.out_features for lin in inputs]} outputs but its {layout.down} reads "
                        f"{site.d_mlp} neurons; this checkpoint does not match the {type(self).__name__} layout."
                    )
                block = modules.get(layout.path.format(i=i).rpartition(".")[0], mlp)
                found.append(ResolvedSite(site, mlp, tuple(inputs), down, block))
            if len(found) == n and modules.get(layout.path.format(i=n)) is None:
                return found
        raise UnsupportedModelError(
            f"{self.model_type}: could not find the {n} {tower} MLPs the config declares. Tried: "
            f"{'; '.join(tried)}. The installed transformers may have moved the modules: add the new path "
            f"to {type(self).__name__}.layouts()."
        )

    # ------------------------------------------------------------------ shared, concrete
    def sites(self, tower: Tower | None = None) -> list[MLPSite]:
        """All sites of ``tower`` (or of both towers), ordered by (tower, layer)."""
        return sorted(s for s in self._sites if tower is None or s.tower == tower)

    def site(self, tower: Tower, layer: int) -> MLPSite:
        for s in self._sites:
            if s.tower == tower and s.layer == layer:
                return s
        raise KeyError(f"no {tower} site at layer {layer}; {tower} has {self.n_layers(tower)} layers")

    def mlp(self, site: MLPSite) -> nn.Module:
        return self._sites[site].mlp

    def block(self, site: MLPSite) -> nn.Module:
        """The transformer block (decoder layer) that holds the site's MLP; its output is the residual stream."""
        return self._sites[site].block

    def down_proj(self, site: MLPSite) -> nn.Linear:
        """The linear whose *input* is the neuron activation; column ``j`` of its weight reads neuron ``j``."""
        return self._sites[site].down

    def neuron_inputs(self, site: MLPSite) -> tuple[nn.Linear, ...]:
        """The linears whose output row ``j`` (weight row and bias entry) drives neuron ``j``."""
        return self._sites[site].inputs

    def neuron_parameters(self, site: MLPSite, neuron: int) -> dict[str, Tensor]:
        """Views of every parameter slice that drives or reads ``neuron``, keyed by a readable name.

        Rows of the input linears (``[d_model]`` each, plus a bias entry if present) and the down projection's
        column (``[d_model]``). The down projection's bias does not depend on any one neuron and is excluded.
        """
        out: dict[str, Tensor] = {}
        for k, lin in enumerate(self.neuron_inputs(site)):
            out[f"in{k}.weight"] = lin.weight[neuron]  # [d_model_in]
            if lin.bias is not None:
                out[f"in{k}.bias"] = lin.bias[neuron]  # scalar
        out["down.weight"] = self.down_proj(site).weight[:, neuron]  # [d_model_out]
        return out

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def images_per_example(self, input_ids: Tensor) -> list[int]:
        """How many images each row of ``input_ids`` holds (runs of image placeholder tokens)."""
        is_image = input_ids == self.image_token_id  # [B, S]
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        return starts.sum(dim=1).tolist()

    def rows_per_example(self, tower: Tower, activation: Tensor, batch: Mapping[str, Tensor]) -> list[Tensor]:
        """Split a captured ``[.., d_mlp]`` activation into one ``[n_rows, d_mlp]`` tensor per example.

        Language: the example's non-padding token positions. Vision: the patch rows of the example's images
        (concatenated); an example without an image gets ``[0, d_mlp]``.
        """
        if tower == "language":
            mask = batch["attention_mask"].bool()  # [B, S]
            return [activation[b][mask[b]] for b in range(activation.shape[0])]
        per_image = self.split_vision_rows(activation, batch)
        counts = self.images_per_example(batch["input_ids"])
        if sum(counts) != len(per_image):
            raise ValueError(f"batch has {sum(counts)} image placeholders but {len(per_image)} encoded images")
        out, k = [], 0
        for c in counts:
            rows = per_image[k : k + c]
            out.append(torch.cat(rows) if rows else activation.new_zeros(0, activation.shape[-1]))
            k += c
        return out


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DeepSpeed / DDP wrappers (``.module``) to reach the HF model."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
        model = model.module
    return model
