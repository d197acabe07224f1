"""The recording archive: where step 4 keeps each call's recording once it has fetched it, so
that the CRM's link outlives DownloadRecording's signed URL (it expires).

`file:///path` (a folder) or `s3://bucket/prefix` (S3-compatible: Alibaba OSS, MinIO, AWS, on
boto3; endpoint CALL_PIPELINE_RECORDING_S3_ENDPOINT, credentials from AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY). The key of a recording is `{task_id}/{call_task_id}.wav`, or `.mp3`: the
extension says what the file is, by its first bytes, whatever the signed URL's name says.

The download is streamed from the signed URL into the store, never whole in memory, with a size
cap, and refused unless its first bytes are audio (WAV or MP3): an expired or wrong URL answers
with an XML error page, which must not be archived as a recording.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import parse_qs, urlparse

import requests

CHUNK = 64 * 1024
HEADER_BYTES = 12
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class ArchiveError(RuntimeError):
    """A recording could not be archived; `expired` when its signed URL is no longer valid (a
    new one may be asked for)."""

    def __init__(self, message: str, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


# The formats a recording is kept in: its key's extension, and the type S3 serves it with.
CONTENT_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg"}


def recording_stem(task_id: int, call_task_id: str) -> str:
    """The key of a call attempt's recording without its extension."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", call_task_id)
    return f"{task_id}/{safe}"


def recording_key(task_id: int, call_task_id: str, extension: str = "wav") -> str:
    return f"{recording_stem(task_id, call_task_id)}.{extension}"


def audio_format(head: bytes) -> str | None:
    """"wav" (RIFF....WAVE), "mp3" (an ID3 tag, or an MPEG frame sync), or None: not audio."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:
        return "mp3"
    return None


def is_audio(head: bytes) -> bool:
    return audio_format(head) is not None


def url_expired(url: str, now: float | None = None) -> bool:
    """Whether a signed URL's `Expires` (epoch seconds, OSS's style) is past."""
    values = parse_qs(urlparse(url).query).get("Expires") or []
    return bool(values) and values[0].isdigit() and int(values[0]) <= (now or time.time())


class RecordingStore(Protocol):
    def exists(self, key: str) -> bool: ...

    def put(self, key: str, stream: BinaryIO, content_type: str = "audio/wav") -> None: ...

    def url_of(self, key: str) -> str: ...


@dataclass
class FileStore:
    root: Path

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def put(self, key: str, stream: BinaryIO, content_type: str = "audio/wav") -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        # written beside, then renamed: a reader never sees half a file, a failure leaves none
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".part-", delete=False) as part:
            try:
                shutil.copyfileobj(stream, part, CHUNK)
            except BaseException:
                os.unlink(part.name)
                raise
        os.replace(part.name, target)

    def url_of(self, key: str) -> str:
        return (self.root / key).as_uri()


class S3Store:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix, self.endpoint_url = bucket, prefix.strip("/"), endpoint_url
        self._client = boto3.client("s3", endpoint_url=endpoint_url,
                                    config=Config(retries={"max_attempts": 3, "mode": "standard"}))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def put(self, key: str, stream: BinaryIO, content_type: str = "audio/wav") -> None:
        # upload_fileobj streams (multipart above its threshold), so the file is never whole in memory
        self._client.upload_fileobj(stream, self.bucket, self._key(key),
                                    ExtraArgs={"ContentType": content_type})

    def url_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def open_store(url: str, s3_endpoint: str | None = None) -> RecordingStore:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStore(Path(parsed.path))
    if parsed.scheme == "s3" and parsed.netloc:
        return S3Store(parsed.netloc, parsed.path, s3_endpoint or None)
    raise ValueError(f"CALL_PIPELINE_RECORDING_STORE must be file:///path or s3://bucket/prefix, got {url!r}")


class _CappedStream(io.RawIOBase):
    """The body of a streamed response as a file, after the header already read, failing once
    more than `limit` bytes came (hand-written: requests gives an iterator, stores want a file)."""

    def __init__(self, head: bytes, chunks, limit: int) -> None:
        self._pending, self._chunks, self._limit, self.size = head, chunks, limit, len(head)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self.size += len(chunk)
            if self.size > self._limit:
                raise ArchiveError(f"the recording is larger than the cap of {self._limit:,} bytes")
            self._pending = chunk
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


class RecordingArchive:
    """Fetches a signed recording URL and stores it under its key; `archive` returns the URL the
    CRM keeps and the bytes stored."""

    def __init__(self, store: RecordingStore, public_base_url: str | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, timeout_s: float = 60.0, limit=None) -> None:
        self.store, self.public_base_url = store, (public_base_url or "").rstrip("/") or None
        self.limit = limit  # a SharedSemaphore: fetches in flight across processes
        self.max_bytes, self.timeout_s = max_bytes, timeout_s
        self._session = requests.Session()
        self._session.trust_env = False  # a signed URL is fetched directly (see clients/proxies.py)

    def crm_url(self, key: str) -> str:
        return f"{self.public_base_url}/{key}" if self.public_base_url else self.store.url_of(key)

    def archived(self, key: str) -> bool:
        return self.store.exists(key)

    def archived_key(self, stem: str) -> str | None:
        """The key under which the recording `stem` (see `recording_stem`) is stored, whichever
        format it is in; None when it is not archived."""
        return next((f"{stem}.{ext}" for ext in CONTENT_TYPES if self.store.exists(f"{stem}.{ext}")), None)

    def archive(self, signed_url: str, stem: str) -> tuple[str, int]:
        """Fetch `signed_url` into the store under `stem` plus the extension of the file's format
        (its first bytes say which); (the CRM's URL, bytes stored)."""
        if self.limit is None:
            return self._archive(signed_url, stem)
        with self.limit.hold():
            return self._archive(signed_url, stem)

    def _archive(self, signed_url: str, stem: str) -> tuple[str, int]:
        if url_expired(signed_url):
            raise ArchiveError("the signed URL expired before it was fetched", expired=True)
        try:
            response = self._session.get(signed_url, stream=True, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise ArchiveError(f"fetching the recording failed: {type(exc).__name__}: {exc}") from None
        with response:
            if response.status_code in (401, 403):
                raise ArchiveError(f"the signed URL was refused (HTTP {response.status_code}, "
                                   f"{response.text[:120]!r})", expired=True)
            if response.status_code != 200:
                raise ArchiveError(f"fetching the recording failed: HTTP {response.status_code}")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.max_bytes:
                raise ArchiveError(f"the recording is larger than the cap of {self.max_bytes:,} bytes")
            chunks = response.iter_content(CHUNK)
            head = b""
            for chunk in chunks:
                head += chunk
                if len(head) >= HEADER_BYTES:
                    break
            extension = audio_format(head[:HEADER_BYTES])
            if extension is None:
                raise ArchiveError(f"what came back is not audio (starts {head[:40]!r})")
            key = f"{stem}.{extension}"
            stream = _CappedStream(head, iter(chunks), self.max_bytes)
            self.store.put(key, io.BufferedReader(stream, CHUNK), CONTENT_TYPES[extension])
        return self.crm_url(key), stream.size
