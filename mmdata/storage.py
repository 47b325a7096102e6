"""The few filesystem operations preprocessing needs, on local paths and fsspec URLs.

Local paths get real atomicity (``os.replace``) and hard links; object
stores get whole-object uploads (a PUT is atomic: readers see the old
object or the new one) and server-side copies.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from pathlib import Path

import fsspec


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url)


def temp_path(path: Path) -> Path:
    """A unique hidden name beside ``path`` to write to before renaming onto it:
    ``.<name>.<host>-<pid>-<random>.tmp``. Readers never see a partial file under the final name,
    concurrent writers never share one, and one left by a killed process can be told apart
    (``stale_temp_files``)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def stale_temp_files(folder: Path) -> list[Path]:
    """Temporary files in ``folder`` written by a process of this host that is no longer running."""
    host, stale = socket.gethostname(), []
    for path in folder.glob(".*.tmp"):
        owner = path.name[: -len(".tmp")].rsplit(".", 1)[-1].rsplit("-", 2)
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not process_alive(int(owner[1])):
            stale.append(path)
    return stale


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process
        return True
    return True


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def filesystem(url: str, storage_options: dict):
    return fsspec.core.url_to_fs(url, **storage_options)


def exists(url: str, storage_options: dict) -> bool:
    if is_local(url):
        return local_path(url).exists()
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def size(url: str, storage_options: dict) -> int | None:
    """Bytes in the file at ``url``; None when there is none."""
    try:
        if is_local(url):
            return local_path(url).stat().st_size
        fs, path = filesystem(url, storage_options)
        return fs.size(path)
    except FileNotFoundError:
        return None


def remove(url: str, storage_options: dict) -> None:
    """Delete the file at ``url`` if there is one."""
    if is_local(url):
        local_path(url).unlink(missing_ok=True)
        return
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm_file(path)


def read_bytes(url: str, storage_options: dict) -> bytes:
    if is_local(url):
        return local_path(url).read_bytes()
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path)


def read_json(url: str, storage_options: dict):
    return json.loads(read_bytes(url, storage_options))


def write_bytes(url: str, data: bytes, storage_options: dict) -> None:
    """Atomic: the file appears complete under its final name or not at all."""
    if is_local(url):
        path = local_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)   # gone already unless the write failed
    else:
        fs, path = filesystem(url, storage_options)
        fs.pipe_file(path, data)


def write_json(url: str, obj, storage_options: dict) -> None:
    write_bytes(url, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode(), storage_options)


def upload(local: Path, url: str, storage_options: dict) -> None:
    """Publish a finished local file at ``url`` (atomic on both kinds of storage)."""
    if is_local(url):
        dest = local_path(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(dest)
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        fs, path = filesystem(url, storage_options)
        fs.put_file(str(local), path)


def link_or_copy(src: str, dst: str, storage_options: dict) -> None:
    """Place ``src`` at ``dst``: a hard link locally (no extra bytes), else a server-side copy."""
    if is_local(src) and is_local(dst):
        source, dest = local_path(src), local_path(dst)
        if dest.exists() and os.path.samefile(source, dest):
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(dest)
        try:
            try:
                os.link(source, tmp)
            except OSError:  # another filesystem, or links not supported
                shutil.copyfile(source, tmp)
            os.replace(tmp, dest)
        finally:
            # also: rename() between two links to one file is a no-op that leaves the source name
            # behind (POSIX); that happens when a concurrent run linked the same file first
            tmp.unlink(missing_ok=True)
    else:
        fs, src_path = filesystem(src, storage_options)
        _, dst_path = filesystem(dst, storage_options)
        fs.copy(src_path, dst_path)
