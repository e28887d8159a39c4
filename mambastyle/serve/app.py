"""The Ray Serve application: an HTTP API and a web page over :class:`~mambastyle.serve.studio.Studio`.

Routes (JSON errors ``{"error": {"reason", "message"}}``, never a stack trace):

- ``GET /healthz``: 200 once the models are loaded.
- ``POST /v1/invert``: the body is a photo (raw bytes) -> its code, pose, reconstruction MSE,
  aligned crop and reconstruction (base64 PNGs), and ``ref``, which names the inverted face in
  later edits while this replica remembers it.
- ``POST /v1/edit``: ``{"image": base64 | "ref": ... | "key": ..., "edits": [...], "mode": ...}``
  -> ``image/png``.
- ``GET /v1/directions``: the directions and their strength ranges.
- ``GET /``: the page (``page.html``).

Concurrent requests share model batches (``serve.batch``): a batch for encoding (uploads and,
in fuser mode, table keys) and one for rendering. Model work runs on one thread per replica, so
batches do not compete for the replica's CPUs; alignment runs beside it.
"""

import asyncio
import base64
import binascii
import functools
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from mambastyle.serve.studio import Face, RequestError, Studio, describe

log = logging.getLogger("mambastyle.serve")

api = FastAPI(title="mambastyle", docs_url=None, redoc_url=None, openapi_url=None)


def _error(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError):
    return _error(exc)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error(RequestError(exc.status_code, reason, str(exc.detail)))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    log.exception("request failed: %s %s", request.method, request.url.path)
    return _error(
        RequestError(500, "internal_error", f"{type(exc).__name__} (the server's log has the rest)")
    )


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) from a declared length over ``limit`` before any of it is
    read, else as soon as what arrives passes it. (Ray Serve's proxy buffers what a client sends
    before the replica reads it: an ingress in front should limit bodies too.)"""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "too_large", f"body of {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "too_large", f"body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name="Studio")
@serve.ingress(api)
class StudioDeployment:
    """One replica: the models, a thread for model work, the batch queues."""

    def __init__(self, params: dict, table: str | None = None, workdir: str | None = None):
        import os

        import torch

        from mambastyle.config import parse_params
        from mambastyle.runtime import worker_logging

        worker_logging()
        if workdir and os.path.isdir(workdir):
            # relative storage roots and tables mean the launching directory (as in the stages),
            # where it exists: a local instance, or nodes sharing a file system
            os.chdir(workdir)
        p = parse_params(params, "serve params")
        self.params = p.serve
        gpu = p.serve.num_gpus > 0 and torch.cuda.is_available()
        torch.set_num_threads(max(1, int(p.serve.num_cpus)))
        self.models = ThreadPoolExecutor(1, thread_name_prefix="models")
        # alignment (dlib, CPU-bound) for as many uploads at once as the replica has CPUs
        self.aligner = ThreadPoolExecutor(max(1, int(p.serve.num_cpus)), thread_name_prefix="align")
        # table lookups and request bodies (JSON, base64, hashing): off the event loop, bounded
        self.io = ThreadPoolExecutor(2, thread_name_prefix="requests")
        self.studio = Studio.from_params(p, table, device="cuda" if gpu else "cpu")
        self._encode.set_max_batch_size(p.serve.max_batch_size)
        self._encode.set_batch_wait_timeout_s(p.serve.batch_wait_timeout_s)
        self._render.set_max_batch_size(p.serve.max_batch_size)
        self._render.set_batch_wait_timeout_s(p.serve.batch_wait_timeout_s)
        log.info("serving %s", describe(self.studio))

    async def _off_loop(self, pool, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _encode(self, items: list[tuple]) -> list[Face]:
        faces, poses = zip(*items, strict=True)
        return await self._off_loop(self.models, self.studio.encode, list(faces), list(poses))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _render(self, items: list[tuple]) -> list:
        return await self._off_loop(self.models, self.studio.render, items)

    async def _upload(self, data: bytes) -> tuple[str, Face]:
        """An uploaded photo's face, from the cache or aligned (beside the models) and encoded."""
        ref = await self._off_loop(self.io, Studio.upload_id, data)
        face = self.studio.cached(ref)
        if face is None:
            aligned, pose = await self._off_loop(self.aligner, self.studio.align, data)
            face = await self._encode((aligned, pose))
            self.studio.remember(ref, face)
        return ref, face

    async def _key(self, key) -> Face:
        source = f"key:{key}"
        face = self.studio.cached(source)
        if face is None:
            w, pose, aligned = await self._off_loop(self.io, self.studio.row, key)
            if aligned is None:  # a table without a fuser: its code is all an edit needs
                face = Face(None, w, None, pose, table_w=w)
            else:  # fuser mode: the face re-encoded for its features, as the edit stage does
                face = await self._encode((aligned, pose))
                face.table_w = w  # W+ mode edits the table's own code
            self.studio.remember(source, face)
        return face

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", **self.studio.info, "mode": self.studio.mode}

    @api.get("/", response_class=HTMLResponse)
    async def page(self):
        return HTMLResponse(resources.files("mambastyle.serve").joinpath("page.html").read_text())

    @api.get("/v1/directions")
    async def directions(self):
        return {
            "directions": self.studio.directions(),
            "mode": self.studio.mode,
            "modes": ["w_plus", "fuser"] if self.studio.model is not None else ["w_plus"],
        }

    @api.post("/v1/invert")
    async def invert(self, request: Request):
        data = await _body(request, self.params.max_upload_bytes)
        if not data:
            raise RequestError(400, "empty_body", "POST the photo's bytes as the body")
        ref, face = await self._upload(data)
        if face.reconstruction is None:
            raise RequestError(500, "internal_error", "no reconstruction")
        return {"ref": ref, **(await self._off_loop(self.io, Studio.invert_response, face))}

    @api.post("/v1/edit")
    async def edit(self, request: Request):
        # a base64 photo up to the upload limit (a third larger), and the rest of a request
        raw = await _body(request, self.params.max_upload_bytes * 4 // 3 + 65536)
        # Objects and arrays cost Python memory many times their bytes: a request has one per
        # edit and a few more, so anything with more is refused before it is parsed.
        most = self.params.max_edits + 4
        if raw.count(b"{") > most or raw.count(b"[") > most:
            raise RequestError(
                400, "bad_json", f"more objects or arrays than a request of {most - 4} edits has"
            )
        try:
            body = await self._off_loop(self.io, json.loads, raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise RequestError(400, "bad_json", "the body is not JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "not_an_object", "the body must be a JSON object")
        unknown = set(body) - {"image", "ref", "key", "edits", "mode"}
        if unknown:
            raise RequestError(
                422, "unknown_field", f"unknown fields: {', '.join(sorted(map(str, unknown)))}"
            )
        sources = [k for k in ("image", "ref", "key") if body.get(k) is not None]
        if len(sources) != 1:
            raise RequestError(422, "bad_source", 'give exactly one of "image" (base64), "ref" or "key"')
        edits = self.studio.parse_edits(body.get("edits", []))
        mode = self.studio.check_mode(body.get("mode"))
        face = await self._source(sources[0], body[sources[0]])
        png = await self._render((face, edits, mode))
        return Response(png, media_type="image/png")

    async def _source(self, kind: str, value) -> Face:
        if kind == "key":
            return await self._key(value)
        if not isinstance(value, str):
            raise RequestError(422, "bad_source", f'"{kind}" must be a string')
        if kind == "ref":
            face = None if value.startswith("key:") else self.studio.cached(value)
            if face is None:
                raise RequestError(404, "unknown_ref", "this ref is not (or no longer) held: send the image")
            return face
        try:
            data = await self._off_loop(self.io, functools.partial(base64.b64decode, validate=True), value)
        except (binascii.Error, ValueError):
            raise RequestError(422, "bad_image", '"image" must be base64') from None
        if not data:
            raise RequestError(400, "empty_body", '"image" is empty')
        if len(data) > self.params.max_upload_bytes:
            raise RequestError(
                413, "too_large", f"image of {len(data)} bytes; the limit is {self.params.max_upload_bytes}"
            )
        return (await self._upload(data))[1]


def build(params, table: str | None = None):
    """The Serve application for validated ``params`` (``serve`` section: replicas, CPUs and GPUs);
    relative paths in them are taken from this process's working directory."""
    import os

    from mambastyle.config import to_dict

    sp = params.serve
    options = {"num_cpus": sp.num_cpus, **({"num_gpus": sp.num_gpus} if sp.num_gpus else {})}
    # models load in the replica's constructor: give it time on a cold node
    return StudioDeployment.options(
        num_replicas=sp.replicas,
        ray_actor_options=options,
        max_ongoing_requests=max(16, 4 * sp.max_batch_size),
        health_check_timeout_s=120,
    ).bind(to_dict(params), table, os.getcwd())


def app_builder(args: dict):
    """For ``serve run`` / ``serve deploy`` config files: ``args`` may name ``params`` (a
    params.yaml path, default ``params.yaml``) and ``table`` (a latent table URI)."""
    from mambastyle.config import load_params

    return build(load_params(args.get("params", "params.yaml")), args.get("table"))
