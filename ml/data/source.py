"""Where a retraining reads its raw data from, refreshed before prepare runs.

Supported sources: ``sklearn:<name>`` (a built-in dataset), a local ``.csv``/``.parquet`` path, and
an ``s3://bucket/key.csv|.parquet`` object. An S3 object is downloaded (boto3; the endpoint and
credentials from the AWS environment: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for an
S3-compatible server, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` or a role)
to a local copy that prepare reads like any file. Every failure is one :class:`DataError` line
naming the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ml.data.prepare import SKLEARN_PREFIX
from ml.errors import DataError
from ml.storage import CREDENTIAL_SOURCES, is_s3_url, split_s3_url

SUFFIXES = (".csv", ".parquet")
SUPPORTED = "sklearn:<name>, a local .csv/.parquet path or s3://bucket/key.csv|.parquet"


@dataclass(frozen=True)
class FetchedSource:
    """``uri`` as given and ``local``, what prepare reads (``uri`` itself unless it was downloaded)."""

    uri: str
    local: str


def fetch_source(uri: str, download_dir: str | Path, *, timeout_s: float = 30.0) -> FetchedSource:
    """Checks ``uri`` is readable and, for S3, downloads it under ``download_dir/<bucket>/<key>``
    (written beside and renamed, so a failed download leaves the previous copy)."""
    if uri.startswith(SKLEARN_PREFIX):
        return FetchedSource(uri, uri)
    if is_s3_url(uri):
        return FetchedSource(uri, str(download_s3(uri, Path(download_dir), timeout_s)))
    if "://" in uri:
        raise DataError(f"source {uri!r}: unsupported scheme; expected {SUPPORTED}")
    path = Path(uri)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"source {uri}: suffix {path.suffix!r}; expected .csv or .parquet")
    if not path.is_file():
        raise DataError(f"source {uri}: no such file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise DataError(f"source {uri}: cannot read it ({exc.strerror or exc})") from None
    return FetchedSource(uri, uri)


def download_s3(uri: str, download_dir: Path, timeout_s: float) -> Path:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    bucket, key = split_s3_url(uri)
    if not bucket or not key or Path(key).suffix.lower() not in SUFFIXES:
        raise DataError(f"source {uri!r}: expected s3://bucket/key.csv or s3://bucket/key.parquet")
    target = download_dir / bucket / key
    partial = target.with_name(target.name + ".partial")
    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 2})
    client = boto3.client("s3", config=config)
    at = client.meta.endpoint_url
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(partial))
        partial.replace(target)
    except NoCredentialsError:
        raise DataError(f"source {uri}: no S3 credentials ({CREDENTIAL_SOURCES})") from None
    except EndpointConnectionError:
        raise DataError(f"source {uri}: cannot reach the S3 endpoint {at}") from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        what = {"404": "no such key", "NoSuchKey": "no such key", "NoSuchBucket": "no such bucket",
                "403": "access denied", "AccessDenied": "access denied"}.get(code, code or str(exc))
        raise DataError(f"source {uri}: {what} at {at}") from None
    except (BotoCoreError, OSError) as exc:
        raise DataError(f"source {uri}: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return target
