"""Request images: what is accepted, how rejections read, what submit stores, how resolution matches pixels."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from mip_core.errors import InputError
from mip_core.service import images
from mip_core.service.images import (
    MAX_IMAGE_PIXELS,
    check_image_bytes,
    ingest_images,
    is_file_ref,
    pixel_digest,
    read_image_ref,
)
from mip_core.service.requests import ForgetRequest
from mip_core.service.resolve import resolve_requests
from mip_core.service.store import ServiceStore

FIELD = "items[2].image"
GOOD = {"target_model": "demo", "requester": "dpo@example.org", "reason": "privacy"}


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _picture(w: int = 20, h: int = 12) -> Image.Image:
    img = Image.new("RGB", (w, h), (200, 30, 40))
    img.putpixel((3, 4), (0, 255, 0))
    return img


def _bad(data: bytes, field: str = FIELD) -> str:
    with pytest.raises(InputError) as info:
        check_image_bytes(data, field)
    message = str(info.value)
    assert message.startswith(f"{field}: ")
    return message


def _req(rid: str, **kw) -> ForgetRequest:
    return ForgetRequest.model_validate({**GOOD, "request_id": rid, **kw})


# ---- check_image_bytes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "expected"), [("PNG", "PNG"), ("JPEG", "JPEG"), ("WEBP", "WEBP")])
def test_good_images_pass(fmt, expected):
    data = _encode(_picture(), fmt)
    checked = check_image_bytes(data, FIELD)
    assert (checked.format, checked.width, checked.height, checked.nbytes) == (expected, 20, 12, len(data))
    assert checked.ext == {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    assert len(checked.pixel_sha256) == 64


def test_pixel_digest_ignores_encoding_but_not_pixels():
    img = _picture()
    rgba = img.convert("RGBA")
    assert pixel_digest(img) == pixel_digest(rgba) == check_image_bytes(_encode(rgba, "PNG"), FIELD).pixel_sha256
    other = img.copy()
    other.putpixel((0, 0), (1, 2, 3))
    assert pixel_digest(other) != pixel_digest(img)
    assert pixel_digest(img.resize((12, 20))) != pixel_digest(img)  # same bytes count, other shape


def test_truncated_png_is_corrupt():
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    message = _bad(data[: len(data) // 2])
    assert "corrupt" in message and "give a complete PNG, JPEG or WebP file" in message


def test_truncated_jpeg_is_corrupt():
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    assert "corrupt" in _bad(data[: len(data) // 2])


@pytest.mark.parametrize("data", [os.urandom(2048), b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_garbage_is_corrupt(data):
    assert "corrupt or not an image" in _bad(data)


def test_empty_file():
    assert "empty (0 bytes)" in _bad(b"")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_wrong_format_names_accepted_formats(fmt):
    message = _bad(_encode(_picture(), fmt))
    assert f"wrong format: {fmt}" in message and "accepted formats are PNG, JPEG or WebP" in message
    assert "convert it" in message


def test_too_many_pixels():
    data = _encode(Image.new("1", (5000, 5000)), "PNG")  # a few kB on disk, 25 Mpx decoded
    assert len(data) < 100_000
    message = _bad(data)
    assert "oversized" in message and "5000x5000 = 25,000,000 pixels" in message
    assert f"limit of {MAX_IMAGE_PIXELS:,} pixels" in message and "downscale" in message


def test_decompression_bomb_is_oversized(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own guard fires inside Image.open
    message = _bad(_encode(_picture(), "PNG"))
    assert "oversized" in message and "safety limit" in message


def test_too_many_bytes_by_env_and_constant(monkeypatch):
    data = _encode(_picture(), "PNG")
    monkeypatch.setenv("MIP_MAX_IMAGE_BYTES", "50")
    message = _bad(data)
    assert "oversized" in message and f": {len(data):,} bytes, over the limit of 50 bytes" in message
    big = images._mib(12 << 20)
    assert big == "12.0 MiB (12,582,912 bytes)"
    monkeypatch.delenv("MIP_MAX_IMAGE_BYTES")
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 60)
    assert "limit of 60 bytes" in _bad(data)
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 10 << 20)
    monkeypatch.setenv("MIP_MAX_IMAGE_BYTES", "ten")
    with pytest.raises(ValueError, match="MIP_MAX_IMAGE_BYTES"):
        check_image_bytes(data, FIELD)


# ---- file refs -------------------------------------------------------------------------------------------------


def test_is_file_ref(tmp_path):
    (tmp_path / "me.png").write_bytes(b"x")
    assert is_file_ref("s3://bucket/me.png", None) and is_file_ref("file:///x/me.png", None)
    assert is_file_ref(str(tmp_path / "missing.png"), None)  # absolute: a file, even a missing one
    assert is_file_ref("me.png", str(tmp_path))
    assert not is_file_ref("images/p0003.png", str(tmp_path))  # a dataset image name
    assert not is_file_ref("me.png", str(tmp_path / "elsewhere"))


def test_read_missing_file_names_field_and_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError) as info:
        read_image_ref(str(missing), "items[0].image")
    message = str(info.value)
    assert message.startswith("items[0].image: cannot read image") and str(missing) in message
    assert "no such file" in message and "images/p0003.png" in message and "s3:// URI" in message
    with pytest.raises(InputError, match="directory"):
        read_image_ref(str(tmp_path), "items[0].image")


def test_read_relative_and_oversized_without_download(tmp_path, monkeypatch):
    data = _encode(_picture(), "PNG")
    (tmp_path / "me.png").write_bytes(data)
    assert read_image_ref("me.png", FIELD, base_dir=str(tmp_path)) == data
    assert read_image_ref(f"file://{tmp_path / 'me.png'}", FIELD) == data
    monkeypatch.setenv("MIP_MAX_IMAGE_BYTES", "10")
    with pytest.raises(InputError, match=r"^items\[2\]\.image: the image is oversized"):
        read_image_ref("me.png", FIELD, base_dir=str(tmp_path))


# ---- submit --------------------------------------------------------------------------------------------------


def test_submit_with_bad_images_lists_all_and_writes_nothing(tmp_path):
    (tmp_path / "anim.gif").write_bytes(_encode(_picture(), "GIF"))
    (tmp_path / "good.png").write_bytes(_encode(_picture(), "PNG"))
    store = ServiceStore(str(tmp_path / "root"))
    req = _req("bad-imgs", items=[{"question": "Q1?", "image": "anim.gif"},
                                  {"question": "Q2?", "image": "good.png"},
                                  {"question": "Q3?", "image": str(tmp_path / "gone.png")},
                                  {"question": "Q4?", "image": "images/p0003.png"}])
    with pytest.raises(InputError) as info:
        store.submit(req, base_dir=str(tmp_path))
    message = str(info.value)
    assert "(2 problems)" in message and "nothing was queued" in message
    assert "\n  items[0].image: the image is in a wrong format: GIF" in message
    assert f"\n  items[2].image: cannot read image '{tmp_path / 'gone.png'}'" in message
    assert "items[1]" not in message and "items[3]" not in message
    assert store.list() == [] and not (tmp_path / "root" / "uploads").exists()


def test_submit_copies_good_image_into_store(tmp_path):
    data = _encode(_picture(), "JPEG")
    (tmp_path / "req").mkdir()
    (tmp_path / "req" / "face.jpeg").write_bytes(data)
    store = ServiceStore(str(tmp_path / "root"))
    req = _req("with-img", items=[{"question": "Q?", "image": "images/p0003.png"},
                                  {"question": "Q?", "image": "face.jpeg"}])
    record = store.submit(req, base_dir=str(tmp_path / "req"))
    stored = store.uri("uploads/with-img/item-1.jpg")
    assert Path(stored).read_bytes() == data
    assert [it.image for it in record.request.items] == ["images/p0003.png", stored]
    assert store.get("with-img").request.items[1].image == stored
    assert req.items[1].image == "face.jpeg"  # the caller's request is not mutated


def test_ingest_leaves_name_only_requests_alone(tmp_path):
    store = ServiceStore(str(tmp_path / "root"))
    req = _req("names", subjects=["p0001"], items=[{"question": "Q?", "image": "images/p0003.png"}])
    assert ingest_images(store, req, str(tmp_path)) is req
    assert not (tmp_path / "root" / "uploads").exists()


# ---- resolution by pixels ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from mip_core.benchmark import load_benchmark, make_benchmark

    out = tmp_path_factory.mktemp("svc-img") / "bench"
    make_benchmark(out, 6, 0, image_size=16, n_utility=4)
    return load_benchmark(out)


def _shared_mm(bench):
    mm = next(it for it in bench.items if it.kind == "qa" and it.modality == "multimodal" and it.fact == "name")
    shared = [it for it in bench.items if it.kind == "qa" and it.question == mm.question]
    assert len(shared) > 1  # the premise: the question alone is ambiguous
    return mm


def test_renamed_copy_of_dataset_image_resolves(bench, tmp_path):
    mm = _shared_mm(bench)
    copy = tmp_path / "upload-7f3a.png"
    shutil.copyfile(bench.root / mm.image, copy)
    resaved = tmp_path / "resaved.webp"
    bench.load_image(mm).save(resaved, format="WEBP", lossless=True)  # other format, same pixels
    out = resolve_requests([_req("amb", items=[{"question": mm.question}]),
                            _req("copy", items=[{"question": mm.question, "image": str(copy)}]),
                            _req("resaved", items=[{"question": mm.question, "image": f"file://{resaved}"}])],
                           bench)
    assert "add `image` or `answer`" in out.rejected["amb"]
    assert out.accepted == ("copy", "resaved")
    assert out.items_of["copy"] == out.items_of["resaved"] == (mm.item_id,)


def test_image_of_no_dataset_item_is_rejected(bench, tmp_path):
    mm = _shared_mm(bench)
    stranger = tmp_path / "stranger.png"
    _picture(16, 16).save(stranger)
    out = resolve_requests([_req("s", items=[{"question": mm.question, "image": str(stranger)}])], bench)
    assert "no item asks" in out.rejected["s"]


def test_corrupt_image_rejects_only_its_request(bench, tmp_path):
    mm = _shared_mm(bench)
    broken = tmp_path / "broken.png"
    data = (bench.root / mm.image).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    reads: list[str] = []

    def read(ref: str) -> bytes:
        reads.append(ref)
        return Path(ref).read_bytes()

    requests = [_req("bad", items=[{"item_id": mm.item_id},
                                   {"question": mm.question, "image": str(broken)}]),
                _req("ok", subjects=["p0001"]),
                _req("gone", items=[{"question": mm.question, "image": str(tmp_path / "gone.png")}])]
    out = resolve_requests(requests, bench, read_image=read)
    assert out.accepted == ("ok",) and set(out.rejected) == {"bad", "gone"}
    assert out.rejected["bad"].startswith("items[1].image: the image is corrupt")
    assert out.rejected["gone"].startswith("items[0].image: cannot read image")
    assert "FileNotFoundError" in out.rejected["gone"]
    assert all(it.profile_id == "p0001" for it in out.items)
    default = resolve_requests(requests[2:], bench)  # the default reader says the same, in its words
    assert "no such file" in default.rejected["gone"]


def test_unknown_image_name_is_neither_file_nor_dataset_image(bench):
    mm = _shared_mm(bench)
    out = resolve_requests([_req("n", items=[{"question": mm.question, "image": "images/p9999.png"}])], bench)
    reason = out.rejected["n"]
    assert reason.startswith("items[0].image 'images/p9999.png' is neither a readable image file nor an image "
                             "of the dataset (e.g. images/p0")
    assert "give a readable PNG/JPEG/WebP file" in reason
