"""The FastAPI app: models load in the background, so liveness never waits on them."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from swagger_ui_bundle import swagger_ui_path

from . import __version__
from .config import Settings
from .errors import (
    ApiError,
    ClientDisconnect,
    api_error_handler,
    client_disconnect_handler,
    http_error_handler,
    internal_error_handler,
    validation_error_handler,
)
from .memory import trim_every
from .metrics import Metrics
from .middleware import ServingMiddleware
from .openapi import METRICS_RESPONSE, with_limits
from .registry import (
    ModelRegistry,
    ServedModel,
    checkpoint_dirs,
    folder_signature,
    missing_weights,
    pick_device,
)
from .routes_v1 import router as v1_router
from .routes_v2 import router as v2_router

STATIC = Path(__file__).parent / "static"

log = logging.getLogger("acs_serve")


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry
    loaded: bool = False  # every checkpoint tried and warmed up
    # SIGTERM received: readiness fails; uvicorn stops accepting connections and waits for
    # the requests already received, which are served as usual.
    draining: bool = False
    tasks: list = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """Loaded, not draining, serving a model, and (strict_readiness) none failed to load."""
        registry = self.registry
        failed = bool(registry.errors) and self.settings.strict_readiness
        return self.loaded and not self.draining and bool(registry.models) and not failed

    def model(self, name: str | None) -> ServedModel:
        """A ready model by name (None: the default model), or a 404/503 ApiError."""
        name = name or self.registry.default_name()
        served = self.registry.models.get(name) if name else None
        if served is None:
            if not self.loaded:
                raise ApiError(503, "models are still loading", "loading", {"Retry-After": "1"})
            if name is None:
                raise ApiError(503, "no model is loaded; GET /readyz says why", "no_model")
            raise ApiError(404, f"no model named {name!r}; see GET /v1/models", "unknown_model")
        if not served.ready:
            raise ApiError(503, f"model {name!r} is warming up", "loading", {"Retry-After": "1"})
        return served


async def serve_folder(state: ServerState, path: Path) -> bool:
    """Load and warm up one checkpoint folder off the event loop, then serve it; a model of
    the same name from the same folder (a reload) keeps answering until the new one is ready,
    then finishes what it holds. False (the error recorded) if it could not be served."""
    registry, loop = state.registry, asyncio.get_running_loop()
    served = await loop.run_in_executor(None, registry.load, path)
    if served is None:
        return False
    served.batcher.start()
    if not await loop.run_in_executor(served.batcher.pool, registry.warm_up, served):
        await served.batcher.stop()
        return False
    old = registry.models.get(served.name)
    registry.models[served.name] = served
    served.ready = True
    state.metrics.model_ready.labels(served.name).set(1)
    log.info("serving %s on %s (load %.2fs, warm-up %.2fs)", served.name, registry.device,
             served.load_seconds, served.warmup_seconds)
    if old is not None:
        await retire(state, old, replaced=True)
    return True


async def retire(state: ServerState, served: ServedModel, replaced: bool = False) -> None:
    """Stop a model taking requests, finish those it holds, and free it."""
    if not replaced:
        state.registry.discard(served)
    await served.batcher.drain(state.settings.graceful_timeout_s)
    await served.batcher.stop()
    log.info("%s %s", "reloaded" if replaced else "retired", served.name)


async def load_models(state: ServerState) -> None:
    """Load and warm up every checkpoint, one by one, off the event loop."""
    registry = state.registry
    missing = missing_weights(state.settings.weights_dir)
    if missing:
        log.error("%s: %s", missing, Path(state.settings.weights_dir).resolve())
        registry.fail("weights_dir", missing)
    for path in checkpoint_dirs(state.settings.weights_dir):
        if not await serve_folder(state, path):
            registry.failed[path.name] = folder_signature(path)
    if not registry.models:
        log.error("no model could be loaded from %s", state.settings.weights_dir)
    state.loaded = True


async def sync_models(state: ServerState) -> None:
    """Serve the checkpoint folders added or changed since the last look, retire the removed
    ones; a folder that failed is tried again once its files change."""
    registry = state.registry
    folders = {p.name: p for p in checkpoint_dirs(state.settings.weights_dir)}
    if folders:
        registry.clear("weights_dir")
    for served in list(registry.models.values()):
        if served.folder is not None and served.folder.name not in folders:
            await retire(state, served)
    for name in [n for n in registry.failed if n not in folders]:
        registry.failed.pop(name)
        registry.clear(name)
    serving = {m.folder.name: m.signature for m in registry.models.values() if m.folder}
    for name, path in folders.items():
        signature = folder_signature(path)
        if serving.get(name, registry.failed.get(name)) == signature:
            continue
        registry.clear(name)
        registry.failed.pop(name, None)
        if not await serve_folder(state, path):
            registry.failed[name] = signature


async def poll_models(state: ServerState) -> None:
    """Every model_poll_s seconds, sync the served models with the weights folder."""
    while True:
        await asyncio.sleep(state.settings.model_poll_s)
        if not state.loaded:  # the first load is still under way
            continue
        try:
            await sync_models(state)
        except Exception:  # a bad folder must not stop the polling
            log.exception("looking for model changes failed")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    device = pick_device(settings.device)
    if device.type == "cpu":
        torch.set_num_threads(settings.threads)
    metrics = Metrics(__version__, str(device))
    state = ServerState(settings, metrics, ModelRegistry(settings, metrics, device))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.tasks.append(asyncio.create_task(load_models(state)))
        if settings.model_poll_s > 0:
            state.tasks.append(asyncio.create_task(poll_models(state)))
        if settings.trim_memory_s > 0:
            state.tasks.append(asyncio.create_task(trim_every(settings.trim_memory_s)))
        yield
        state.draining = True
        for task in state.tasks:
            task.cancel()
        await asyncio.gather(*state.tasks, return_exceptions=True)
        for served in state.registry.models.values():
            await served.batcher.stop()

    app = FastAPI(title="acs-serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Adaptive Channel Skipping CNNs under a per-request compute budget.")
    app.state.server = state
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(ClientDisconnect, client_disconnect_handler)
    app.add_exception_handler(Exception, internal_error_handler)
    app.include_router(v1_router)
    app.include_router(v2_router)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """Swagger UI from the installed package's files: it works without the internet."""
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="acs-serve API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        """The try-it page: pick a model, an image and a budget (static files, no build)."""
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        """Liveness: the process answers. Never waits on model loading."""
        return {"status": "alive"}

    ready_body = {"description": "readiness and, per weights folder, why it is not served",
                  "content": {"application/json": {"schema": {"type": "object", "properties": {
                      "ready": {"type": "boolean"}, "loaded": {"type": "boolean"},
                      "draining": {"type": "boolean"},
                      "models": {"type": "object", "additionalProperties": {"type": "boolean"}},
                      "errors": {"type": "object", "additionalProperties": {"type": "string"}}}}}}}

    @app.get("/readyz", tags=["health"], responses={200: ready_body, 503: ready_body})
    async def readyz():
        """Readiness: not shutting down, and every model in the weights folder loaded and warmed
        up (`strict_readiness` false: at least one); `errors` says why a folder is not served."""
        body = {"ready": state.ready, "loaded": state.loaded, "draining": state.draining,
                "models": {n: m.ready for n, m in state.registry.models.items()},
                "errors": state.registry.errors}
        return JSONResponse(body, 200 if state.ready else 503)

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse,
             responses=METRICS_RESPONSE)
    async def prometheus_metrics() -> Response:
        for served in list(state.registry.models.values()):
            await served.batcher.settled()  # a batch answers first, then records its metrics
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(ServingMiddleware, state=state)
    schema = app.openapi
    app.openapi = lambda: with_limits(schema(), settings)
    return app
