"""The S3 stores against a real moto server (a subprocess speaking the S3 protocol)."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from app.errors import ApiErrorCode, ObjectStoreUnavailable
from app.storage.s3 import (
    S3ArtifactStore,
    S3UploadStore,
    check_bucket,
    make_client,
    transfer_config,
)
from tests.conftest import free_port

pytestmark = pytest.mark.slow

# moto refuses parts under 5 MiB (but the last), as S3 does.
SMALL_PARTS = transfer_config(threshold=5 * 1024**2, part=5 * 1024**2)


@pytest.fixture
def client(endpoint: str) -> Any:
    return make_client(endpoint_url=endpoint, region="us-east-1")


@pytest.fixture
def bucket(client: Any) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


def _artifacts(client: Any, bucket: str, **kwargs: Any) -> S3ArtifactStore:
    return S3ArtifactStore(client, bucket=bucket, transfer=SMALL_PARTS, **kwargs)


def _payload(tmp_path: Path, size: int, name: str = "archive.pt2") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def _count_calls(client: Any, *operations: str) -> dict[str, int]:
    """How many times each S3 operation is called from now on (a botocore event hook)."""
    counts = dict.fromkeys(operations, 0)
    for operation in operations:
        def count(operation: str = operation, **_: Any) -> None:
            counts[operation] += 1
        client.meta.events.register(f"before-call.s3.{operation}", count)
    return counts


def test_put_stream_is_multipart_deduplicated_and_fetched(client: Any, bucket: str,
                                                         tmp_path: Path) -> None:
    store = _artifacts(client, bucket, prefix="/team/a/")
    source = _payload(tmp_path, 12 * 1024**2 + 123)
    data = source.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    with source.open("rb") as handle:
        ref = store.put_stream(handle)
    assert (ref.sha256, ref.size_bytes) == (sha256, len(data))
    key = f"team/a/artifacts/{sha256[:2]}/{sha256}.pt2"
    assert store.key(sha256) == key
    head = client.head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-3")  # three 5 MiB parts: a multipart upload
    assert head["Metadata"] == {"sha256": sha256, "size": str(len(data))}
    assert head["ContentType"] == "application/zip"
    assert store.exists(sha256) and store.is_intact(sha256)

    fetched = tmp_path / "fetched.pt2"
    store.fetch(sha256, fetched)
    assert fetched.read_bytes() == data
    assert b"".join(store.open_chunks(sha256)) == data

    counts = _count_calls(client, "PutObject", "CreateMultipartUpload")
    with source.open("rb") as handle:
        assert store.put_stream(handle) == ref
    assert counts == {"PutObject": 0, "CreateMultipartUpload": 0}  # stored once

    store.remove(sha256)
    assert not store.exists(sha256) and not store.is_intact(sha256)
    with pytest.raises(FileNotFoundError):
        store.fetch(sha256, tmp_path / "gone.pt2")
    with pytest.raises(FileNotFoundError):
        store.open_chunks(sha256)
    store.remove(sha256)  # removing twice is no error


def test_a_small_archive_is_one_put(client: Any, bucket: str, tmp_path: Path) -> None:
    store = _artifacts(client, bucket)
    counts = _count_calls(client, "PutObject", "CreateMultipartUpload")
    with _payload(tmp_path, 1000).open("rb") as handle:
        ref = store.put_stream(handle)
    assert counts == {"PutObject": 1, "CreateMultipartUpload": 0}
    assert store.is_intact(ref.sha256)
    assert client.head_object(Bucket=bucket, Key=f"artifacts/{ref.sha256[:2]}/"
                              f"{ref.sha256}.pt2")["ContentLength"] == 1000


def test_stored_lists_every_archive_under_the_prefix_for_retention(
        client: Any, bucket: str, tmp_path: Path) -> None:
    store = _artifacts(client, bucket, prefix="team/")
    refs = []
    for n in range(3):
        with _payload(tmp_path, 100 + n, f"a{n}.pt2").open("rb") as handle:
            refs.append(store.put_stream(handle))
    client.put_object(Bucket=bucket, Key="team/artifacts/zz/not-an-archive.txt", Body=b"x")
    client.put_object(Bucket=bucket, Key="other/artifacts/ab/" + "a" * 64 + ".pt2", Body=b"x")
    listed = {sha: (size, modified) for sha, size, modified in store.stored()}
    assert {sha: size for sha, (size, _) in listed.items()} == {
        ref.sha256: ref.size_bytes for ref in refs}
    assert all(abs(modified - time.time()) < 600 for _, modified in listed.values())
    store.remove(refs[0].sha256)
    assert refs[0].sha256 not in {sha for sha, _, _ in store.stored()}


def test_presigned_url_names_the_key_and_expires(client: Any, bucket: str, endpoint: str,
                                                  tmp_path: Path) -> None:
    store = _artifacts(client, bucket, presign_s=123)
    source = _payload(tmp_path, 4096)
    with source.open("rb") as handle:
        ref = store.put_stream(handle)
    url = store.location(ref.sha256)
    assert isinstance(url, str)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == endpoint
    assert parts.path == f"/{bucket}/artifacts/{ref.sha256[:2]}/{ref.sha256}.pt2"
    query = parse_qs(parts.query)
    # moto does not enforce the expiry: it is checked in the signed query instead.
    assert query["X-Amz-Expires"] == ["123"]
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and "X-Amz-Signature" in query
    assert "test" not in query.get("X-Amz-Signature", [""])[0]
    assert httpx.get(url).content == source.read_bytes()


def test_stream_mode_has_no_location(client: Any, bucket: str, tmp_path: Path) -> None:
    store = _artifacts(client, bucket, downloads="stream")
    source = _payload(tmp_path, 3 * 1024**2 + 7)
    with source.open("rb") as handle:
        ref = store.put_stream(handle)
    assert store.location(ref.sha256) is None
    chunks = list(store.open_chunks(ref.sha256))
    assert len(chunks) > 1 and b"".join(chunks) == source.read_bytes()


@pytest.mark.parametrize("case", ["other size", "other sha256", "no metadata"])
def test_a_mismatched_object_is_not_intact_and_is_removed(
    client: Any, bucket: str, tmp_path: Path, case: str,
) -> None:
    store = _artifacts(client, bucket)
    with _payload(tmp_path, 4096).open("rb") as handle:
        ref = store.put_stream(handle)
    metadata = {"other size": {"sha256": ref.sha256, "size": "4096"},  # but 5 bytes stored
                "other sha256": {"sha256": "0" * 64, "size": "4096"},
                "no metadata": {}}[case]
    body = b"short" if case == "other size" else os.urandom(4096)
    client.put_object(Bucket=bucket, Key=store.key(ref.sha256), Body=body, Metadata=metadata)
    assert store.exists(ref.sha256)
    assert not store.is_intact(ref.sha256)
    assert not store.exists(ref.sha256)


def test_a_failed_multipart_upload_is_aborted(client: Any, bucket: str, tmp_path: Path) -> None:
    store = _artifacts(client, bucket)
    source = _payload(tmp_path, 12 * 1024**2)

    class FailsOnUpload:
        """Reads fine while hashed; breaks 6 MiB into the upload's second pass."""

        def __init__(self, handle: Any) -> None:
            self.handle, self.passes = handle, 0

        def read(self, size: int = -1) -> bytes:
            if self.passes and self.handle.tell() >= 6 * 1024**2:
                raise OSError("disk read error")
            return bytes(self.handle.read(size))

        def seek(self, offset: int, whence: int = 0) -> int:
            if offset == 0 and whence == 0:
                self.passes += 1
            return int(self.handle.seek(offset, whence))

        def tell(self) -> int:
            return int(self.handle.tell())

        def seekable(self) -> bool:
            return True

        def readable(self) -> bool:
            return True

    counts = _count_calls(client, "CreateMultipartUpload", "UploadPart", "AbortMultipartUpload",
                          "CompleteMultipartUpload")
    with source.open("rb") as handle, pytest.raises(OSError, match="disk read error"):
        store.put_stream(FailsOnUpload(handle))  # type: ignore[arg-type]
    assert counts["CreateMultipartUpload"] == 1
    assert counts["AbortMultipartUpload"] == 1 and counts["CompleteMultipartUpload"] == 0
    sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
    assert not store.exists(sha256)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_upload_store_commit_materialize_remove(client: Any, bucket: str,
                                                tmp_path: Path) -> None:
    uploads = S3UploadStore(client, bucket=bucket, staging_root=tmp_path / "uploads",
                            prefix="p", transfer=SMALL_PARTS)
    staged = uploads.staging_path()
    assert staged.parent == uploads.staging_dir == tmp_path / "uploads" / ".staging"
    staged.write_bytes(data := os.urandom(11 * 1024**2))
    uploads.commit("job1", staged)
    assert not staged.exists()
    head = client.head_object(Bucket=bucket, Key="p/uploads/job1.pt2")
    assert head["ContentLength"] == len(data) and head["ETag"].strip('"').endswith("-3")
    for share in (True, False):
        dest = tmp_path / f"input-{share}.pt2"
        uploads.materialize("job1", dest, share=share)
        assert dest.read_bytes() == data
    uploads.remove("job1")
    with pytest.raises(FileNotFoundError):
        uploads.materialize("job1", tmp_path / "gone.pt2", share=False)
    assert not (tmp_path / "gone.pt2").exists()
    (uploads.staging_dir / "leftover.pt2").write_bytes(b"x")
    assert uploads.discard_staged() == 1


def test_a_missing_bucket_is_named(client: Any, endpoint: str) -> None:
    with pytest.raises(ObjectStoreUnavailable, match="no such bucket") as caught:
        check_bucket(client, "no-such-bucket", endpoint)
    assert "no-such-bucket" in caught.value.message and endpoint in caught.value.message


@pytest.mark.usefixtures("endpoint")  # its credentials: the failure is the connection
def test_an_unreachable_store_is_a_service_error_within_seconds(tmp_path: Path) -> None:
    dead = make_client(endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1")
    artifacts = S3ArtifactStore(dead, bucket="lowering")
    uploads = S3UploadStore(dead, bucket="lowering", staging_root=tmp_path / "uploads")
    staged = uploads.staging_path()
    staged.write_bytes(b"program")
    source = _payload(tmp_path, 1000).open("rb")
    calls = [
        lambda: check_bucket(dead, "lowering", None),
        lambda: artifacts.exists("a" * 64),
        lambda: artifacts.is_intact("a" * 64),
        lambda: artifacts.put_stream(source),
        lambda: artifacts.fetch("a" * 64, tmp_path / "x.pt2"),
        lambda: artifacts.open_chunks("a" * 64),
        lambda: artifacts.remove("a" * 64),
        lambda: uploads.commit("job", staged),
        lambda: uploads.materialize("job", tmp_path / "y.pt2", share=False),
        lambda: uploads.remove("job"),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailable) as caught:
            call()
        assert time.monotonic() - started < 15
        error = caught.value
        assert error.code is ApiErrorCode.OBJECT_STORE_UNAVAILABLE and error.status == 503
        assert error.retry_after_s and "connect" in error.message.lower(), error.message
    source.close()
    assert staged.exists()  # a failed commit keeps the staged file for the caller to discard


def test_the_local_store_fetches_and_reads_a_private_copy(tmp_path: Path) -> None:
    from app.storage.artifacts import LocalArtifactStore

    store = LocalArtifactStore(tmp_path / "artifacts")
    with _payload(tmp_path, 3 * 1024**2 + 5).open("rb") as handle:
        ref = store.put_stream(handle)
    data = store.location(ref.sha256).read_bytes()
    assert b"".join(store.open_chunks(ref.sha256)) == data
    store.fetch(ref.sha256, copy := tmp_path / "copy.pt2")
    assert copy.read_bytes() == data and copy.stat().st_ino != \
        store.location(ref.sha256).stat().st_ino
    copy.write_bytes(b"changed")  # the copy is ours to change
    assert store.is_intact(ref.sha256)
    store.remove(ref.sha256)
    with pytest.raises(FileNotFoundError):
        store.open_chunks(ref.sha256)
    with pytest.raises(FileNotFoundError):
        store.fetch(ref.sha256, tmp_path / "gone.pt2")


@pytest.mark.usefixtures("endpoint")
def test_an_object_store_failure_during_a_job_is_a_clear_job_error(tmp_path: Path) -> None:
    """The supervisor's two object-store steps, the input handed over and the archive
    stored, fail the job ``storage_unavailable`` (not an internal error)."""
    from typing import cast

    from app.constants import ErrorCode
    from app.errors import JobError
    from app.settings import Settings
    from app.worker import JobContext, _collect, _hand_over
    from tests.factories import zip_bytes

    dead = make_client(endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1")
    ctx = JobContext(settings=Settings(data_dir=tmp_path / "data"), lifecycle=cast(Any, None),
                     uploads=S3UploadStore(dead, bucket="lowering",
                                           staging_root=tmp_path / "uploads"),
                     logs=cast(Any, None), artifacts=S3ArtifactStore(dead, bucket="lowering"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "artifact.pt2").write_bytes(zip_bytes({
        "archive/models/m.json": b"{}", "archive/models/m-aoti.json": b"{}",
        "archive/extra/provenance.json": b"{}"}))
    job = cast(Any, {"id": "j" * 32, "model_name": "m", "backend_id": "aoti",
                     "code_key": None})
    with pytest.raises(JobError) as stored:
        _collect(scratch, job, ctx)
    assert stored.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "archive could not be stored" in stored.value.message

    class Child:
        scratch = tmp_path / "scratch"
        may_hardlink_inputs = False

    with pytest.raises(JobError) as fetched:
        _hand_over(job, cast(Any, Child()), ctx)
    assert fetched.value.code == ErrorCode.STORAGE_UNAVAILABLE
    assert "upload could not be fetched" in fetched.value.message


def test_a_job_log_is_local_while_it_runs_and_in_the_bucket_once_sealed(
        client: Any, bucket: str, tmp_path: Path) -> None:
    from app.storage.files import LocalLogStore
    from app.storage.joblogs import S3LogStore

    logs = S3LogStore(client, bucket=bucket, prefix="p", local=LocalLogStore(tmp_path / "logs"))
    (tmp_path / "logs").mkdir()
    written = tmp_path / "child.log"
    written.write_text("".join(f"line {i}\n" for i in range(2000)))
    logs.adopt("j1", written)
    assert logs.tail("j1", 10) == "line 1999\n"  # the local file: the job runs here
    logs.seal("j1")
    assert not (tmp_path / "logs" / "j1.log").exists()
    assert logs.tail("j1", 10) == "line 1999\n"  # the bucket's, by a ranged GET
    whole = b"".join(logs.chunks("j1") or [])
    assert whole.startswith(b"line 0\n") and whole.count(b"\n") == 2000
    assert logs.chunks("nope") is None and logs.tail("nope", 100) == ""
    logs.remove("j1")
    assert logs.chunks("j1") is None
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_a_log_the_bucket_refuses_stays_on_the_host(tmp_path: Path) -> None:
    from app.storage.files import LocalLogStore
    from app.storage.joblogs import S3LogStore

    dead = make_client(endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1")
    logs = S3LogStore(dead, bucket="lowering", prefix="", local=LocalLogStore(tmp_path))
    (tmp_path / "child.log").write_text("compiling\n")
    logs.adopt("j2", tmp_path / "child.log")
    logs.seal("j2")  # logged, not raised: a job never fails for its log
    assert logs.tail("j2", 100) == "compiling\n"
