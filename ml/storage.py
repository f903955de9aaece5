"""S3 locations shared by every store that can live in a bucket (the MLflow server's artifacts, the
DVC remote): parsing ``s3://bucket/prefix`` and checking, before any work starts, that the bucket
exists and that this process's credentials may read it, as one line naming the bucket.

boto3 is imported when a check runs.
"""

from __future__ import annotations

from ml.errors import PipelineError

S3_SCHEME = "s3://"
CREDENTIAL_SOURCES = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role"


class StorageError(PipelineError):
    """A bucket that is missing, unreachable or refused to this process's credentials."""


def is_s3_url(url: str) -> bool:
    return url.startswith(S3_SCHEME)


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``; the bucket is empty when absent."""
    bucket, _, prefix = url.removeprefix(S3_SCHEME).partition("/")
    return bucket, prefix.strip("/")


def check_bucket(url: str, endpoint_url: str | None = None, *, label: str = "bucket", for_whom: str = "",
                 timeout_s: float = 5.0, error: type[PipelineError] = StorageError,
                 unreachable: type[PipelineError] | None = None) -> None:
    """Checks that the bucket of ``url`` (``s3://bucket/prefix``) exists and that this process's S3
    credentials may read it; raises ``error`` with one line otherwise.

    Args:
        url: the location; only its bucket is checked.
        endpoint_url: an S3-compatible server, or None for AWS.
        label: what the bucket holds, first in the message (``artifacts``: "artifacts bucket B at E: ...").
        for_whom: who needs the credentials, after "no S3 credentials" (" for the server").
        timeout_s: connect and read timeout; one attempt, no retries.
        error: the exception class raised (a caller's own subclass of PipelineError).
        unreachable: the class raised when the endpoint does not answer, for a caller that retries
            that but not a refusal (default: ``error``).
    """
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    bucket, _ = split_s3_url(url)
    if not is_s3_url(url) or not bucket:
        raise error(f"{label} {url!r}: expected s3://bucket/prefix")
    at = endpoint_url or "AWS S3"
    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 1})
    try:
        boto3.client("s3", endpoint_url=endpoint_url, config=config).head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise error(f"{label} bucket {bucket} at {at}: no S3 credentials{for_whom} ({CREDENTIAL_SOURCES})") from None
    except EndpointConnectionError:
        raise (unreachable or error)(f"{label} bucket {bucket}: cannot reach the S3 endpoint {at}") from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise error(f"{label} bucket {bucket} at {at}: no such bucket") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise error(f"{label} bucket {bucket} at {at}: access denied; wrong S3 credentials "
                        "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) or no permission on the bucket") from None
        raise error(f"{label} bucket {bucket} at {at}: {code or exc}") from None
    except BotoCoreError as exc:
        raise error(f"{label} bucket {bucket} at {at}: {exc}") from None
