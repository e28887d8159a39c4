"""Storage URIs: local paths and S3 (moto on loopback) through one filesystem object."""

from __future__ import annotations

import boto3
import pyarrow.fs as pafs
import pytest

from mambastyle.storage import (
    StorageOptions,
    delete,
    exists,
    list_files,
    list_versions,
    read_bytes,
    resolve,
    write_bytes,
)


def test_local_round_trip_and_atomic_write(tmp_path):
    loc = resolve(str(tmp_path / "a" / "b.bin"))
    assert isinstance(loc.fs, pafs.LocalFileSystem) and not loc.is_s3
    write_bytes(loc, b"hello")
    assert read_bytes(loc) == b"hello"
    write_bytes(loc, b"world")  # replaces whole
    assert read_bytes(loc) == b"world"
    assert [p.rsplit("/", 1)[-1] for p in list_files(resolve(str(tmp_path)))] == [
        "b.bin"
    ]  # no temp files left
    assert resolve(f"file://{tmp_path}/a/b.bin").path == loc.path
    delete(loc)
    assert not exists(loc)
    assert list_files(resolve(str(tmp_path / "missing"))) == []


def test_s3_round_trip_against_moto(s3):
    endpoint, bucket = s3
    opts = StorageOptions(endpoint_url=endpoint)
    root = resolve(f"s3://{bucket}/prefix/", opts)
    assert root.is_s3 and root.path == f"{bucket}/prefix" and root.uri == f"s3://{bucket}/prefix"
    obj = root.join("x", "y.bin")
    write_bytes(obj, b"\x00payload")
    assert read_bytes(obj) == b"\x00payload"
    # the same object through boto3 (the AWS chain's credentials, explicit endpoint)
    body = (
        boto3.client("s3", endpoint_url=endpoint)
        .get_object(Bucket=bucket, Key="prefix/x/y.bin")["Body"]
        .read()
    )
    assert body == b"\x00payload"
    assert list_files(root) == [f"{bucket}/prefix/x/y.bin"]
    [(path, version)] = list_versions(root)
    write_bytes(obj, b"\x00payload, rewritten")
    assert list_versions(root) != [(path, version)] and list_versions(root)[0][0] == path
    delete(obj)
    assert not exists(obj)


def test_a_files_version_changes_when_it_is_rewritten_and_only_then(tmp_path):
    import os

    for name in ("b.bin", "a/c.bin", "a.bin"):
        write_bytes(resolve(str(tmp_path / name)), name.encode())
    root = resolve(str(tmp_path))
    listed = list_versions(root)
    assert [p for p, _ in listed] == list_files(root) == sorted(list_files(root))
    assert list_versions(root) == listed  # listing again changes nothing
    assert list_versions(root.join("a.bin")) == [listed[0]]  # a file lists itself
    assert [p for p, _ in list_versions(root, recursive=False)] == [
        root.join(n).path for n in ("a.bin", "b.bin")
    ]
    write_bytes(root.join("b.bin"), b"longer content")  # another size
    then = os.stat(tmp_path / "a.bin").st_mtime_ns
    os.utime(tmp_path / "a.bin", ns=(then, then + 10**9))  # same bytes, written again a second later
    now = dict(list_versions(root))
    changed = {p for p, v in listed if now[p] != v}
    assert changed == {root.join("b.bin").path, root.join("a.bin").path}


def test_bad_uris():
    with pytest.raises(ValueError, match="unsupported storage URI"):
        resolve("gs://bucket/x")
    with pytest.raises(ValueError, match="needs a bucket"):
        resolve("s3:///x")
    with pytest.raises(ValueError, match="endpoint_url"):
        resolve("s3://b/x", StorageOptions(endpoint_url="127.0.0.1:9000"))


def test_credentials_are_not_in_reprs(s3):
    endpoint, bucket = s3
    loc = resolve(f"s3://{bucket}/p", StorageOptions(endpoint_url=endpoint))
    assert "testing" not in repr(loc) and "testing" not in str(loc.fs)


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server that fails chosen requests.

    ``fail`` decides per request (method, path) whether to answer 500 or drop the
    connection instead of forwarding; bodies are forwarded byte for byte (chunked framing
    included, as S3 clients send aws-chunked payloads).
    """

    def __init__(self, upstream: str):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        host, port = urlparse(upstream).hostname, urlparse(upstream).port
        self.fail = lambda method, path: None  # -> None | "500" | "drop"
        self.failures: list[tuple[str, str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> tuple[bytes, bool]:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    n = int(self.headers.get("Content-Length") or 0)
                    return (self.rfile.read(n) if n else b""), False
                raw = b""
                while True:
                    line = self.rfile.readline()
                    raw += line
                    if int(line.strip().split(b";")[0], 16) == 0:
                        while True:
                            trailer = self.rfile.readline()
                            raw += trailer
                            if not trailer.strip():
                                return raw, True
                    raw += self.rfile.read(int(line.strip().split(b";")[0], 16) + 2)

            def _any(self):
                body, chunked = self._body()
                action = proxy.fail(self.command, self.path)
                if action:
                    proxy.failures.append((self.command, self.path, action))
                    if action == "drop":
                        self.close_connection = True
                        self.connection.close()
                        return
                    self.send_response(500)
                    msg = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(host, port, timeout=30)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    conn.putheader(k, v)
                conn.endheaders()
                conn.send(body)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection") and not (
                        k.lower() == "content-length" and self.command != "HEAD"
                    ):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky(s3):
    endpoint, bucket = s3
    proxy = FlakyProxy(endpoint)
    yield proxy, endpoint, bucket
    proxy.close()


def _is_upload(method, path):
    return method == "PUT" or (method == "POST" and "uploadId=" in path)


@pytest.mark.parametrize("mode", ["500", "drop"])
def test_failed_upload_is_retried_and_never_visible_half_done(flaky, mode):
    proxy, endpoint, bucket = flaky
    direct = boto3.client("s3", endpoint_url=endpoint)
    visible_during_failure = []

    def fail_first_upload(method, path):
        if _is_upload(method, path) and not proxy.failures:
            keys = [o["Key"] for o in direct.list_objects_v2(Bucket=bucket).get("Contents", [])]
            visible_during_failure.append("shards/a.tar" in keys)
            return mode
        return None

    proxy.fail = fail_first_upload
    loc = resolve(f"s3://{bucket}/shards/a.tar", StorageOptions(endpoint_url=proxy.endpoint))
    payload = bytes(range(256)) * 4000
    write_bytes(loc, payload)
    assert len(proxy.failures) == 1 and visible_during_failure == [False]
    assert direct.get_object(Bucket=bucket, Key="shards/a.tar")["Body"].read() == payload


def test_upload_that_keeps_failing_raises_and_leaves_nothing(flaky):
    proxy, endpoint, bucket = flaky
    proxy.fail = lambda method, path: "500" if _is_upload(method, path) else None
    loc = resolve(f"s3://{bucket}/shards/b.tar", StorageOptions(endpoint_url=proxy.endpoint, retries=2))
    with pytest.raises(OSError):
        write_bytes(loc, b"x" * 10000)
    assert len(proxy.failures) >= 2  # retried before giving up
    direct = boto3.client("s3", endpoint_url=endpoint)
    assert "Contents" not in direct.list_objects_v2(Bucket=bucket, Prefix="shards/")
