"""One-shot of docker-compose.yml: make sure LOWERING_S3_BUCKET exists, then exit 0.

The service checks its bucket at start (HeadBucket) and refuses to start without it, but
never creates one: creating buckets is a deployment's job. This runs in the service's own
image (boto3 is a dependency) with the same LOWERING_S3_* settings and AWS_* credentials as
the API and the workers, so a bucket it can create is one they can use. It retries while
the endpoint is still coming up, and adds a rule that aborts multipart uploads left
incomplete for a day (a process killed mid-upload); a server without lifecycle support
only gets a warning.
"""

from __future__ import annotations

import sys
import time

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.settings import Settings

ATTEMPTS = 30
RETRY_S = 2.0
MISSING = {"404", "NoSuchBucket", "NotFound"}
ABORT_INCOMPLETE = {"Rules": [{
    "ID": "abort-incomplete-multipart-uploads", "Status": "Enabled", "Filter": {"Prefix": ""},
    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
}]}


def ensure_bucket(client, bucket: str, region: str) -> bool:  # type: ignore[no-untyped-def]
    """True when the bucket was created, False when it was already there."""
    try:
        client.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) not in MISSING:
            raise
    kwargs = {} if region == "us-east-1" else {
        "CreateBucketConfiguration": {"LocationConstraint": region}}
    client.create_bucket(Bucket=bucket, **kwargs)
    try:
        client.put_bucket_lifecycle_configuration(Bucket=bucket,
                                                  LifecycleConfiguration=ABORT_INCOMPLETE)
    except ClientError as exc:
        print(f"create_bucket: no lifecycle rule on {bucket!r}: {exc}", file=sys.stderr)
    return True


def main() -> int:
    settings = Settings()
    client = boto3.session.Session().client(
        "s3", endpoint_url=settings.s3_endpoint_url,
        config=Config(region_name=settings.s3_region, signature_version="s3v4",
                      s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
                      connect_timeout=3, read_timeout=30, retries={"max_attempts": 1}))
    where = settings.s3_endpoint_url or "AWS S3"
    for attempt in range(1, ATTEMPTS + 1):
        try:
            created = ensure_bucket(client, settings.s3_bucket, settings.s3_region)
        except (BotoCoreError, ClientError) as exc:
            if attempt == ATTEMPTS or isinstance(exc, ClientError):
                print(f"create_bucket: bucket {settings.s3_bucket!r} at {where}: {exc}",
                      file=sys.stderr)
                return 1
            time.sleep(RETRY_S)  # the endpoint is still starting
            continue
        print(f"bucket {settings.s3_bucket!r} at {where}: "
              f"{'created' if created else 'already there'}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
