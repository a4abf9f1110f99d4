"""Images attached to forget requests: read, validate and copy into the service store at submit time.

A request's ``items[k].image`` is either a *file* (a URI, an absolute path, or a relative path that exists) or
the *name* of a dataset image (``images/p0003.png``). Files are checked before anything is queued (format,
size, decodability: a nightly batch must not discover a corrupt upload hours later) and copied into the store
(``uploads/<request_id>/item-<k>.<ext>``), so the batch reads what was validated even if the original moves.
Resolution matches a file against the dataset by decoded pixels, not by file name: a renamed copy or a
re-saved PNG of a dataset image still picks the right item.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from struct import error as struct_error  # PIL plugins raise it on some truncated headers
from typing import Protocol

from PIL import Image, UnidentifiedImageError

from mip_core.errors import InputError
from mip_core.storage import filesystem

from .requests import ID_PATTERN, ID_RULE, ForgetRequest


FORMATS: dict[str, str] = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
"""Accepted PIL formats -> the extension an upload is stored under."""
FORMAT_NAMES = "PNG, JPEG or WebP"
MAX_IMAGE_BYTES = 10 << 20
"""Largest accepted file (10 MiB); ``$MIP_MAX_IMAGE_BYTES`` overrides it."""
MAX_IMAGE_PIXELS = 4096 * 4096
"""Largest accepted width x height; also the decompression-bomb guard (a tiny file can decode to gigabytes)."""
UPLOADS_DIR = "uploads"
REF_HINT = ("give a readable PNG/JPEG/WebP file, an s3:// URI, or a dataset image name such as "
            "images/p0003.png")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ID = re.compile(ID_PATTERN)


@dataclass(frozen=True)
class CheckedImage:
    """What validation learnt about an image: enough to store it under the right extension and to match it."""

    format: str  # PIL format name: PNG, JPEG or WEBP
    width: int
    height: int
    nbytes: int
    pixel_sha256: str  # pixel_digest() of the decoded image

    @property
    def ext(self) -> str:
        return FORMATS[self.format]


def max_image_bytes() -> int:
    """The byte limit in force: ``$MIP_MAX_IMAGE_BYTES`` if set, else :data:`MAX_IMAGE_BYTES`."""
    raw = os.environ.get("MIP_MAX_IMAGE_BYTES")
    if raw is None or raw.strip() == "":
        return MAX_IMAGE_BYTES
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"MIP_MAX_IMAGE_BYTES={raw!r} must be a positive integer (bytes)")
    return int(raw)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB ({n:,} bytes)" if n >= 1 << 20 else f"{n:,} bytes"


def _too_many_bytes(field: str, nbytes: int, limit: int) -> InputError:
    return InputError(f"{field}: the image is oversized: {_mib(nbytes)}, over the limit of {_mib(limit)}; "
                      f"downscale or recompress it below the limit and submit again")


def pixel_digest(img: Image.Image) -> str:
    """sha256 of the size and the RGB pixels: equal for the same picture whatever its file name or lossless
    encoding (what the dataset's ``load_image`` decodes to is RGB too)."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    w, h = rgb.size
    digest = hashlib.sha256(f"{w}x{h}".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def check_image_bytes(data: bytes, field: str) -> CheckedImage:
    """Validate an uploaded image; :class:`InputError` ``"<field>: <what is wrong>; <what to do>"`` when it is
    empty, corrupt or truncated, not PNG/JPEG/WebP, or over the byte or pixel limit."""
    nbytes = len(data)
    if nbytes == 0:
        raise InputError(f"{field}: the image file is empty (0 bytes); give a {FORMAT_NAMES} image")
    limit = max_image_bytes()
    if nbytes > limit:
        raise _too_many_bytes(field, nbytes, limit)
    corrupt = (f"{field}: the image is corrupt or not an image ({{}}); give a complete {FORMAT_NAMES} file "
               "(re-export or re-download it)")
    max_pixels = MAX_IMAGE_PIXELS
    bomb = (f"{field}: the image is oversized: its pixel count exceeds the decoder's safety limit "
            f"(at most {max_pixels:,} pixels, e.g. 4096x4096, are accepted); downscale it and submit again")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt, (width, height) = im.format, im.size
                if fmt not in FORMATS:
                    raise InputError(f"{field}: the image is in a wrong format: {fmt or 'unknown'}; accepted "
                                     f"formats are {FORMAT_NAMES}; convert it (e.g. save it as PNG) and submit "
                                     "again")
                if width * height > max_pixels:
                    raise InputError(f"{field}: the image is oversized: {width}x{height} = {width * height:,} "
                                     f"pixels, over the limit of {max_pixels:,} pixels (e.g. 4096x4096); "
                                     "downscale it and submit again")
                im.verify()  # checksums and structure, without decoding the pixels
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # a truncated or garbled pixel stream fails only here
                digest = pixel_digest(im)
        except InputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError(bomb) from None
        except UnidentifiedImageError:
            raise InputError(corrupt.format("cannot be decoded: unknown or damaged header")) from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct_error) as exc:
            raise InputError(corrupt.format(f"{type(exc).__name__}: {exc}")) from None
    return CheckedImage(format=fmt, width=width, height=height, nbytes=nbytes, pixel_sha256=digest)


def is_file_ref(ref: str, base_dir: str | None) -> bool:
    """True when ``ref`` is a file to read (a URI with a scheme, an absolute path, or a relative path existing
    under ``base_dir``, default the working directory); False for a dataset image *name*, matched by name."""
    if _SCHEME.match(ref) or os.path.isabs(ref):
        return True
    return os.path.exists(os.path.join(base_dir or os.getcwd(), ref))


def _location(ref: str, base_dir: str | None) -> str:
    if _SCHEME.match(ref) or os.path.isabs(ref):
        return ref
    return os.path.abspath(os.path.join(base_dir or os.getcwd(), ref))


def read_image_ref(ref: str, field: str, base_dir: str | None = None, endpoint_url: str | None = None) -> bytes:
    """The bytes of the image file ``ref`` (local path, ``file://``, ``s3://`` with the configured endpoint).

    A missing or unreadable file, or one over the byte limit (not downloaded), is an :class:`InputError`
    naming ``field``, the ref and the fix. An unreachable store (connection errors) propagates unchanged: that
    is not the request's fault, and the caller retries.
    """
    where = _location(ref, base_dir)
    shown = repr(ref) if where == ref else f"{ref!r} ({where})"

    def bad(why: str) -> InputError:
        return InputError(f"{field}: cannot read image {shown}: {why}; {REF_HINT}")

    try:
        fs, path = filesystem(where, endpoint_url)
        info = fs.info(path)
        if info.get("type") != "file":
            raise bad("it is a directory, not a file")
        size = info.get("size")
        limit = max_image_bytes()
        if isinstance(size, int) and size > limit:
            raise _too_many_bytes(field, size, limit)
        return bytes(fs.cat_file(path))
    except InputError:
        raise
    except (ConnectionError, TimeoutError):
        raise
    except FileNotFoundError:
        raise bad("no such file") from None
    except PermissionError:
        raise bad("permission denied") from None
    except (OSError, ValueError, ImportError) as exc:  # unknown protocol, missing driver, other I/O errors
        raise bad(f"{type(exc).__name__}: {exc}") from None


def upload_key(request_id: str, name: str, checked: CheckedImage) -> str:
    """``uploads/<request_id>/<name>.<ext>``; the id is re-checked here because it becomes a storage key."""
    if not _ID.fullmatch(request_id):
        raise InputError(f"request_id={request_id!r} is not a valid id: use {ID_RULE}")
    return f"{UPLOADS_DIR}/{request_id}/{name}.{checked.ext}"


def _image_refs(req: ForgetRequest, base_dir: str | None) -> dict[tuple[str, int, int], str]:
    """Every image file of ``req``: ``("item", k, 0)`` for ``items[k].image`` (dataset image names excluded) and
    ``("photo", i, j)`` for ``subjects[i].photos[j]`` (always files: a photo has no dataset to name it in)."""
    refs = {("item", k, 0): it.image for k, it in enumerate(req.items)
            if it.image is not None and is_file_ref(it.image, base_dir)}
    for i, subject in enumerate(req.subjects):
        if not isinstance(subject, str):
            refs.update({("photo", i, j): ref for j, ref in enumerate(subject.photos)})
    return refs


def _field(where: tuple[str, int, int]) -> str:
    kind, i, j = where
    return f"items[{i}].image" if kind == "item" else f"subjects[{i}].photos[{j}]"


class ImageStore(Protocol):
    """Where :func:`ingest_images` copies images to (the service store); a protocol, so this module does not
    import the store that calls it."""

    endpoint_url: str | None

    def write_bytes(self, key: str, data: bytes) -> str: ...


def ingest_images(store: ImageStore, req: ForgetRequest, base_dir: str | None = None) -> ForgetRequest:
    """Validate every image file of ``req`` (items' images, people's photos) and copy it into ``store``; the
    request with those fields pointing at the stored copies. Dataset image names stay as they are.

    All problems are collected into one :class:`InputError` (one ``items[k].image: ...`` or
    ``subjects[i].photos[j]: ...`` line each) raised before anything is written, so a bad request leaves the
    store unchanged. Relative paths are taken from ``base_dir`` (the request file's folder), default the working
    directory.
    """
    checked: dict[tuple[str, int, int], tuple[bytes, CheckedImage]] = {}
    problems: list[str] = []
    for where, ref in _image_refs(req, base_dir).items():
        try:
            data = read_image_ref(ref, _field(where), base_dir, store.endpoint_url)
            checked[where] = (data, check_image_bytes(data, _field(where)))
        except InputError as exc:
            problems.append(str(exc))
    if problems:
        n = len(problems)
        raise InputError(f"invalid image{'s' if n != 1 else ''} in forget request {req.request_id!r} "
                         f"({n} problem{'s' if n != 1 else ''}):\n" + "\n".join(f"  {p}" for p in problems)
                         + "\nfix these images and submit again; nothing was queued")
    if not checked:
        return req
    names = {w: f"item-{w[1]}" if w[0] == "item" else f"subject-{w[1]}-photo-{w[2]}" for w in checked}
    keys = {w: upload_key(req.request_id, names[w], info) for w, (_, info) in checked.items()}  # all before writing
    stored = {w: store.write_bytes(keys[w], data) for w, (data, _) in checked.items()}
    items = [it.model_copy(update={"image": stored[("item", k, 0)]}) if ("item", k, 0) in stored else it
             for k, it in enumerate(req.items)]
    subjects = [s if isinstance(s, str) else s.model_copy(update={"photos": [
        stored.get(("photo", i, j), ref) for j, ref in enumerate(s.photos)]}) for i, s in enumerate(req.subjects)]
    return req.model_copy(update={"items": items, "subjects": subjects})


__all__ = [
    "FORMATS", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "UPLOADS_DIR", "CheckedImage", "check_image_bytes",
    "ingest_images", "is_file_ref", "max_image_bytes", "pixel_digest", "read_image_ref", "upload_key",
]
