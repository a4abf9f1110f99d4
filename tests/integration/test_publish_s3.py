"""Publishing on S3 moves no tensor bytes through the worker: every shard is copied by the server.

Measured on the worker's own S3 client (botocore events of the store's s3fs client): the operation of every
request, the body size of every request it sends (its Content-Length) and the ``ContentLength`` of every object it downloads. The
moto server runs in this process, so the process's network counters would include the server's side; the
client's events count only what the worker itself sent and received.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from mip_core.modeling.shards import weight_map
from mip_core.service.store import ServiceStore

from s3_server import S3Server


class ClientTraffic:
    """Operations and body bytes of one botocore client, from its event hooks."""

    def __init__(self, client: Any) -> None:
        self.ops: list[tuple[str, str]] = []  # (operation, key)
        self.sent = 0
        self.received = 0
        client.meta.events.register("before-parameter-build.s3", self._call)
        client.meta.events.register("before-send.s3", self._send)
        client.meta.events.register("after-call.s3", self._done)

    def _call(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        self.ops.append((model.name, str(params.get("Key", ""))))

    def _send(self, request: Any, **_: Any) -> None:
        body = request.body  # bytes, or a stream whose size is the request's Content-Length
        self.sent += len(body) if isinstance(body, (bytes, bytearray)) else int(
            request.headers.get("Content-Length") or 0)

    def _done(self, model: Any, parsed: dict[str, Any], **_: Any) -> None:
        if model.name == "GetObject":
            self.received += int(parsed.get("ContentLength", 0))


def test_publish_copies_every_shard_server_side(s3_endpoint: S3Server, tiny_models, tmp_path):
    model, processor = tiny_models["qwen2_5_vl"]
    local = tmp_path / "edited"
    model.save_pretrained(local, max_shard_size="100KB")
    processor.save_pretrained(local)
    shards = sorted(set(weight_map(local).values()))
    model_bytes = sum((local / s).stat().st_size for s in shards)
    store = ServiceStore(s3_endpoint.uri("publish"), endpoint_url=s3_endpoint.endpoint_url)
    edited = store.uri("batches/b1/edited")
    store.fs.put(f"{local}/", edited.removeprefix("s3://") + "/", recursive=True)  # what the edit job wrote

    store.fs.connect()
    traffic = ClientTraffic(store.fs.s3)
    version = store.register_model("demo", edited, dataset_uri="bench://x", lineage={"batch_id": "b1"})

    ops = Counter(op for op, _ in traffic.ops)
    copied = {key.rsplit("/", 1)[-1] for op, key in traffic.ops if op == "CopyObject"}
    assert set(shards) <= copied, (shards, ops)  # the hooks saw every shard's copy: they were live
    assert not [k for op, k in traffic.ops if op in ("GetObject", "PutObject", "UploadPart") and k.endswith(
        ".safetensors")], traffic.ops
    assert traffic.received < 16_384 < model_bytes, traffic.received  # config.json, read for the card's usage
    assert 0 < traffic.sent < 16_384 < model_bytes, (traffic.sent, model_bytes)  # lineage.json, card, CURRENT.json
    for s in shards:  # the published objects are the batch's
        assert store.read_bytes(f"models/demo/{version}/{s}") == (local / s).read_bytes()
