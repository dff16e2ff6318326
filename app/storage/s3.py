"""Uploads and artifacts in an S3-compatible bucket (LOWERING_STORAGE=s3); logs stay local.

``{prefix}artifacts/{sha256[:2]}/{sha256}.pt2``   archives by content address, their sha256
                                                  and size in the object's metadata
``{prefix}uploads/{job_id}.pt2``                  the gate's rebuilt copy of each upload
``{prefix}uploads/kept/{upload_id}.pt2``          the gate's rebuilt copy of a completed
                                                  resumable upload (a job's is a server-side
                                                  copy of it)
``{prefix}incoming/{upload_id}.pt2``              a resumable upload's multipart upload (its
                                                  parts are sent straight to S3 with presigned
                                                  URLs); assembled, fetched for the gate, and
                                                  deleted

Receptions still stream to a local staging dir (``uploads/.staging`` in the data dir); a
commit uploads the staged file and removes it. Transfers are boto3's managed ones
(multipart beyond ``MULTIPART_BYTES``, a few parts in memory at a time, never a whole
file), and nothing half-written is ever visible under a final key: a put or a completed
multipart upload appears at once, and a failed multipart upload is aborted by s3transfer
(a bucket lifecycle rule that aborts incomplete uploads after a day covers a process
killed mid-upload).

Credentials come from the standard AWS chain (``AWS_*`` variables, ``~/.aws``, an instance
or pod role); they are never settings of ours and never logged. Every S3 failure leaves
as :class:`~app.errors.ObjectStoreUnavailable` (503 with Retry-After), never a traceback;
a missing object is FileNotFoundError (or False), as with the local stores. Clients are
thread-safe, so one serves the API and every worker slot.

Imported only when LOWERING_STORAGE=s3 (boto3 is not imported otherwise).
"""

from __future__ import annotations

import errno
import hashlib
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from app.constants import CHUNK_BYTES, SHA256_RE
from app.errors import ObjectStoreUnavailable
from app.storage.base import ArtifactRef, PartTarget
from app.storage.files import LocalUploadStore

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger("app.storage.s3")

CONNECT_TIMEOUT_S = 3
READ_TIMEOUT_S = 30
MAX_ATTEMPTS = 3  # botocore "standard" retries: a dead endpoint fails within seconds
MULTIPART_BYTES = 16 * 1024**2
PART_BYTES = 16 * 1024**2
TRANSFER_THREADS = 4
MISSING = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket", "NoSuchUpload"})
RETRY_AFTER_S = 30


def transfer_config(*, threshold: int = MULTIPART_BYTES, part: int = PART_BYTES) -> TransferConfig:
    """Multipart beyond ``threshold`` in ``part``-sized parts; an open file's parts are read
    into memory, at most 2 x threads of them at a time."""
    config = TransferConfig(multipart_threshold=threshold, multipart_chunksize=part,
                            max_concurrency=TRANSFER_THREADS, io_chunksize=CHUNK_BYTES)
    config.max_in_memory_upload_chunks = 2 * TRANSFER_THREADS
    return config


def make_client(*, endpoint_url: str | None, region: str, pool: int = 32) -> Any:
    """An S3 client with short timeouts and few retries, path-style on a custom endpoint."""
    config = Config(
        region_name=region, signature_version="s3v4",
        connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        max_pool_connections=pool,
        # Checksums only where S3 requires them: S3-compatible servers differ on the rest.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _missing(exc: BaseException) -> bool:
    return _error_code(exc) in MISSING


def _describe(exc: BaseException) -> str:
    """What went wrong, in one line, without anything secret (no signature, no keys)."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message") or ""
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"access denied ({code}); check the AWS credentials and the bucket policy"
        if code in ("404", "NoSuchBucket"):
            return f"no such bucket ({code})"
        if code in ("SlowDown", "503", "Throttling", "RequestLimitExceeded"):
            return f"the object store is throttling requests ({code})"
        return f"{code}: {message}".rstrip(": ")
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        return f"cannot connect to the endpoint ({type(exc).__name__})"
    if isinstance(exc, ReadTimeoutError):
        return f"the endpoint stopped answering ({type(exc).__name__})"
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials were found (AWS_* variables, ~/.aws, a role)"
    return type(exc).__name__


class _Bucket:
    """One bucket, a key prefix, and the translation of S3 failures into service errors."""

    def __init__(self, client: Any, *, bucket: str, prefix: str,
                 transfer: TransferConfig | None) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.transfer = transfer or transfer_config()

    def unavailable(self, action: str, exc: BaseException) -> ObjectStoreUnavailable:
        """The client reads what failed, not where (no endpoint URL or key); the log has it."""
        detail = _describe(exc)
        log.warning("object store: could not %s (bucket %s): %s", action, self.bucket,
                    str(exc).splitlines()[0] if str(exc) else detail)
        return ObjectStoreUnavailable(f"the object store could not {action} (bucket "
                                      f"{self.bucket!r}): {detail}; retry later",
                                      retry_after_s=RETRY_AFTER_S)

    @contextmanager
    def guard(self, action: str, *, missing: str | None = None) -> Iterator[None]:
        """S3 failures as ObjectStoreUnavailable; with ``missing``, a missing object as
        FileNotFoundError saying so."""
        try:
            yield
        except ClientError as exc:
            if missing is not None and _missing(exc):
                raise FileNotFoundError(errno.ENOENT, missing) from None
            raise self.unavailable(action, exc) from None
        except (BotoCoreError, Boto3Error) as exc:
            # boto3's transfers wrap a ClientError (S3UploadFailedError): not found there
            # is still a missing object.
            if missing is not None and "404" in str(exc):
                raise FileNotFoundError(errno.ENOENT, missing) from None
            raise self.unavailable(action, exc) from None

    def head(self, key: str, action: str) -> dict[str, Any] | None:
        """The object's metadata, or None when there is no such object."""
        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=key)
            return head
        except ClientError as exc:
            if _missing(exc):
                return None
            raise self.unavailable(action, exc) from None
        except (BotoCoreError, Boto3Error) as exc:
            raise self.unavailable(action, exc) from None

    def delete(self, key: str, action: str) -> None:
        with self.guard(action):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def download(self, key: str, dest: Path, action: str, missing: str) -> None:
        """To ``dest``: s3transfer writes a temp file beside it and renames it at the end."""
        with self.guard(action, missing=missing):
            self.client.download_file(self.bucket, key, str(dest), Config=self.transfer)


class S3ArtifactStore:
    """Archives named by their sha256 in a bucket; identical bytes are stored once.

    :param downloads: ``redirect``: ``location`` is a presigned GET URL valid
        ``presign_s`` seconds (the API answers 307); ``stream``: ``location`` is None and
        the API relays ``open_chunks``.
    :param transfer: the managed-transfer configuration (tests pass small parts).
    """

    def __init__(self, client: Any, *, bucket: str, prefix: str = "", presign_s: int = 300,
                 downloads: Literal["redirect", "stream"] = "redirect",
                 transfer: TransferConfig | None = None) -> None:
        self._bucket = _Bucket(client, bucket=bucket, prefix=prefix, transfer=transfer)
        self.presign_s = presign_s
        self.downloads = downloads

    def key(self, sha256: str) -> str:
        return f"{self._bucket.prefix}artifacts/{sha256[:2]}/{sha256}.pt2"

    def put_stream(self, handle: BinaryIO) -> ArtifactRef:
        """Hash ``handle`` (one read pass), then upload it unless that archive is stored.

        ``handle`` must be seekable (a local file): it is read again to upload it, in
        parts, with its sha256 and size as the object's metadata. The upload appears at
        its key all at once or not at all.
        """
        start = handle.tell()
        digest = hashlib.sha256()
        size = 0
        while block := handle.read(CHUNK_BYTES):
            digest.update(block)
            size += len(block)
        sha256 = digest.hexdigest()
        key = self.key(sha256)
        stored = self._bucket.head(key, "check for an archive")
        if stored is not None and self._agrees(stored, sha256) and stored["ContentLength"] == size:
            return ArtifactRef(sha256, size)
        handle.seek(start)
        with self._bucket.guard("store an archive"):
            self._bucket.client.upload_fileobj(
                handle, self._bucket.bucket, key, Config=self._bucket.transfer,
                ExtraArgs={"Metadata": {"sha256": sha256, "size": str(size)},
                           "ContentType": "application/zip"})
        return ArtifactRef(sha256, size)

    @staticmethod
    def _agrees(head: dict[str, Any], sha256: str) -> bool:
        meta = head.get("Metadata") or {}
        return bool(meta.get("sha256") == sha256
                    and meta.get("size") == str(head.get("ContentLength")))

    def exists(self, sha256: str) -> bool:
        return self._bucket.head(self.key(sha256), "look up an archive") is not None

    def is_intact(self, sha256: str) -> bool:
        """Stored, with the sha256 we wrote in its metadata and the size it was written
        with. The bytes are not hashed again (a multi-GB download per request); S3 checks
        each part's integrity on upload, and nothing but this store writes these keys. A
        bad object is removed."""
        head = self._bucket.head(self.key(sha256), "look up an archive")
        if head is None:
            return False
        if self._agrees(head, sha256):
            return True
        log.warning("archive %s in the object store does not match its metadata; removed",
                    sha256)
        self.remove(sha256)
        return False

    def location(self, sha256: str) -> str | None:
        if self.downloads == "stream":
            return None
        with self._bucket.guard("sign a download URL"):
            url: str = self._bucket.client.generate_presigned_url(
                "get_object", Params={"Bucket": self._bucket.bucket, "Key": self.key(sha256)},
                ExpiresIn=self.presign_s)
        return url

    def open_chunks(self, sha256: str) -> Iterator[bytes]:
        bucket = self._bucket
        with bucket.guard("read an archive", missing=f"archive {sha256} is not stored"):
            body = bucket.client.get_object(Bucket=bucket.bucket, Key=self.key(sha256))["Body"]

        def read() -> Iterator[bytes]:
            try:
                with bucket.guard("read an archive"):
                    yield from body.iter_chunks(CHUNK_BYTES)
            finally:
                body.close()

        return read()

    def fetch(self, sha256: str, dest: Path) -> None:
        self._bucket.download(self.key(sha256), dest, "download an archive",
                              f"archive {sha256} is not stored")

    def remove(self, sha256: str) -> None:
        self._bucket.delete(self.key(sha256), "delete an archive")

    def stored(self) -> Iterator[tuple[str, int, float]]:
        bucket = self._bucket
        pages = bucket.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket.bucket, Prefix=f"{bucket.prefix}artifacts/")
        with bucket.guard("list the archives"):
            for page in pages:
                for item in page.get("Contents", []):
                    name = item["Key"].rsplit("/", 1)[-1]
                    sha256 = name.removesuffix(".pt2")
                    if name.endswith(".pt2") and SHA256_RE.fullmatch(sha256):
                        yield sha256, int(item["Size"]), item["LastModified"].timestamp()


class S3UploadStore:
    """Job inputs in a bucket; receptions are staged in a local dir first.

    :param staging_root: the local uploads dir; staged files live in its ``.staging``.
    """

    def __init__(self, client: Any, *, bucket: str, staging_root: Path, prefix: str = "",
                 transfer: TransferConfig | None = None) -> None:
        self._bucket = _Bucket(client, bucket=bucket, prefix=prefix, transfer=transfer)
        self._local = LocalUploadStore(staging_root)
        self.staging_dir = self._local.staging_dir
        self.parts = S3PartStore(self._bucket)

    def _kept(self, upload_id: str) -> str:
        return f"{self._bucket.prefix}uploads/kept/{upload_id}.pt2"

    def keep(self, upload_id: str, staged: Path) -> None:
        with self._bucket.guard("store an upload"):
            self._bucket.client.upload_file(str(staged), self._bucket.bucket,
                                            self._kept(upload_id), Config=self._bucket.transfer)
        staged.unlink(missing_ok=True)

    def adopt(self, job_id: str, upload_id: str) -> None:
        """A server-side copy (multipart for large objects): no byte passes through here."""
        bucket = self._bucket
        with bucket.guard("copy an upload", missing=f"upload {upload_id} is not stored"):
            bucket.client.copy({"Bucket": bucket.bucket, "Key": self._kept(upload_id)},
                               bucket.bucket, self.key(job_id), Config=bucket.transfer)

    def forget(self, upload_id: str) -> None:
        self._bucket.delete(self._kept(upload_id), "delete an upload")

    def key(self, job_id: str) -> str:
        return f"{self._bucket.prefix}uploads/{job_id}.pt2"

    def staging_path(self) -> Path:
        return self._local.staging_path()

    def commit(self, job_id: str, staged: Path) -> None:
        """Upload the staged file (in parts, read from disk), then remove it."""
        with self._bucket.guard("store an upload"):
            self._bucket.client.upload_file(str(staged), self._bucket.bucket, self.key(job_id),
                                            Config=self._bucket.transfer)
        staged.unlink(missing_ok=True)

    def materialize(self, job_id: str, dest: Path, *, share: bool) -> None:
        """A download: always a private copy (``share`` has nothing to share)."""
        self._bucket.download(self.key(job_id), dest, "read a job's input",
                              f"the input of job {job_id} is not stored")

    def remove(self, job_id: str) -> None:
        self._bucket.delete(self.key(job_id), "delete an upload")

    def discard_staged(self) -> int:
        return self._local.discard_staged()


class S3PartStore:
    """Resumable uploads' parts as S3 multipart uploads that clients send to directly,
    with presigned UploadPart URLs; the API lists the parts (ListParts), never relays them.
    """

    direct = True

    def __init__(self, bucket: _Bucket) -> None:
        self._bucket = bucket

    def key(self, upload_id: str) -> str:
        return f"{self._bucket.prefix}incoming/{upload_id}.pt2"

    def begin(self, upload_id: str) -> str | None:
        with self._bucket.guard("begin a multipart upload"):
            answer = self._bucket.client.create_multipart_upload(
                Bucket=self._bucket.bucket, Key=self.key(upload_id),
                ContentType="application/zip")
        return str(answer["UploadId"])

    def targets(self, upload_id: str, multipart_id: str | None, numbers: list[int],
                expires_s: int) -> list[PartTarget]:
        bucket = self._bucket
        with bucket.guard("sign part URLs"):
            return [PartTarget(n, bucket.client.generate_presigned_url(
                "upload_part", Params={"Bucket": bucket.bucket, "Key": self.key(upload_id),
                                       "UploadId": multipart_id, "PartNumber": n},
                ExpiresIn=expires_s)) for n in numbers]

    async def write(self, upload_id: str, number: int, chunks: AsyncIterator[bytes],
                    *, size_bytes: int) -> None:
        raise NotImplementedError("parts of an S3 upload go to their presigned URLs")

    def _parts(self, upload_id: str, multipart_id: str | None) -> list[dict[str, Any]]:
        bucket = self._bucket
        pages = bucket.client.get_paginator("list_parts").paginate(
            Bucket=bucket.bucket, Key=self.key(upload_id), UploadId=multipart_id)
        with bucket.guard("list the parts of an upload",
                          missing=f"the multipart upload of {upload_id} is gone"):
            return [part for page in pages for part in page.get("Parts", [])]

    def received(self, upload_id: str, multipart_id: str | None) -> dict[int, int]:
        try:
            parts = self._parts(upload_id, multipart_id)
        except FileNotFoundError:
            return {}
        return {int(part["PartNumber"]): int(part["Size"]) for part in parts}

    def assemble(self, upload_id: str, multipart_id: str | None, numbers: list[int],
                 dest: Path) -> str:
        """Complete the multipart upload with the parts S3 lists, download it for the gate
        (hashing it on the way), and delete it."""
        bucket, key = self._bucket, self.key(upload_id)
        etags = {int(part["PartNumber"]): part["ETag"]
                 for part in self._parts(upload_id, multipart_id)}
        with bucket.guard("assemble an upload"):
            bucket.client.complete_multipart_upload(
                Bucket=bucket.bucket, Key=key, UploadId=multipart_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n]}
                                           for n in numbers]})
        try:
            bucket.download(key, dest, "read an assembled upload",
                            f"the assembled upload {upload_id} is gone")
        finally:
            bucket.delete(key, "delete an assembled upload")
        digest = hashlib.sha256()
        with dest.open("rb") as handle:
            while block := handle.read(CHUNK_BYTES):
                digest.update(block)
        return digest.hexdigest()

    def abort(self, upload_id: str, multipart_id: str | None) -> None:
        if multipart_id is None:
            return
        try:
            self._bucket.client.abort_multipart_upload(
                Bucket=self._bucket.bucket, Key=self.key(upload_id), UploadId=multipart_id)
        except ClientError as exc:
            if _error_code(exc) not in MISSING | {"NoSuchUpload"}:
                raise self._bucket.unavailable("abort a multipart upload", exc) from None
        except (BotoCoreError, Boto3Error) as exc:
            raise self._bucket.unavailable("abort a multipart upload", exc) from None


def check_bucket(client: Any, bucket: str, endpoint_url: str | None) -> None:
    """Raise ObjectStoreUnavailable, in one line, unless ``bucket`` can be reached."""
    try:
        client.head_bucket(Bucket=bucket)
    except (ClientError, BotoCoreError, Boto3Error) as exc:
        where = endpoint_url or "AWS S3"
        detail = _describe(exc)
        if not isinstance(exc, ClientError | NoCredentialsError) and str(exc):
            detail = f"{detail}: {str(exc).splitlines()[0]}"
        raise ObjectStoreUnavailable(
            f"LOWERING_STORAGE=s3: bucket {bucket!r} at {where} cannot be used: {detail}",
            retry_after_s=RETRY_AFTER_S) from None


def open_s3_stores(settings: Settings) -> tuple[S3UploadStore, S3ArtifactStore]:
    """The upload and artifact stores of LOWERING_STORAGE=s3, once the bucket answers."""
    client = make_client(endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    check_bucket(client, settings.s3_bucket, settings.s3_endpoint_url)
    uploads = S3UploadStore(client, bucket=settings.s3_bucket, prefix=settings.s3_prefix,
                            staging_root=settings.uploads_dir)
    artifacts = S3ArtifactStore(client, bucket=settings.s3_bucket, prefix=settings.s3_prefix,
                                presign_s=settings.s3_presign_s,
                                downloads=settings.s3_downloads)
    return uploads, artifacts
