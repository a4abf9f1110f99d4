"""Model I/O through a real S3 HTTP server (moto on 127.0.0.1): the production path for checkpoints."""

from __future__ import annotations

import pytest
import torch

from mip_core.errors import ModelLoadError
from mip_core.modeling import collate, encode, load_model, save_model


def test_save_and_load_through_s3(s3_endpoint, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("MIP_CACHE_DIR", str(tmp_path / "cache"))
    model, processor = tiny_models["qwen2_vl"]
    uri = s3_endpoint.uri("models", "tiny-qwen2-vl")
    save_model(model, processor, uri)
    keys = {k.rsplit("/", 1)[-1] for k in s3_endpoint.fs.find(uri.removeprefix("s3://"))}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= keys

    loaded = load_model(uri)  # endpoint from MIP_S3_ENDPOINT_URL, set by the fixture
    batch = collate([encode(processor, "Where was Anna Lee born?", None, "Lisbon")], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded.model(**batch).logits)
    assert loaded.path.startswith(str(tmp_path / "cache"))

    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(s3_endpoint.uri("models", "missing"))
