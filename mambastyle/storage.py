"""URIs -> one filesystem object, for every stage, Ray Data and Ray Train alike.

``data/...``, ``/abs/path`` and ``file://...`` are local; ``s3://bucket/prefix`` is S3 (or
MinIO, moto, ... with an explicit endpoint). Credentials come only from the standard AWS
chain (environment, shared config/credentials files, ``profile``, instance roles) and are
never logged or stored in params.

Writes are whole-object and atomic: a local file is written to a temporary name in the
same directory and renamed; an S3 object becomes visible only when its upload completes.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs


@dataclass(frozen=True)
class StorageOptions:
    """Where S3 lives; mirrors the ``storage`` section of params.yaml (minus ``root``)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    retries: int = 5


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem, the path inside it, and the URI it came from."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return isinstance(self.fs, pafs.S3FileSystem)

    def join(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        uri = (self.uri.rstrip("/") + "/" + "/".join(parts)) if parts else self.uri
        return Location(self.fs, path, uri)


def _s3_filesystem(options: StorageOptions) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": options.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max(1, options.retries)),
    }
    if options.endpoint_url:
        parsed = urlparse(options.endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(
                f"storage.endpoint_url must be http(s)://host[:port], got {options.endpoint_url!r}"
            )
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    if options.profile:
        # A named profile is resolved by boto3's standard chain; only the resulting
        # credentials are handed on (and never printed).
        import boto3

        creds = boto3.Session(profile_name=options.profile).get_credentials()
        if creds is None:
            raise ValueError(f"AWS profile {options.profile!r} has no credentials")
        frozen = creds.get_frozen_credentials()
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, options: StorageOptions | None = None) -> Location:
    """Turns a URI into a :class:`Location` (filesystem + path).

    Raises:
        ValueError: unsupported scheme or malformed S3 URI.
    """
    options = options or StorageOptions()
    parsed = urlparse(str(uri))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"S3 URI needs a bucket: {uri!r}")
        path = posixpath.join(parsed.netloc, parsed.path.lstrip("/")).rstrip("/")
        return Location(_s3_filesystem(options), path, f"s3://{path}")
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        local = parsed.path if parsed.scheme == "file" else str(uri)
        path = os.path.abspath(os.path.expanduser(local))
        return Location(pafs.LocalFileSystem(), path, path)
    raise ValueError(f"unsupported storage URI {uri!r}: use a local path, file://... or s3://bucket/prefix")


def write_bytes(loc: Location, data: bytes | list[bytes], durable: bool = True) -> None:
    """Writes ``data`` (bytes, or a list of pieces written one after the other) as one whole
    object at ``loc`` (atomic: never visible half-written).

    Local files are fsynced (file and directory) unless ``durable=False``, so that a
    manifest that survives a power loss never points at shards that did not.
    """
    pieces = data if isinstance(data, list) else [data]
    if loc.is_s3:
        with loc.fs.open_output_stream(loc.path) as f:  # visible only once the upload completes
            for piece in pieces:
                f.write(piece)
        return
    parent = posixpath.dirname(loc.path)
    loc.fs.create_dir(parent, recursive=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(loc.path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.writelines(pieces)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, loc.path)  # readers see the old object or the whole new one
        if durable:  # make the rename itself survive a crash
            fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def list_files(loc: Location, recursive: bool = True) -> list[str]:
    """Paths of the files below ``loc`` (sorted); empty when it does not exist."""
    return [path for path, _ in list_versions(loc, recursive)]


def list_versions(loc: Location, recursive: bool = True) -> list[tuple[str, str]]:
    """(path, version) of the files below ``loc`` (sorted by path; empty when it does not exist).

    A version is the file's size and modification time as the listing reports them (an S3
    object's last-modified time): it changes when the file is rewritten, so an earlier run's
    record of it tells whether the file is still the one that run read, without reading it.
    """
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.File:
        return [(loc.path, _version(info))]
    if info.type == pafs.FileType.NotFound:
        return []
    selector = pafs.FileSelector(loc.path, recursive=recursive, allow_not_found=True)
    infos = [i for i in loc.fs.get_file_info(selector) if i.type == pafs.FileType.File]
    return sorted((i.path, _version(i)) for i in infos)


def _version(info: pafs.FileInfo) -> str:
    return f"{info.size}:{info.mtime_ns}"


def delete(loc: Location) -> None:
    if exists(loc):
        loc.fs.delete_file(loc.path)
