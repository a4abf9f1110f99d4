"""GPU checks: skipped with a reason where CUDA is absent (the default CI machine has none)."""

from __future__ import annotations

import copy

import pytest
import torch

from mip_core.adapters import get_adapter
from mip_core.attribution import AttributionConfig, path_search
from mip_core.modeling import encode

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava"])
def test_path_search_on_cuda_matches_cpu(arch, tiny_models):
    model, processor = tiny_models[arch]
    examples = [encode(processor, "Where was Anna Lee born?", None, "Lisbon"),
                encode(processor, "What does she do?", None, "engineer")]
    cfg = AttributionConfig(steps=4, top_k=3)
    pad = processor.tokenizer.pad_token_id
    cpu = path_search(model, get_adapter(model), examples, "language", cfg, pad_token_id=pad)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = path_search(gpu_model, get_adapter(gpu_model), examples, "language", cfg, pad_token_id=pad)
    for a, b in zip(cpu, gpu):
        assert [n.neuron for n in a] == [n.neuron for n in b]
        assert [n.score for n in a] == pytest.approx([n.score for n in b], rel=1e-3, abs=1e-5)


@pytest.mark.gpu
@requires_gpu
def test_path_edit_on_cuda_matches_cpu(tiny_models):
    from mip_core.editing.base import UnlearnData
    from mip_core.editing.methods import EditConfig, path_edit
    from mip_core.editing.rmisu import RMisUConfig

    model, processor = tiny_models["qwen2_5_vl"]
    forget = [encode(processor, "Where was Anna Lee born?", None, "Lisbon")]
    retain = [encode(processor, "What does she do?", None, "engineer")]
    data = UnlearnData(forget, retain, processor.tokenizer.pad_token_id)
    cfg = EditConfig(rmisu=RMisUConfig(layer=1, steps=5, batch_size=2, retain_ce_weight=0.0))
    results = []
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        adapter = get_adapter(m)
        sel = {adapter.site("language", 0): [1, 5, 9]}
        path_edit(m, adapter, data, sel, cfg, method="mip", log=lambda _: None)
        results.append(adapter.down_proj(adapter.site("language", 0)).weight.detach().cpu())
    assert torch.allclose(results[0], results[1], rtol=1e-3, atol=1e-4)
