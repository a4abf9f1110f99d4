"""A hand-weighted toy VLM and its adapter, so unit tests run the production, adapter-based code path.

``ToyVLM`` has the structure the attribution code relies on, at a size that can be worked out on paper:

- vision: ``pixel_values`` ``[n_images, P, 3]`` (patch features, ``P = 2``), two residual blocks
  ``v <- v + fc2(relu(fc1(v)))`` with 3 neurons each; an image's feature is ``projector(mean_p v)``, written
  over the embedding of its single image token (id ``IMAGE``);
- language: token embeddings (``d_model = 4``), two blocks ``h <- c + down(silu(gate(c)) * up(c))`` with 3
  neurons each, where ``c_t`` is the (attention-masked) mean of ``h_1..h_t``, a causal stand-in for attention;
- a linear head to 6 logits.

``ToyAdapter`` is constructed directly by tests (it is not in ``ADAPTERS``). Vision activations are laid out
``[n_images, P, d_mlp]`` like LLaVA's, so ``rows_per_example`` needs nothing special.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mip_core.adapters.base import MLPLayout, ModelAdapter, TinySize
from mip_core.modeling.inputs import IGNORE_INDEX
from mip_core.types import Tower

PAD, IMAGE = 0, 5
VOCAB, D_MODEL, D_MLP, D_VISION, N_PATCHES = 6, 4, 3, 3, 2

# Hand-set weights: small, distinct values so that neurons get distinct, non-trivial scores.
EMBED = [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, -0.5], [0.0, 0.0, 1.0, 0.5],
         [0.5, 0.5, -0.5, 0.0], [0.0, 0.0, 0.0, 1.0]]
LANGUAGE = [  # per layer: gate [3x4], up [3x4], down [4x3]
    dict(gate=[[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, -0.5], [0.5, 0.5, 1.0, 0.0]],
         up=[[0.5, 0.0, 0.0, 1.0], [1.0, -0.5, 0.0, 0.0], [0.0, 0.5, 1.0, 0.5]],
         down=[[1.0, 0.0, -0.5], [0.0, 1.0, 0.5], [0.5, -1.0, 1.0], [0.0, 0.5, 0.0]]),
    dict(gate=[[0.0, 1.0, 0.0, 0.5], [1.0, 0.0, -0.5, 0.0], [0.5, 0.0, 0.5, 1.0]],
         up=[[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, -0.5], [0.5, 1.0, 0.0, 0.5]],
         down=[[0.5, -1.0, 0.0], [1.0, 0.0, 0.5], [0.0, 0.5, -1.0], [-0.5, 0.0, 1.0]]),
]
VISION = [  # per layer: fc1 [3x3] + bias [3], fc2 [3x3] + bias [3]
    dict(fc1=[[1.0, 0.0, 0.5], [0.0, 1.0, -0.5], [0.5, 0.5, 0.0]], b1=[0.1, 0.2, 0.0],
         fc2=[[0.5, 0.0, -1.0], [0.0, 1.0, 0.5], [-0.5, 0.5, 0.0]], b2=[0.0, 0.1, 0.0]),
    dict(fc1=[[0.0, 1.0, 0.5], [1.0, -0.5, 0.0], [0.5, 0.0, 1.0]], b1=[0.0, 0.1, 0.2],
         fc2=[[1.0, -0.5, 0.0], [0.0, 0.5, 1.0], [0.5, 0.0, -1.0]], b2=[0.1, 0.0, 0.0]),
]
PROJECTOR = [[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0], [0.0, -0.5, 0.5]]  # [d_model x d_vision]
HEAD = [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.5], [0.5, 0.0, 1.0, -0.5],
        [0.0, 0.5, -0.5, 1.0], [-1.0, 0.0, 0.0, 0.0]]  # [vocab x d_model]


def _set(linear: nn.Linear, weight: Sequence[Sequence[float]], bias: Sequence[float] | None = None) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight))
        if bias is not None:
            linear.bias.copy_(torch.tensor(bias))


class GatedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(D_MODEL, D_MLP, bias=False)
        self.up_proj = nn.Linear(D_MODEL, D_MLP, bias=False)
        self.down_proj = nn.Linear(D_MLP, D_MODEL, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FcMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_VISION, D_MLP)
        self.fc2 = nn.Linear(D_MLP, D_VISION)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Block(nn.Module):
    """A residual block ``x + mlp(x)``: its output is the residual stream after the layer (``adapter.block``)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(x)


class ToyVLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="toy", image_token_id=IMAGE, n_language=2, n_vision=2)
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.vision = nn.ModuleList(Block(FcMLP()) for _ in VISION)
        self.projector = nn.Linear(D_VISION, D_MODEL, bias=False)
        self.language = nn.ModuleList(Block(GatedMLP()) for _ in LANGUAGE)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor(EMBED))
        for block, w in zip(self.vision, VISION, strict=True):
            _set(block.mlp.fc1, w["fc1"], w["b1"])
            _set(block.mlp.fc2, w["fc2"], w["b2"])
        for block, w in zip(self.language, LANGUAGE, strict=True):
            _set(block.mlp.gate_proj, w["gate"])
            _set(block.mlp.up_proj, w["up"])
            _set(block.mlp.down_proj, w["down"])
        _set(self.projector, PROJECTOR)
        _set(self.head, HEAD)
        self.eval()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, **_: Any) -> SimpleNamespace:
        mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).float()
        h = self.embed(input_ids)  # [R, S, d_model]
        if pixel_values is not None:
            v = pixel_values  # [n_images, P, d_vision]
            for block in self.vision:
                v = block(v)
            features = self.projector(v.mean(1))  # [n_images, d_model]
            is_image = (input_ids == IMAGE).unsqueeze(-1).expand_as(h)  # one image token per image, in order
            h = h.masked_scatter(is_image, features)
        weight = mask.unsqueeze(-1)  # [R, S, 1]
        count = weight.cumsum(1).clamp(min=1.0)
        for block in self.language:
            c = (h * weight).cumsum(1) / count  # causal masked mean
            h = block(c)
        return SimpleNamespace(logits=self.head(h))


class ToyAdapter(ModelAdapter):
    model_type = "toy"
    model_class = ToyVLM
    special_tokens = ()
    pad_token = eos_token = image_token = chat_template = ""

    @classmethod
    def tiny_config(cls, size: TinySize, tokenizer: Any) -> Any:
        raise NotImplementedError("the toy model is built by ToyVLM()")

    @classmethod
    def build_processor(cls, tokenizer: Any, size: TinySize) -> Any:
        raise NotImplementedError("the toy model has no processor; use toy_example()")

    @classmethod
    def load_processor(cls, path: str) -> Any:
        raise NotImplementedError("the toy model has no processor; use toy_example()")

    def layouts(self, tower: Tower) -> tuple[MLPLayout, ...]:
        if tower == "vision":
            return (MLPLayout("vision.{i}.mlp", ("fc1",), "fc2"),)
        return (MLPLayout("language.{i}.mlp", ("gate_proj", "up_proj"), "down_proj"),)

    def n_layers(self, tower: Tower) -> int:
        return int(self.config.n_vision if tower == "vision" else self.config.n_language)

    def split_vision_rows(self, activation: Tensor, batch: Mapping[str, Tensor]) -> list[Tensor]:
        return list(activation.unbind(0))  # [n_images, P, d_mlp] -> one [P, d_mlp] per image


def toy_example(tokens: Sequence[int], n_answer: int, image: Sequence[Sequence[float]] | None = None
                ) -> dict[str, Tensor]:
    """An encoded example as ``modeling.encode`` would give it: the last ``n_answer`` tokens are the answer.

    ``image`` is ``P x 3`` patch features; the tokens must then contain one ``IMAGE`` token.
    """
    input_ids = torch.tensor(list(tokens))
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    if n_answer:
        labels[-n_answer:] = input_ids[-n_answer:]
    example = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    if image is not None:
        example["pixel_values"] = torch.tensor(image).unsqueeze(0)  # [1, P, d_vision]
    return example


def toy() -> tuple[ToyVLM, ToyAdapter]:
    model = ToyVLM()
    return model, ToyAdapter(model)
