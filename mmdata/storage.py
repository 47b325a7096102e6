"""The few filesystem operations preprocessing needs, on local paths and fsspec URLs.

Local paths get real atomicity (``os.replace``) and hard links; object
stores get whole-object uploads (a PUT is atomic: readers see the old
object or the new one) and server-side copies.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import socket
import stat
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
    if url.startswith(("s3://", "s3a://")):
        storage_options = with_s3_session(storage_options)
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    if not _closing_at_exit and getattr(fs, "async_impl", False):
        atexit.register(close_clients)   # after weakref's own exit hook: runs before it
        _closing_at_exit = True
    return fs, path


_closing_at_exit = False


def with_s3_session(storage_options: dict) -> dict:
    """``storage_options`` with this process's aiobotocore session, where s3fs would make one of its own.

    A new session parses botocore's S3 service description (a few MB of JSON) before its first request:
    0.35 s of a forked DataLoader worker's first request. Each process's session here shares one data loader
    (the parsed descriptions, plain data), made by the first process that needed it and inherited by
    forks, so a worker's first request takes 0.11 s. Credentials stay per process: each has its own
    session. Options that s3fs hands to the session it makes (``profile``, ...) keep s3fs's own session."""
    if not set(storage_options) <= s3fs_parameters():
        return storage_options
    global _s3_session, _s3_loader
    if _s3_session is None or _s3_session[0] != os.getpid():
        from aiobotocore.session import AioSession
        session = AioSession()
        if _s3_loader is None:
            _s3_loader = session.get_component("data_loader")
        else:
            session.register_component("data_loader", _s3_loader)
        _s3_session = (os.getpid(), session)
    return {**storage_options, "session": _s3_session[1]}


@functools.cache
def s3fs_parameters() -> frozenset[str]:
    """The options S3FileSystem names (it hands any others to the session it makes); looked up once: a
    signature costs 0.3 ms, and every range request asks for its filesystem."""
    import inspect

    from s3fs import S3FileSystem
    return frozenset(inspect.signature(S3FileSystem.__init__).parameters) - {"self", "kwargs", "session"}


_s3_session = None    # (pid, AioSession): a forked process makes its own
_s3_loader = None     # botocore's data loader, shared by every process's session


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


MAX_METADATA_BYTES = 256 << 20   # dataset.json, one shard's index: far above any real one


def read_bytes(url: str, storage_options: dict, limit: int | None = None) -> bytes:
    """The file's bytes; with ``limit``, an OSError instead of reading more than that (a remote file is
    asked for its first limit + 1 bytes only: one GET, no size request first)."""
    if is_local(url):
        path = local_path(url)
        if limit is not None:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):   # a FIFO or a device would block the read, or never end
                raise OSError(f"{url} is not a regular file")
            if st.st_size > limit:
                raise too_large(url, limit)
        return path.read_bytes()
    fs, path = filesystem(url, storage_options)
    data = fs.cat_file(path) if limit is None else fs.cat_file(path, start=0, end=limit + 1)
    if limit is not None and len(data) > limit:
        raise too_large(url, limit)
    return data


class TooLarge(OSError):
    """A file larger than the limit its reader set: it was not read past the limit."""


def too_large(url: str, limit: int) -> OSError:
    return TooLarge(f"{url} is larger than {limit} bytes, more than mmdata ever writes there; "
                   "the file is not what it should be (rebuild the dataset)")


def read_many(urls: list[str], storage_options: dict, limit: int | None = None) -> list[bytes]:
    """Each file's bytes, in order. Remote ones are fetched concurrently (one event loop, many requests in
    flight), so that a dataset of thousands of shards does not pay a round trip per index file one after
    another before its first batch."""
    remote = [u for u in urls if not is_local(u)]
    fetched: dict[str, bytes] = {}
    if remote:
        fs, _ = filesystem(remote[0], storage_options)
        paths = {u: fsspec.core.url_to_fs(u, **storage_options)[1] for u in remote}
        one_store = len({u.split("://", 1)[0] for u in remote}) == 1
        if len(remote) > 1 and one_store and getattr(fs, "async_impl", False):
            # each file's GET straight away: fs.cat() first asks for every path's metadata (a HEAD each,
            # one more round trip before the first byte)
            from fsspec.asyn import sync
            found = sync(fs.loop, gather_files, fs, list(paths.values()), limit)
            for url, data in zip(paths, found):
                if limit is not None and len(data) > limit:
                    raise too_large(url, limit)
                fetched[url] = data
        else:
            fetched = {u: read_bytes(u, storage_options, limit) for u in remote}
    return [fetched[u] if u in fetched else read_bytes(u, storage_options, limit) for u in urls]


async def gather_files(fs, paths: list[str], limit: int | None, at_once: int = 64) -> list[bytes]:
    """Every path's bytes (up to limit + 1 of them) through the async filesystem, ``at_once`` in flight."""
    import asyncio
    bound = asyncio.Semaphore(at_once)

    async def one(path: str) -> bytes:
        async with bound:
            return await (fs._cat_file(path) if limit is None else fs._cat_file(path, start=0, end=limit + 1))
    return list(await asyncio.gather(*(one(p) for p in paths)))


def read_json(url: str, storage_options: dict, limit: int | None = None):
    return json.loads(read_bytes(url, storage_options, limit))


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
