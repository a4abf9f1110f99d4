"""Put an existing file at a new place without moving its bytes through this process where storage allows.

Model versions share most of their files with their parent (every shard the edit did not touch, the config, the
processor), so copying them byte by byte would cost the model's size per version in time, network and disk.
Locally a new version gets hard links (one inode, no bytes written; a copy where linking fails, e.g. across
filesystems); on an object store the server copies the object (S3 ``CopyObject``). Hard links are safe because
nothing in the store is rewritten in place: every writer replaces a file (temporary file + ``os.replace``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mip_core.storage import filesystem, is_remote


def temp_file_beside(path: str, data: bytes) -> str:
    """``data`` written and fsynced to a temporary file in ``path``'s folder (same filesystem: rename/link are
    atomic); the caller moves it into place or removes it."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make atomically written files unlike every other file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def write_atomic(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Whole-object write that readers never see half done: one PUT on an object store, a temporary file moved
    into place (``os.replace``) locally. The project's one atomic writer (the service store and the edit job)."""
    if is_remote(uri):
        fs, path = filesystem(uri, endpoint_url)
        fs.pipe_file(path, data)
        return
    path = uri.removeprefix("file://")
    tmp = temp_file_beside(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def link_or_copy(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> bool:
    """Hard-link ``src`` at ``dest`` (replacing what is there); copy when linking fails. True if linked."""
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and os.path.samefile(src, dest):
        return True
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-link-")) / dest.name
    try:
        try:
            os.link(src, tmp)
            linked = True
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(src, tmp)  # copy_file_range/sendfile: kernel-side where the OS has them
            linked = False
        os.replace(tmp, dest)  # atomic: a reader sees the old file or the new one
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return linked


def same_store(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` are on one object store (same protocol), so the server can copy between them."""
    return is_remote(a) and is_remote(b) and a.split("://", 1)[0] == b.split("://", 1)[0]


def place_file(src_uri: str, dest_uri: str, *, local_src: str | None = None,
               endpoint_url: str | None = None) -> str:
    """Put ``src_uri``'s file at ``dest_uri``; returns how: ``link``, ``copy``, ``server-copy`` or ``upload``.

    ``local_src`` is a local copy of ``src_uri`` (a node's cache of a remote model), used to link or upload.
    Local to local links; object store to the same store copies server-side; anything else streams.
    """
    if not is_remote(dest_uri):
        source = local_src or (None if is_remote(src_uri) else src_uri.removeprefix("file://"))
        if source is not None:
            return "link" if link_or_copy(source, dest_uri.removeprefix("file://")) else "copy"
        fs, path = filesystem(src_uri, endpoint_url)
        fs.get_file(path, dest_uri.removeprefix("file://"))
        return "copy"
    dest_fs, dest = filesystem(dest_uri, endpoint_url)
    if same_store(src_uri, dest_uri):
        dest_fs.copy(filesystem(src_uri, endpoint_url)[1], dest)  # S3 CopyObject (multipart copy above 5 GB)
        return "server-copy"
    source = local_src or src_uri.removeprefix("file://")
    if is_remote(source):
        raise ValueError(f"cannot copy {src_uri} to {dest_uri} across object stores without a local copy")
    dest_fs.put_file(source, dest)
    return "upload"


__all__ = ["link_or_copy", "place_file", "same_store"]
