"""Where job logs live: the data dir, or with LOWERING_STORAGE=s3 the bucket once a job ends.

A job's child writes its log to a file on the host that runs it, and keeps writing to
it until it exits. In a fleet on S3 no other process can read that file, so the worker
host ``seal``s the log into the bucket when the child has exited, before the job's final
status is written: whoever sees the job final can read its whole log from any replica.
While the job runs, only its own host has the log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.constants import CHUNK_BYTES
from app.errors import ObjectStoreUnavailable
from app.settings import Settings
from app.storage.base import LogStore
from app.storage.files import LocalLogStore

log = logging.getLogger("app.storage")


def open_log_store(settings: Settings, client: Any = None) -> LogStore:
    """The data dir's logs, or (LOWERING_STORAGE=s3) the bucket's, with ``client`` or a
    new one."""
    local = LocalLogStore(settings.logs_dir)
    if settings.storage != "s3":
        return local
    from app.storage.s3 import make_client  # boto3 only when used

    client = client or make_client(endpoint_url=settings.s3_endpoint_url,
                                   region=settings.s3_region)
    return S3LogStore(client, bucket=settings.s3_bucket, prefix=settings.s3_prefix, local=local)


class S3LogStore:
    """Logs on this host while their child writes them, in the bucket once sealed.

    :param local: the host's own log files (a job running here, or one whose seal failed).
    """

    def __init__(self, client: Any, *, bucket: str, prefix: str, local: LocalLogStore) -> None:
        from app.storage.s3 import _Bucket

        self._bucket = _Bucket(client, bucket=bucket, prefix=prefix, transfer=None)
        self.local = local

    def key(self, job_id: str) -> str:
        return f"{self._bucket.prefix}logs/{job_id}.log"

    def adopt(self, job_id: str, src: Path) -> None:
        self.local.adopt(job_id, src)

    def seal(self, job_id: str) -> None:
        """Put the finished log in the bucket and drop the local copy; a failure keeps the
        local copy (logged): a log is never worth failing a job for."""
        path = self.local.path(job_id)
        if not path.exists():
            return
        try:
            with self._bucket.guard("store a job log"):
                self._bucket.client.upload_file(str(path), self._bucket.bucket,
                                                self.key(job_id), Config=self._bucket.transfer)
        except ObjectStoreUnavailable as exc:
            log.warning("job %s: its log stays on this host: %s", job_id, exc.message)
            return
        path.unlink(missing_ok=True)

    def tail(self, job_id: str, limit_bytes: int) -> str:
        if self.local.path(job_id).exists():
            return self.local.tail(job_id, limit_bytes)
        try:
            with self._bucket.guard("read a job log", missing="no log"):
                body = self._bucket.client.get_object(
                    Bucket=self._bucket.bucket, Key=self.key(job_id),
                    Range=f"bytes=-{max(1, limit_bytes)}")["Body"]
                data: bytes = body.read()
        except (FileNotFoundError, ObjectStoreUnavailable):
            return ""
        return data.decode(errors="replace")

    def chunks(self, job_id: str) -> Iterator[bytes] | None:
        local = self.local.chunks(job_id)
        if local is not None:
            return local
        try:
            with self._bucket.guard("read a job log", missing="no log"):
                body = self._bucket.client.get_object(Bucket=self._bucket.bucket,
                                                      Key=self.key(job_id))["Body"]
        except FileNotFoundError:
            return None

        def read() -> Iterator[bytes]:
            with self._bucket.guard("read a job log"):
                try:
                    while block := body.read(CHUNK_BYTES):
                        yield block
                finally:
                    body.close()

        return read()

    def remove(self, job_id: str) -> None:
        self.local.remove(job_id)
        self._bucket.delete(self.key(job_id), "delete a job log")
