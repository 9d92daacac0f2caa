"""Shards from anywhere: a local path or any fsspec URL (s3://, gs://, https://, file://) as one small path type,
with connect and read timeouts, retries and backoff on transient network errors, read-ahead of whole files, and
zarr stores over both.

Credentials are never handled here: fsspec and its file systems take them from the environment as they
document (AWS_ACCESS_KEY_ID / AWS_PROFILE / AWS_ENDPOINT_URL_S3 for s3fs, GOOGLE_APPLICATION_CREDENTIALS
for gcsfs, user:password@ in an http URL), and every URL we print or record has its user info and query
string (signatures, tokens) removed.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import zarr
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from redi.common.atomic import atomic_write_bytes, sha256_file
from redi.common.errors import UserError
from redi.common.urls import is_url, redact

RETRIES = 5  # attempts of one request before a transient error is reported
BACKOFF_S = 0.5  # wait after the first failed attempt; doubled after each further one (with jitter)
CONNECT_TIMEOUT_S = 30.0  # a connection not made in this time is a failed attempt (retried)
READ_TIMEOUT_S = 60.0  # so is a response that sends no byte for this long (a stalled server): never a wait forever
CONCURRENT_REQUESTS = 4  # per process, for `redi verify` and `redi publish` of a remote root
T = TypeVar("T")

# Exception classes (by name, anywhere in the MRO, so no client library need be imported) that a retry can cure:
# dropped or refused connections, timeouts, bodies cut short (builtins, aiohttp, botocore, urllib3).
_TRANSIENT_TYPES = {"ConnectionError", "TimeoutError", "ClientConnectionError", "ClientPayloadError",
                    "ServerDisconnectedError", "HTTPClientError", "IncompleteReadError", "ResponseStreamingError",
                    "ProtocolError", "ReadTimeoutError", "ChunkedEncodingError"}
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}  # HTTP statuses worth another try
_FINAL_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def is_transient(error: BaseException) -> bool:
    """Whether another attempt may succeed: a network failure or a 5xx/429, not a missing file or a refusal."""
    if isinstance(error, _FINAL_OS_ERRORS):
        return False
    status = getattr(error, "status", None)
    if isinstance(status, int):
        return status in _TRANSIENT_STATUS
    return any(cls.__name__ in _TRANSIENT_TYPES for cls in type(error).__mro__)


def _unreadable(what: object, error: BaseException, attempts: int) -> UserError:
    """One sentence for a request that failed for good (never the credentials: URLs and messages are redacted)."""
    detail = redact(str(error).splitlines()[0] if str(error) else "")
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    hint = ("check the credentials in the environment" if isinstance(error, PermissionError) or
            getattr(error, "status", None) in (401, 403) else "check the network, the server and the credentials")
    return UserError(f"{redact(str(what))} could not be read{tried} ({type(error).__name__}: {detail}); {hint}.")


def _wait_before_retry(error: Exception, attempt: int, what: object) -> float:
    """Seconds to wait before attempt `attempt` + 1 (exponential, with jitter); raises if there is to be none.

    FileNotFoundError passes through (callers name the missing file); any other failure for good is one UserError.
    """
    if isinstance(error, (FileNotFoundError, UserError)):
        raise error
    if not is_transient(error) or attempt + 1 == RETRIES:
        raise _unreadable(what, error, attempt + 1) from None
    return BACKOFF_S * 2**attempt * (1 + random.random() / 2)


def retried(request: Callable[[], T], what: object) -> T:
    """`request()`, tried up to RETRIES times with exponential backoff while it fails transiently."""
    for attempt in itertools.count():
        try:
            return request()
        except Exception as e:
            time.sleep(_wait_before_retry(e, attempt, what))
    raise AssertionError("unreachable")


async def retried_async(request: Callable[[], Awaitable[T]], what: object) -> T:
    """`retried` for coroutines (zarr's store calls)."""
    for attempt in itertools.count():
        try:
            return await request()
        except Exception as e:
            await asyncio.sleep(_wait_before_retry(e, attempt, what))
    raise AssertionError("unreachable")


class RemotePath:
    """A file or directory behind an fsspec URL, with the few pathlib methods the shard readers use.

    Every request is retried on transient errors; `str()` is the redacted URL, `url` the one to open.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str):
        self._fs, self._pid = fs, os.getpid()
        self.path = path.rstrip("/")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The file system, made again in a forked DataLoader worker (fsspec's async ones are not fork-safe)."""
        if self._pid != os.getpid():
            self._fs, self._pid = type(self._fs)(**self._fs.storage_options), os.getpid()
        return self._fs

    @classmethod
    def from_url(cls, url: str) -> RemotePath:
        try:
            fs, path = fsspec.core.url_to_fs(url, **timeouts(url))
        except (ImportError, ValueError) as e:  # an unknown protocol, or its package is not installed
            raise UserError(f"{redact(url)} cannot be opened ({redact(str(e))}); `pip install -e '.[remote]'` "
                            f"in redi's checkout brings s3:// and http(s)://, other stores need their fsspec package (gcsfs for gs://).") \
                from None
        return cls(fs, path)

    @property
    def url(self) -> str:
        """The full URL, credentials included where the user wrote them: for opening, never for printing."""
        return self.fs.unstrip_protocol(self.path)

    def __str__(self) -> str:
        return redact(self.url)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __truediv__(self, rel: str) -> RemotePath:
        return RemotePath(self.fs, f"{self.path}/{rel}")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.fs, self.path.rsplit("/", 1)[0])

    def read_bytes(self) -> bytes:
        """The whole file in one request (FileNotFoundError if it is not there)."""
        return retried(lambda: self.fs.cat_file(self.path), self)

    def is_file(self) -> bool:
        return retried(lambda: self.fs.isfile(self.path), self)

    def write_bytes(self, data: bytes) -> None:
        """One upload (an object store makes it visible whole or not at all)."""
        retried(lambda: self.fs.pipe_file(self.path, data), self)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            retried(lambda: self.fs.rm_file(self.path), self)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self) -> None:
        """Make the directory (a bucket, on an object store), parents included; no error if it exists."""
        retried(lambda: self.fs.makedirs(self.path, exist_ok=True), self)


Location = Path | RemotePath  # where shards are: a local path or a URL


def timeouts(url: str) -> dict[str, Any]:
    """The fsspec options that bound each request to `url` by CONNECT_TIMEOUT_S and READ_TIMEOUT_S, for the file
    systems whose options we know (http(s):// through aiohttp, s3:// through botocore); {} for the others."""
    protocol = url.split("://", 1)[0].lower()
    if protocol in ("http", "https"):
        import aiohttp  # fsspec's http file system is built on it

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S,
                                                                   sock_read=READ_TIMEOUT_S)}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S}}
    return {}


def as_location(text: str | Path) -> Location:
    """A local path for a plain path or a file:// URL, a RemotePath for any other URL."""
    text = str(text)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    return RemotePath.from_url(text) if is_url(text) else Path(text)


def local_root(text: str | Path) -> Path:
    """The data root of a command that needs one on a local disk (the stages write there): a path or a file:// URL;
    any other URL is refused in one sentence, before anything is written (a Path would mangle it into a folder)."""
    text = str(text)
    if is_url(text) and not text.startswith("file://"):
        raise UserError(f"{redact(text)} is a URL, but this command needs a data root on a local disk (the stages write "
                        f"there); `redi publish DATA {redact(text)}` copies finished shards to a URL.")
    return Path(text.removeprefix("file://"))


def read_if_exists(path: Location) -> bytes | None:
    """The file's bytes, or None if it is not there."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def write_file(path: Location, data: bytes) -> None:
    """Write a whole file: atomically on a local disk, as one upload elsewhere."""
    if isinstance(path, RemotePath):
        path.write_bytes(data)
    else:
        atomic_write_bytes(path, data)


def sha256_of(path: Location) -> str:
    """SHA-256 of a file (FileNotFoundError if it is not there); a remote file is fetched whole, with retries."""
    if isinstance(path, RemotePath):
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return sha256_file(path)


def read_ahead(fetch: Callable[[T], Any], keys: Iterable[T], depth: int) -> Iterator[Any]:
    """fetch(key) for each key, in order, with up to `depth` fetches running in threads ahead of the consumer.

    So a reader decodes one file while the next `depth` download (each held whole in memory); depth 0 fetches
    each file when it is needed. The threads are daemons: a fetch stuck on a stalled server never keeps the
    process from exiting (a stop signal, an error elsewhere); closing the iterator abandons the fetches in flight.
    """
    if depth < 1:
        yield from map(fetch, keys)
        return
    pending: deque[Future[Any]] = deque()
    for key in keys:
        if len(pending) == depth:
            value = pending.popleft().result()  # the oldest is done: its thread is free for the next key
            pending.append(_in_a_thread(fetch, key))
            yield value
        else:
            pending.append(_in_a_thread(fetch, key))
    while pending:
        yield pending.popleft().result()


def _in_a_thread(fetch: Callable[[T], Any], key: T) -> Future[Any]:
    """fetch(key) started in a daemon thread of its own."""
    future: Future[Any] = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fetch(key))
        except BaseException as e:  # handed to the consumer, which raises it
            future.set_exception(e)

    threading.Thread(target=run, name="read-ahead", daemon=True).start()
    return future


class MissingChunk(Exception):
    """A chunk file of a zarr array is not there (zarr itself would return the fill value)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class ReadStore(WrapperStore):
    """A read-only zarr store that refuses missing chunks and retries transient network errors."""

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        value = await retried_async(lambda: self._store.get(key, prototype, byte_range), self._where(key))
        if value is None and key.startswith("c/"):  # the default chunk key encoding of zarr v3: c/0/0/…
            raise MissingChunk(key)
        return value

    def _where(self, key: str) -> str:
        """The file or URL of `key`, for messages."""
        store = self._store
        if isinstance(store, FsspecStore):
            return f"{store.fs.unstrip_protocol(store.path)}/{key}"
        return f"{getattr(store, 'root', store)}/{key}"


def open_zarr_array(path: Location) -> zarr.Array:
    """The zarr v3 array at `path`, read through a `ReadStore` (a remote one through zarr's FsspecStore)."""
    store = FsspecStore.from_url(path.url, storage_options=timeouts(path.url), read_only=True) \
        if isinstance(path, RemotePath) else LocalStore(path, read_only=True)
    return zarr.open_array(store=ReadStore(store), mode="r", zarr_format=3)
