"""``load_model`` reads a bf16 checkpoint in bf16, in memory proportional to the checkpoint, never via float32.

A random ~92 M-parameter Qwen2.5-VL is saved in bf16 as sharded safetensors (184 MB). A subprocess loads it and
reports measured facts: every parameter's dtype, and the peak resident-set growth (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``, minus ``VmRSS`` at the reset) while loading and reading every weight. The
bound, 1.5x the checkpoint's bytes + 64 MiB, is below what a float32 copy costs (2x the bytes on its own); the
same subprocess loads the checkpoint again with ``dtype="float32"`` to show that the bound separates the two.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from mip_core.adapters import TinySize, adapter_class
from mip_core.modeling.tokenizer import train_tokenizer

ARCH = "qwen2_5_vl"
BIG = TinySize("mem", hidden=1024, mlp=4096, layers=6, heads=8, kv_heads=2, vision_depth=1, vision_width=64,
               vision_mlp=128, vision_heads=4)
SMALL = TinySize("warm", hidden=64, mlp=128, layers=1, heads=4, kv_heads=2, vision_depth=1, vision_width=64,
                 vision_mlp=128, vision_heads=4)
ALLOWANCE = 64 * 2**20

PROBE = textwrap.dedent("""
    import gc, json, sys
    import torch
    from mip_core.modeling import load_model

    torch.set_num_threads(1)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def measure(folder, dtype):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS now
        base = status("VmRSS")
        model = load_model(folder, dtype=dtype).model
        # reads every weight
        sums = {n: float(p.detach().sum(dtype=torch.float32)) for n, p in model.named_parameters()}
        out = {"growth": status("VmHWM") - base, "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
               "sums": sums}
        del model
        return out

    load_model(sys.argv[1])  # imports and lazy initialisation, outside the measured window
    print(json.dumps({"auto": measure(sys.argv[2], "auto"), "float32": measure(sys.argv[2], "float32")}))
""")


def save_random_bf16(size: TinySize, folder: Path, tokenizer: object) -> dict[str, float]:
    """A random ``size`` model saved in bf16 in 40 MB shards; returns each parameter's float32 sum."""
    cls = adapter_class(ARCH)
    with torch.device("meta"):
        model = cls.model_class(cls.tiny_config(size, tokenizer))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(folder, max_shard_size="40MB")
    cls.build_processor(tokenizer, size).save_pretrained(folder)
    return {n: float(p.detach().sum(dtype=torch.float32)) for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict[str, Any]:
    """The warm-up and the big bf16 checkpoints, the big one's parameter sums and its bytes on disk."""
    root = tmp_path_factory.mktemp("bf16")
    cls = adapter_class(ARCH)
    tokenizer = train_tokenizer(["what is this", "a red square"] * 4, cls.special_tokens, pad_token=cls.pad_token,
                                eos_token=cls.eos_token, image_token=cls.image_token)
    save_random_bf16(SMALL, root / "warm", tokenizer)
    sums = save_random_bf16(BIG, root / "big", tokenizer)
    shards = sorted((root / "big").glob("model-*.safetensors"))
    assert len(shards) > 1  # really sharded
    return {"warm": root / "warm", "big": root / "big", "sums": sums,
            "bytes": sum(f.stat().st_size for f in shards)}


@pytest.mark.slow
def test_a_bf16_checkpoint_loads_in_bf16_without_a_float32_copy(checkpoint):
    assert checkpoint["bytes"] > 150 * 2**20  # large enough that a float32 copy cannot hide in the allowance
    run = subprocess.run([sys.executable, "-c", PROBE, str(checkpoint["warm"]), str(checkpoint["big"])],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.strip().splitlines()[-1])

    auto, fp32 = facts["auto"], facts["float32"]
    bound = 1.5 * checkpoint["bytes"] + ALLOWANCE
    assert auto["dtypes"] == ["torch.bfloat16"]
    assert auto["growth"] < bound, (auto["growth"] / 2**20, bound / 2**20)
    assert auto["sums"] == checkpoint["sums"]  # the weights that were saved, read bit for bit
    assert fp32["dtypes"] == ["torch.float32"]
    assert fp32["growth"] > bound, (fp32["growth"] / 2**20, bound / 2**20)  # the bound would catch a copy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_gpus_weights_load_straight_there_and_the_pass_size_follows_memory(checkpoint):
    from mip_core.attribution import AttributionConfig
    from mip_core.modeling import load_model
    from tasks.actors import _fitting_batch_items, load_on_gpus

    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loaded = load_model(str(checkpoint["big"]), device="cuda")
    peak = torch.cuda.max_memory_allocated() - before
    assert {(p.dtype, p.device.type) for p in loaded.model.parameters()} == {(torch.bfloat16, "cuda")}
    assert peak < 1.1 * checkpoint["bytes"] + 16 * 2**20, peak  # one bf16 copy on the GPU, nothing more
    del loaded
    spread = load_on_gpus(str(checkpoint["big"]), "auto")  # every visible GPU, as an actor does
    devices = {p.device.index for p in spread.model.parameters()}
    assert {p.dtype for p in spread.model.parameters()} == {torch.bfloat16}
    assert devices <= set(range(torch.cuda.device_count())) and None not in devices
    assert 1 <= _fitting_batch_items(spread, AttributionConfig(batch_items=64)) <= 64
