"""`virst serve`: the runtime behind HTTP (FastAPI + uvicorn).

    POST   /v1/videos                 upload (multipart "file": a video or a frame archive)
                                      or {"path": ...} under --media-root -> {id, frames, ...}
    POST   /v1/videos/{id}/segment    {"expressions": [...]} -> NDJSON, one line per frame
                                      as soon as it is known, then a summary line
                                      (?stream=false: one JSON document)
    GET    /v1/videos/{id}, DELETE /v1/videos/{id}
    GET    /healthz (alive), /readyz (model loaded and warmed), /metrics (Prometheus)

One segmentation runs at a time (the runtime uses every core it is given); up to
`max_queue` more wait, beyond that the answer is 429 with Retry-After. A request past its
deadline, or whose client went away, stops at the next frame and frees its place.
Several expressions share one pass; later requests on a video reuse its cached features.
At most `max_uploads` uploads are received and validated at once (more: 429); a video
with more frames, larger frames or a larger archive than `limits` is refused with 413
before its frames are decoded (runtime/store.py).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import hmac
import json
import logging
import logging.handlers
import queue
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from runtime.store import Limits, NotAVideo, TooLarge, VideoStore
from runtime.threads import Handoff
from runtime.writer import frame_record
from virst.errors import InputError, VideoError, VirstError

log = logging.getLogger("virst.serve")


def log_off_the_event_loop(handler: logging.Handler | None = None):
    """Every log line goes through a queue to a listener thread (stderr by default): the
    request log is written from the event loop, and a slow or unread stderr pipe must not
    stall the server (measured: a full pipe froze one mid-run)."""
    lines = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(lines, handler or logging.StreamHandler())
    listener.start()
    atexit.register(listener.stop)
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(lines)]
    root.setLevel(logging.INFO)
    return listener


@dataclass
class ServeConfig:
    store: Path = Path.home() / ".cache" / "virst" / "videos"
    media_root: Path | None = None
    max_upload_mb: float = 512
    max_uploads: int = 4  # uploads received or validated at once; beyond, 429
    max_store_gb: float | None = None  # beyond, the least recently used videos are deleted
    limits: Limits = Limits()  # frames, frame size, an archive's uncompressed size
    max_queue: int = 8
    deadline_s: float = 600
    max_expressions: int = 8
    max_unstreamed: int = 20_000  # frames x expressions of one ?stream=false answer
    sessions: int = 4  # videos whose features stay cached
    api_keys: list[str] = field(default_factory=list)

    def __post_init__(self):
        """A setting that would turn every request away is refused, naming its flag
        (`least` None: must be positive; a setting of None is off)."""
        for flag, value, least in (
                ("--max-upload-mb", self.max_upload_mb, None),
                ("--max-uploads", self.max_uploads, 1), ("--max-queue", self.max_queue, 0),
                ("--deadline-s", self.deadline_s, None),
                ("--max-expressions", self.max_expressions, 1),
                ("--max-unstreamed", self.max_unstreamed, 1),
                ("--sessions", self.sessions, 1), ("--max-frames", self.limits.frames, 1),
                ("--max-megapixels", self.limits.megapixels, None),
                ("--max-extracted-mb", self.limits.extracted_mb, None),
                ("--max-store-gb", self.max_store_gb, None)):
            if value is not None and not (value > 0 if least is None else value >= least):
                must = "positive" if least is None else f"at least {least}"
                raise InputError(f"{flag} must be {must}, not {value}")


def read_api_keys(path: str | Path) -> list[str]:
    keys = [line.strip() for line in Path(path).read_text().splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise InputError(f"{path} holds no API key")
    return keys


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("virst_requests", "HTTP requests", ["route", "status"],
                                registry=r)
        self.queue = Gauge("virst_queue_depth", "segmentations waiting", registry=r)
        self.uploads = Gauge("virst_uploads_in_progress", "uploads received or validated",
                             registry=r)
        self.in_flight = Gauge("virst_in_flight", "segmentations running", registry=r)
        self.latency = Histogram("virst_request_seconds", "request latency", ["route"],
                                 registry=r, buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60,
                                                      120, 300))
        self.stage = Histogram("virst_stage_seconds", "seconds per pipeline stage", ["stage"],
                               registry=r, buckets=(.001, .01, .05, .1, .5, 1, 5, 30))
        self.fps = Histogram("virst_frames_per_second", "frames per second of a request",
                             registry=r, buckets=(1, 5, 10, 20, 50, 100, 200, 500))
        self.frames = Counter("virst_frames", "frames segmented", registry=r)
        self.evicted = Counter("virst_videos_evicted", "videos deleted to keep the store "
                               "within --max-store-gb", registry=r)
        self.cache_hits = Counter("virst_cache_hits", "requests served from cached video "
                                                      "features", registry=r)
        self.errors = Counter("virst_errors", "errors by kind", ["kind"], registry=r)
        self.retries = Counter("virst_replica_retries", "requests retried on another replica",
                               registry=r)


class _Stopped(Exception):
    """Pass 1 stopped: past the deadline, or nobody waits for the answer."""


class Segmenter:
    """Segmentation requests on one `Runtime`, with the sessions (cached features) of the
    videos asked about most recently. Used by the local worker thread and by each Ray
    Serve replica alike."""

    def __init__(self, runtime, sessions: int = 4):
        self.rt, self.max_sessions = runtime, sessions
        self.sessions: OrderedDict = OrderedDict()

    def session(self, video_id: str, source: str):
        """(session, cached?) for a video."""
        if video_id in self.sessions:
            self.sessions.move_to_end(video_id)
            return self.sessions[video_id], True
        session = self.rt.session(source)
        self.sessions[video_id] = session
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        return session, False

    def forget(self, video_id: str) -> None:
        self.sessions.pop(video_id, None)

    def warm_up(self) -> None:
        """Run the model once on a small clip, so that the first request is not slow."""
        import numpy as np

        frames = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
        for _ in self.rt.session(frames).segment(["the red circle"]):
            pass

    def segment(self, video_id: str, source: str, expressions: list[str],
                deadline: float = float("inf"), cancelled=lambda: False):
        """Frame records as they are known, then {"summary": ...}; {"error", "status"} when
        the deadline passes (the generator's consumer stops it by closing it). Pass 1,
        which reads the whole video before the first frame (minutes on a long one), stops
        at its next sampled frame once the deadline passes or `cancelled()` says so."""
        start = time.perf_counter()
        session, cached = self.session(video_id, source)
        before = dict(session.timers.seconds)
        frames = 0

        def check():
            if cancelled() or time.perf_counter() > deadline:
                raise _Stopped

        session.on_sampled = check
        try:
            for fm in session.segment(expressions):
                if time.perf_counter() > deadline:
                    yield {"error": f"deadline exceeded after {frames} of {session.length} "
                                    f"frames", "status": 504}
                    return
                yield frame_record(fm)
                frames += 1
        except _Stopped:  # the session holds no features: the next request starts anew
            self.forget(video_id)
            if not cancelled():
                yield {"error": f"deadline exceeded while reading the video's "
                                f"{session.length} frames, before the first mask",
                       "status": 504}
            return
        finally:
            session.on_sampled = None
        seconds = time.perf_counter() - start
        stages = {k: round(v - before.get(k, 0.0), 4) for k, v in session.timers.seconds.items()}
        yield {"summary": {"video": video_id, "frames": frames, "expressions": expressions,
                           "seconds": round(seconds, 3), "cached": cached,
                           "fps": round(frames / max(seconds, 1e-9), 2), "stages": stages}}


class LocalWorker:
    """Runs the `Segmenter` on one thread of this process, one request at a time; results
    reach the event loop through a bounded queue (a slow client slows the job down, memory
    stays flat) and a client that leaves stops the job at the next frame."""

    concurrency = 1

    def __init__(self, runtime, sessions: int):
        self.segmenter = Segmenter(runtime, sessions)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="virst-worker")
        self.describe = runtime.describe
        self.build_prompt = runtime.build_prompt

    async def warm_up(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self.executor,
                                                         self.segmenter.warm_up)

    def forget(self, video_id: str) -> None:
        self.segmenter.forget(video_id)

    async def stream(self, record, expressions: list[str], deadline: float):
        handoff = Handoff(32)

        def run():
            try:
                for item in self.segmenter.segment(record.id, record.source, expressions,
                                                   deadline, handoff.stopped.is_set):
                    if not handoff.put(item):
                        return  # the client went away: stop here, free the worker
            except VirstError as err:
                handoff.put({"error": str(err), "status": 422})
            except Exception as err:  # reported to the client, logged with its traceback
                log.exception("segmentation failed")
                handoff.put({"error": f"internal error: {type(err).__name__}", "status": 500})
            finally:
                handoff.put(None)

        work = asyncio.get_running_loop().run_in_executor(self.executor, run)
        try:
            while True:
                try:
                    item = handoff.queue.get_nowait()
                except queue.Empty:
                    await asyncio.sleep(0.005)
                    continue
                if item is None:
                    break
                yield item
        finally:
            handoff.stop()
            await asyncio.shield(work)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class Server:
    """The HTTP side: the store, the queue, metrics; the work itself is the worker's."""

    def __init__(self, worker, config: ServeConfig):
        self.worker, self.cfg = worker, config
        self.store = VideoStore(config.store, config.limits)
        self.metrics = Metrics()
        self.waiting = 0
        self.uploading = 0
        self.in_use: collections.Counter = collections.Counter()  # video id -> requests
        self.slots = asyncio.Semaphore(worker.concurrency)
        self.ready = False

    def check_expressions(self, body: dict) -> list[str]:
        exprs = body.get("expressions") if isinstance(body, dict) else None
        if not isinstance(exprs, list) or not exprs or not all(isinstance(e, str) for e in exprs):
            raise HTTPException(422, "give {\"expressions\": [\"...\", ...]}: a non-empty list "
                                     "of strings")
        if len(exprs) > self.cfg.max_expressions:
            raise HTTPException(422, f"{len(exprs)} expressions; at most "
                                     f"{self.cfg.max_expressions} per request")
        for text in exprs:
            try:
                self.worker.build_prompt(text)
            except InputError as err:
                raise HTTPException(422, str(err)) from err
        return exprs

    def observe(self, item: dict, request_info: dict) -> None:
        m = self.metrics
        if "summary" in item:
            summary = item["summary"]
            for stage, value in summary["stages"].items():
                m.stage.labels(stage).observe(value)
            m.frames.inc(summary["frames"])
            m.fps.observe(summary["fps"])
            if summary.get("cached"):
                m.cache_hits.inc()
            request_info.update(frames=summary["frames"], fps=summary["fps"],
                                stages=summary["stages"])
        elif "error" in item:
            m.errors.labels("deadline" if item.get("status") == 504 else "segmentation").inc()

    async def results(self, record, expressions: list[str], request_info: dict):
        """Wait for a slot, run, yield the results; a client that leaves (this generator
        closed) stops the work and frees the slot."""
        queued, finished = True, False
        deadline = time.perf_counter() + self.cfg.deadline_s
        try:
            async with self.slots:
                self.waiting -= 1
                queued = False
                self.metrics.queue.set(self.waiting)
                self.metrics.in_flight.inc()
                try:
                    async for item in self.worker.stream(record, expressions, deadline):
                        self.observe(item, request_info)
                        yield item
                    finished = True
                finally:
                    self.metrics.in_flight.dec()
        finally:
            if queued:
                self.waiting -= 1
                self.metrics.queue.set(self.waiting)
            if not finished:
                self.metrics.errors.labels("client_gone").inc()
            self.in_use[record.id] -= 1
            if self.in_use[record.id] <= 0:
                del self.in_use[record.id]

    async def evict(self, added: str) -> None:
        """Keep the store within `max_store_gb`: the least recently used videos go, never
        one a request waits for or runs on, nor the one just added."""
        if self.cfg.max_store_gb is None:
            return
        keep = {added, *self.in_use}
        try:
            evicted = await asyncio.get_running_loop().run_in_executor(
                None, self.store.evict, int(self.cfg.max_store_gb * (1 << 30)), keep)
        except OSError:  # the upload itself succeeded: its answer stands
            log.exception("evicting videos from the store failed")
            return
        for video_id in evicted:
            self.worker.forget(video_id)
            self.metrics.evicted.inc()
            log.info(json.dumps({"evicted": video_id}))


def create_app(runtime, config: ServeConfig, warm: bool = True, worker=None) -> FastAPI:
    """The HTTP app over `runtime` (a local worker thread), or over `worker` (Ray Serve
    replicas, runtime/scale.py)."""
    worker = worker or LocalWorker(runtime, config.sessions)
    server = Server(worker, config)
    worker.metrics = server.metrics

    async def lifespan(app):
        if warm:
            await worker.warm_up()
        server.ready = True
        yield
        worker.close()

    app = FastAPI(title="VIRST", lifespan=lifespan)
    app.state.server = server
    m = server.metrics

    def authorize(request: Request) -> None:
        if not config.api_keys:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        ok = False
        for key in config.api_keys:  # every key compared, in constant time each
            ok |= hmac.compare_digest(token.encode(), key.encode())
        if not ok:
            raise HTTPException(401, "missing or invalid API key",
                                headers={"WWW-Authenticate": "Bearer"})

    def observe(app):  # starlette builds middleware as cls(app=...) or cls(app)
        """Request id, metrics and the JSON log line of every request, once its body is sent
        or the client has gone. Plain ASGI (it wraps `send`): a wrapper around a streamed
        body's iterator is closed only by the garbage collector when the client leaves, and
        the work it feeds kept its slot until then."""

        async def app_with_observation(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            request_id = uuid.uuid4().hex[:12]
            scope.setdefault("state", {}).update(id=request_id, info={})
            start, status = time.perf_counter(), 500

            async def send_with_id(message):
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message["headers"] = [*message.get("headers", []),
                                          (b"x-request-id", request_id.encode())]
                await send(message)

            try:
                await app(scope, receive, send_with_id)
            finally:
                route = scope.get("route")
                name = route.path if route is not None else "unmatched"
                seconds = time.perf_counter() - start
                m.requests.labels(name, str(status)).inc()
                m.latency.labels(name).observe(seconds)
                log.info(json.dumps({"request": request_id, "method": scope["method"],
                                     "route": name, "status": status,
                                     "seconds": round(seconds, 4),
                                     **scope["state"]["info"]}))

        return app_with_observation

    app.add_middleware(observe)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code >= 400:
            m.errors.labels(f"http_{exc.status_code}").inc()
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if not server.ready:
            return JSONResponse({"status": "warming up"}, 503)
        return {"status": "ready", "runtime": worker.describe()}

    @app.get("/metrics")
    async def metrics():
        m.queue.set(server.waiting)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/videos", dependencies=[Depends(authorize)])
    async def add_video(request: Request):
        kind = request.headers.get("content-type", "")
        loop = asyncio.get_running_loop()
        if server.uploading >= config.max_uploads:  # each holds disk and a decoding thread
            m.errors.labels("uploads_full").inc()
            raise HTTPException(429, f"{server.uploading} uploads are in progress; try again "
                                     f"later", headers={"Retry-After": "5"})
        server.uploading += 1
        m.uploads.set(server.uploading)
        try:
            if kind.startswith("application/json"):
                record = await loop.run_in_executor(None, _by_path, server, await _json(request))
            elif kind.startswith("multipart/form-data"):
                spooled, name = await _receive_upload(server, request)
                record = await loop.run_in_executor(None, server.store.add_upload, spooled, name)
            else:
                raise HTTPException(415, "send multipart/form-data with a \"file\" field, or "
                                         "JSON {\"path\": ...}")
        except NotAVideo as err:
            raise HTTPException(415, str(err)) from err
        except TooLarge as err:
            raise HTTPException(413, str(err)) from err
        except VideoError as err:
            raise HTTPException(422, str(err)) from err
        finally:
            server.uploading -= 1
            m.uploads.set(server.uploading)
        request.state.info["video"] = record.id
        server.store.touch(record.id)
        await server.evict(record.id)
        return record.public()

    @app.get("/v1/videos/{video_id}", dependencies=[Depends(authorize)])
    async def get_video(video_id: str):
        return _record(server, video_id).public()

    @app.delete("/v1/videos/{video_id}", dependencies=[Depends(authorize)])
    async def delete_video(video_id: str):
        _record(server, video_id)
        worker.forget(video_id)
        server.store.delete(video_id)
        return {"deleted": video_id}

    @app.post("/v1/videos/{video_id}/segment", dependencies=[Depends(authorize)])
    async def segment(video_id: str, request: Request, stream: bool = True):
        record = _record(server, video_id)
        expressions = server.check_expressions(await _json(request))
        request.state.info.update(video=video_id, expressions=len(expressions))
        if not stream and record.frames * len(expressions) > config.max_unstreamed:
            raise HTTPException(422, f"{record.frames} frames x {len(expressions)} "
                                     f"expression(s) is too much for one ?stream=false answer "
                                     f"(at most {config.max_unstreamed}, held whole in "
                                     f"memory); ask for the stream (the default)")
        if server.waiting >= config.max_queue:
            m.errors.labels("queue_full").inc()
            raise HTTPException(429, f"{server.waiting} requests are waiting; try again later",
                                headers={"Retry-After": "5"})
        server.waiting += 1
        server.in_use[video_id] += 1
        m.queue.set(server.waiting)
        lines = server.results(record, expressions, request.state.info)
        if stream:
            return StreamingResponse(_ndjson(lines), media_type="application/x-ndjson")
        items = [item async for item in lines]
        errors = [item for item in items if "error" in item]
        if errors:
            raise HTTPException(errors[0].get("status", 500), errors[0]["error"])
        return {"frames": [i for i in items if "frame" in i], "summary": items[-1]["summary"]}

    return app


async def _ndjson(items):
    async for item in items:
        yield json.dumps(item) + "\n"


def _record(server: Server, video_id: str):
    record = server.store.get(video_id)
    if record is None:
        raise HTTPException(404, f"no video {video_id!r}; upload it with POST /v1/videos")
    server.store.touch(video_id)
    return record


async def _json(request: Request) -> dict:
    try:
        return json.loads(await request.body() or b"null")
    except json.JSONDecodeError as err:
        raise HTTPException(422, f"the body is not JSON: {err}") from err


def _by_path(server: Server, body: dict):
    root = server.cfg.media_root
    if not isinstance(body, dict) or not isinstance(body.get("path"), str):
        raise HTTPException(422, "give {\"path\": \"...\"} or upload a file")
    if root is None:
        raise HTTPException(403, "this server takes no paths (start it with --media-root)")
    path = (Path(root) / body["path"]).resolve()
    if not path.is_relative_to(Path(root).resolve()):
        raise HTTPException(403, f"{body['path']!r} is outside the media root")
    if not path.exists():
        raise HTTPException(404, f"no such file under the media root: {body['path']!r}")
    return server.store.add_path(path)


async def _receive_upload(server: Server, request: Request) -> tuple[Path, str]:
    """Stream the multipart upload to disk (python-multipart, what FastAPI parses forms
    with); 413 as soon as it passes the size limit, not after receiving all of it."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    limit = int(server.cfg.max_upload_mb * (1 << 20))
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + (64 << 10):
        raise HTTPException(413, f"upload of {int(length)} bytes exceeds the limit of "
                                 f"{server.cfg.max_upload_mb} MB")
    _, params = parse_options_header(request.headers["content-type"])
    if b"boundary" not in params:
        raise HTTPException(422, "multipart upload without a boundary")
    spooled = server.store.spool()
    part = {"field": b"", "value": b"", "file": False}
    got = {"name": None, "size": 0}
    out = open(spooled, "wb")

    def on_part_begin():
        part["file"] = False

    def on_header_field(data, start, end):
        part["field"] += data[start:end]

    def on_header_value(data, start, end):
        part["value"] += data[start:end]

    def on_header_end():
        if part["field"].lower() == b"content-disposition":
            _, options = parse_options_header(part["value"])
            if options.get(b"name") == b"file" and b"filename" in options:
                part["file"] = True
                got["name"] = options[b"filename"].decode(errors="replace")
        part["field"], part["value"] = b"", b""

    def on_part_data(data, start, end):
        if part["file"]:
            got["size"] += end - start
            if got["size"] > limit:
                raise HTTPException(413, f"upload exceeds the limit of "
                                         f"{server.cfg.max_upload_mb} MB")
            out.write(data[start:end])

    try:
        parser = MultipartParser(params[b"boundary"], {
            "on_part_begin": on_part_begin, "on_header_field": on_header_field,
            "on_header_value": on_header_value, "on_header_end": on_header_end,
            "on_part_data": on_part_data})
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
        out.close()
        if got["name"] is None:
            raise HTTPException(422, "the form has no \"file\" field")
        if got["size"] == 0:
            raise HTTPException(422, "the uploaded file is empty")
        return spooled, got["name"]
    except BaseException:
        out.close()
        spooled.unlink(missing_ok=True)
        raise
