"""`virst serve --ray`: the same HTTP app on Ray Serve, scaled out.

    Ingress (1 replica)      the FastAPI app of runtime/serve.py: store, queue, auth,
                             metrics; validates requests with the model's tokenizer only
    SegmentReplica (N)       a `Runtime` each (a GPU each on a GPU cluster), running the
                             shared `Segmenter`; one request at a time per replica

Requests for one video go to the replica that holds its cached features: the video id is
the multiplexed model id (`serve.multiplexed`), so Serve routes to a replica that has it
loaded. When a replica dies mid-request, the ingress retries on another one and skips the
frames it already sent (results are deterministic), so no accepted request is lost.
Uploads live in the store folder, which every replica must see (one machine, or a shared
file system across machines).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ray import serve

from runtime.serve import Segmenter, ServeConfig, create_app
from virst.errors import VirstError

log = logging.getLogger("virst.serve")
RETRIES = 3
APP = "virst"


@serve.deployment(max_ongoing_requests=1)
class SegmentReplica:
    def __init__(self, runtime_args: dict, sessions: int):
        from runtime.pipeline import Runtime

        self.segmenter = Segmenter(Runtime(**runtime_args), sessions)
        self.segmenter.warm_up()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="virst-replica")

    @serve.multiplexed(max_num_models_per_replica=4)
    async def video(self, video_id: str) -> str:
        return video_id  # the session itself is built (and cached) by the Segmenter

    async def segment(self, source: str, expressions: list[str], seconds_left: float):
        """Frame records, then the summary; errors as records (the ingress sends them on)."""
        video_id = serve.get_multiplexed_model_id()
        await self.video(video_id)
        deadline = time.perf_counter() + seconds_left
        items = self.segmenter.segment(video_id, source, expressions, deadline)
        loop = asyncio.get_running_loop()

        def next_item():
            try:
                return next(items, None)
            except VirstError as err:
                return {"error": str(err), "status": 422}

        try:
            while (item := await loop.run_in_executor(self.pool, next_item)) is not None:
                yield item
                if "error" in item:
                    return
        finally:
            await loop.run_in_executor(self.pool, items.close)

    def forget(self, video_id: str) -> None:
        self.segmenter.forget(video_id)


class RayWorker:
    """The ingress side: the `LocalWorker` interface over the replicas' handle."""

    def __init__(self, replicas: int, prompt_checker, describe: str):
        self.concurrency, self.build_prompt = replicas, prompt_checker
        self._handle, self._describe = None, describe

    @property
    def handle(self):
        """The replicas' handle, looked up inside the ingress replica (a handle set before
        the app is serialised to it would not be the one it uses)."""
        if self._handle is None:
            self._handle = serve.get_deployment_handle("SegmentReplica", app_name=APP)
        return self._handle

    def describe(self) -> str:
        return self._describe

    async def warm_up(self) -> None:
        pass  # replicas warm up before Serve reports them running

    def forget(self, video_id: str) -> None:
        pass  # sessions age out of the replicas' LRU caches

    def close(self) -> None:
        pass

    async def stream(self, record, expressions: list[str], deadline: float):
        import ray.exceptions

        sent = 0
        for attempt in range(RETRIES):
            call = self.handle.options(multiplexed_model_id=record.id, stream=True)
            index = 0
            try:
                async for item in call.segment.remote(record.source, expressions,
                                                      deadline - time.perf_counter()):
                    if "frame" in item:
                        index += 1
                        if index <= sent:
                            continue  # sent before the replica failed
                        sent += 1
                    yield item
                return
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    serve.exceptions.BackPressureError) as err:
                log.warning(f"replica failed ({type(err).__name__}); retry {attempt + 1} of "
                            f"{RETRIES - 1} from frame {sent}")
                self.metrics.retries.inc()
                await asyncio.sleep(0.5)
        yield {"error": "every model replica failed for this request", "status": 503}


def prompt_checker(runtime_args: dict):
    """`Runtime.build_prompt` with only the tokenizer and config (no weights)."""
    from runtime.pipeline import check_prompt
    from virst.cli import DEFAULT_MODEL_DIR
    from virst.config import VirstConfig
    from virst.prompt import load_tokenizer

    folder = Path(runtime_args.get("model") or DEFAULT_MODEL_DIR)
    config, tokenizer = VirstConfig.load(folder / "config.json"), load_tokenizer(folder)
    return lambda text: check_prompt(tokenizer, config, text)


def build_application(runtime_args: dict, config: ServeConfig, replicas: int):
    options = {"num_cpus": runtime_args.get("threads") or 1}
    if str(runtime_args.get("device", "cpu")).startswith("cuda"):
        options["num_gpus"] = 1
    worker = RayWorker(replicas, prompt_checker(runtime_args),
                       f"Ray Serve, {replicas} replicas ({runtime_args.get('backend')})")
    app = create_app(None, config, warm=False, worker=worker)

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})  # I/O only
    @serve.ingress(app)
    class Ingress:
        def __init__(self, replica):
            self.replica = replica  # binds the replicas into the application

    replica = SegmentReplica.options(num_replicas=replicas, ray_actor_options=options)
    return Ingress.bind(replica.bind(runtime_args, config.sessions))


def run_ray(runtime_args: dict, config: ServeConfig, host: str, port: int, replicas: int,
            address: str = "auto") -> None:
    """Join (or start) a Ray cluster, deploy, serve until SIGINT/SIGTERM."""
    import ray

    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except ConnectionError:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": 75})
    serve.run(build_application(runtime_args, config, replicas), name=APP,
              route_prefix="/")
    print(f"virst serve --ray: {replicas} replicas, http://{host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
