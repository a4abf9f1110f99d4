"""``load_model``'s dtype and placement: the checkpoint's stored dtype by default, float32 when none is recorded,
a device map over listed devices that refuses to offload. Dtypes and devices are read off the loaded parameters.
"""

from __future__ import annotations

import json

import pytest
import torch

from mip_core.errors import InputError, ModelLoadError
from mip_core.modeling import load_model, save_model
from mip_core.modeling.io import resolve_dtype, stored_dtype


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    """A tiny float32 Qwen2.5-VL folder and a bf16 copy of it."""
    model, processor = tiny_models["qwen2_5_vl"]
    root = tmp_path_factory.mktemp("dtype")
    save_model(model, processor, str(root / "fp32"))
    bf16 = type(model)(model.config).to(torch.bfloat16)  # a copy: the session model stays float32
    bf16.load_state_dict(model.state_dict())
    bf16.config.dtype = torch.bfloat16
    save_model(bf16, processor, str(root / "bf16"))
    return root


def dtypes(loaded) -> set[torch.dtype]:
    return {p.dtype for p in loaded.model.parameters()}


@pytest.mark.parametrize(("config", "expected"), [
    ({"dtype": "bfloat16"}, torch.bfloat16),
    ({"torch_dtype": "float16"}, torch.float16),  # written before transformers 5
    ({"text_config": {"torch_dtype": "bfloat16"}}, torch.bfloat16),
    ({"dtype": "torch.float32"}, torch.float32),
    ({}, torch.float32),  # nothing recorded: float32, whatever the tensors are
])  # fmt: skip
def test_stored_dtype_reads_the_config(config, expected):
    assert stored_dtype(config) is expected


def test_dtype_arguments_resolve_or_are_named():
    config = {"dtype": "bfloat16"}
    assert resolve_dtype("auto", config) is torch.bfloat16 and resolve_dtype(None, config) is torch.bfloat16
    assert resolve_dtype("float16", config) is torch.float16 and resolve_dtype(torch.float32, config) is torch.float32
    with pytest.raises(InputError, match="dtype must be 'auto', one of float32, bfloat16, float16"):
        resolve_dtype("bf16", config)
    with pytest.raises(ModelLoadError, match="'int8'"):
        stored_dtype({"dtype": "int8"})


def test_load_keeps_the_stored_dtype_unless_told(saved):
    assert dtypes(load_model(str(saved / "fp32"))) == {torch.float32}  # the tiny demo models stay float32
    assert json.loads((saved / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    bf16 = load_model(str(saved / "bf16"))
    assert dtypes(bf16) == {torch.bfloat16}
    assert dtypes(load_model(str(saved / "bf16"), dtype="float32")) == {torch.float32}
    assert dtypes(load_model(str(saved / "fp32"), dtype=torch.bfloat16, device="cpu")) == {torch.bfloat16}
    fp32 = load_model(str(saved / "fp32")).model.state_dict()
    assert all(torch.equal(v, fp32[k].to(torch.bfloat16)) for k, v in bf16.model.state_dict().items())


def test_a_device_map_places_over_the_listed_devices_and_never_offloads(saved):
    loaded = load_model(str(saved / "bf16"), device_map="auto", max_memory={"cpu": "1GiB"})
    assert {str(p.device) for p in loaded.model.parameters()} == {"cpu"} and dtypes(loaded) == {torch.bfloat16}
    with pytest.raises(ModelLoadError, match=r"does not fit in max_memory=\{'cpu': 100000\}: weights were placed on "
                                             r"disk\. Give the stage more devices \(gpus_per_actor\)"):
        load_model(str(saved / "bf16"), device_map="auto", max_memory={"cpu": 100_000})
    with pytest.raises(InputError, match="max_memory only applies with a device_map"):
        load_model(str(saved / "bf16"), max_memory={"cpu": "1GiB"})
