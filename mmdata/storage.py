"""The few filesystem operations preprocessing needs, on local paths and fsspec URLs.

Local paths get real atomicity (``os.replace``) and hard links; object
stores get whole-object uploads (a PUT is atomic: readers see the old
object or the new one) and server-side copies.
"""

from __future__ import annotations

import atexit
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
    global _closing_at_exit
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    if not _closing_at_exit and getattr(fs, "async_impl", False):
        atexit.register(close_clients)   # after weakref's own exit hook: runs before it
        _closing_at_exit = True
    return fs, path


_closing_at_exit = False


def close_clients() -> None:
    """At exit: close this process's storage client sessions (s3fs, fsspec's HTTP) in the event loop that
    made them, while it still runs. Left to their finalizers, they close during interpreter shutdown
    from a loop that has stopped, and aiohttp prints "Unclosed client session" to stderr."""
    from fsspec.asyn import sync
    for finalizer in client_finalizers():
        alive = finalizer.detach()          # (object, close_session, (loop, client), kwargs)
        if not alive or len(alive[2]) != 2:
            continue
        loop, client = alive[2]
        try:
            if loop is not None and loop.is_running():
                closing = client.__aexit__ if hasattr(client, "__aexit__") else client.close
                sync(loop, closing, *((None, None, None) if hasattr(client, "__aexit__") else ()), timeout=5)
        except Exception:  # noqa: BLE001 - a client that cannot close cleanly at exit is left to the OS
            pass


def client_finalizers() -> list:
    """The finalizers that close storage clients' sessions (s3fs, fsspec's HTTP, gcsfs, adlfs)."""
    import weakref
    found = []
    for finalizer in list(weakref.finalize._registry):   # noqa: SLF001 - no public way to list finalizers
        alive = finalizer.peek()            # (object, function, args, kwargs), None once it ran
        func = alive[1] if alive else None
        module, name = getattr(func, "__module__", None) or "", getattr(func, "__qualname__", "")
        if module.startswith(("s3fs", "fsspec", "gcsfs", "adlfs")) and name.endswith("close_session"):
            found.append(finalizer)
    return found


def forget_inherited_clients() -> None:
    """In a forked process (a DataLoader worker): let go of the parent's storage clients without closing them.

    s3fs and fsspec's HTTP filesystem close their client sessions from a finalizer. A filesystem object
    inherited from the parent holds a session bound to the parent's event loop; when the child collects
    it, the finalizer schedules the close on the child's loop, and asyncio prints "Task exception was
    never retrieved ... attached to a different loop" (the run still works). The sockets are the
    parent's to close, so the child drops those finalizers instead of running them, and keeps the objects
    (collecting an unclosed aiohttp session prints "Unclosed client session"; a worker ends by os._exit).
    """
    for finalizer in client_finalizers():
        _inherited.append(finalizer.detach())


_inherited: list = []


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


def read_many(urls: list[str], storage_options: dict) -> list[bytes]:
    """Each file's bytes, in order. Remote ones are fetched concurrently (fsspec's ``cat`` of a list: one
    event loop, many requests in flight), so that a dataset of thousands of shards does not pay a round
    trip per index file one after another before its first batch."""
    remote = [u for u in urls if not is_local(u)]
    fetched: dict[str, bytes] = {}
    if remote:
        fs, _ = filesystem(remote[0], storage_options)
        paths = {u: fsspec.core.url_to_fs(u, **storage_options)[1] for u in remote}
        one_store = len({u.split("://", 1)[0] for u in remote}) == 1
        if len(remote) > 1 and one_store and getattr(fs, "async_impl", False):
            found = fs.cat(list(paths.values()), on_error="raise")
            fetched = {u: found[p] for u, p in paths.items()}
        else:
            fetched = {u: read_bytes(u, storage_options) for u in remote}
    return [fetched[u] if u in fetched else read_bytes(u, storage_options) for u in urls]


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
