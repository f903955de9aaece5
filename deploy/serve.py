"""The serving endpoint: ``models:/<name>@<alias>`` over HTTP, following the alias as it moves.

``POST /predict`` takes ``{"inputs": [[...], ...]}`` (or MLflow's ``instances``, ``dataframe_split``,
``dataframe_records``), checks it against the model's signature without pandas (named columns against
the feature names of the version's data contract) and answers class indices, their labels from the
contract's class list, and probabilities. ``GET /health`` is ready once a model is loaded;
``GET /info`` tells which version is served, from which run and dataset, since when. A background task polls the alias; when
a promotion or rollback moves it, the new version is loaded whole and then swapped in with one
reference assignment, so a request in flight finishes on the model it started with.
Every start, switch and stop is a deployment record (:mod:`deploy.records`) and a tag
``deployment.<endpoint>`` on the version being served.

Only a version whose signed approval verifies is served (:mod:`registry.signing`, keys from the
keyring file, re-read on every poll): its signature on every poll, and before a switch the digest
of the very files about to be loaded and the approver against the run's author. When the alias
points at a version that does not verify (an alias or tag set by hand in the MLflow UI), the
endpoint keeps serving the last verified version, logs one error line naming the version and why,
and says so in ``/health`` and ``/info``; at start it refuses to start. A later valid approval of
that version is picked up at the next poll.

This module is the HTTP app and the entry of ``mlops serve``; its parts are :mod:`deploy.inputs`
(request bodies against the signature), :mod:`deploy.model_loader` (loading and verifying one
version) and :mod:`deploy.model_server` (the served version, the alias follower, the records).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from deploy.inputs import InputSpec, InvalidInput, dumps, parse_inputs
from deploy.model_loader import ServedModel, UnverifiedVersion, load_version, public_uri
from deploy.model_server import ModelServer
from ml.errors import ConfigError
from ml.settings import ServeConfig

# The endpoint's parts, importable from here as one module.
__all__ = ["InputSpec", "InvalidInput", "ModelServer", "ServedModel", "UnverifiedVersion", "bind", "create_app",
           "load_version", "parse_inputs", "public_uri", "serve"]


class _BodyTooLarge(Exception):
    pass


def create_app(server: ModelServer) -> Any:
    """The FastAPI app over ``server``; its lifespan loads, records and follows the alias."""
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

    limit = server.cfg.max_body_bytes

    def answer(status: int, payload: dict[str, Any]) -> Response:
        return Response(dumps(payload), status_code=status, media_type="application/json")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await server.off_loop(server.start)
        # Everything loaded so far lives as long as the process: frozen, a full garbage collection
        # no longer walks it (hundreds of thousands of objects; tens of ms of stalled requests).
        gc.collect()
        gc.freeze()
        follower = asyncio.create_task(server.follow_alias())
        try:
            yield
        finally:
            follower.cancel()
            with suppress(asyncio.CancelledError):
                await follower
            await server.off_loop(server.stop)
            server.close()

    # Plain Starlette routes: the handlers read the request themselves, so FastAPI's parameter
    # resolution would only add work to every call.
    app = FastAPI(title=f"mlops endpoint {server.cfg.endpoint}", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)

    async def read_body(request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def predict(request: Request) -> Response:
        served = server.served  # this request finishes on this model, whatever the follower swaps in
        if served is None:
            return answer(503, {"error": "no model loaded yet"})
        length = request.headers.get("content-length")
        too_large = {"error": f"request body exceeds serve.max_body_bytes = {limit} bytes"}
        if length is not None and length.isdigit() and int(length) > limit:
            return answer(413, too_large)
        try:
            x = parse_inputs(await read_body(request), served.spec)
        except _BodyTooLarge:
            return answer(413, too_large)
        except InvalidInput as exc:
            return answer(422, {"error": str(exc)})
        classes, probabilities = served.predict(x)
        labels = [served.labels[i] for i in classes.tolist()] if served.labels else None
        return answer(200, {"predictions": classes, "labels": labels, "probabilities": probabilities,
                            "model_name": served.name, "model_version": served.version})

    async def health(request: Request) -> Response:
        served = server.served
        if served is None:
            return answer(503, {"status": "loading"})
        unverified = server.unverified
        if unverified is None:
            return answer(200, {"status": "ready", "model_version": served.version})
        return answer(200, {"status": "ready", "model_version": served.version, "alias_target": unverified[0],
                            "mismatch": f"{server.cfg.alias} names v{unverified[0]}, whose approval does not "
                                        f"verify: {unverified[1]}"})

    async def info(request: Request) -> Response:
        return answer(200, server.info())

    app.add_route("/predict", predict, methods=["POST"])
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/info", info, methods=["GET"])
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0 takes any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted TCP sockets that say so, and
    # without it small responses wait for delayed ACKs (~40 ms each)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"serve.host/serve.port {host}:{port}: cannot listen there ({exc.strerror})") from None
    sock.listen(2048)
    return sock


def serve(cfg: ServeConfig, tracking_uri: str, model_name: str, keyring: str | None = None) -> None:
    """Loads the alias's version, binds, prints the URL once it answers, and serves until SIGTERM/Ctrl-C."""
    import torch
    import uvicorn

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Requests are single rows or small batches: one intra-op thread is fastest and leaves the
    # other cores to the event loop and to neighbours; inter-op parallelism has nothing to do.
    torch.set_num_threads(1)
    with suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    server = ModelServer(cfg, tracking_uri, model_name, url="", keyring=keyring)
    server.served = server.load_alias()
    sock = bind(cfg.host, cfg.port)
    # a wildcard address is no place to send requests to: records and /info name the machine
    host = socket.gethostname() if cfg.host in ("0.0.0.0", "::") else cfg.host
    server.url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    # "auto" takes uvloop and httptools when installed (uvicorn[standard]), else asyncio and h11
    config = uvicorn.Config(create_app(server), loop="auto", http="auto", lifespan="on", access_log=False,
                            log_level="warning", timeout_keep_alive=30, timeout_graceful_shutdown=10)
    uvicorn_server = uvicorn.Server(config)

    async def run() -> None:
        serving = asyncio.create_task(uvicorn_server.serve(sockets=[sock]))
        while not uvicorn_server.started and not serving.done():
            await asyncio.sleep(0.05)
        if uvicorn_server.started and server.served is not None:
            print(f"{cfg.endpoint}: serving {model_name} v{server.served.version} (@{cfg.alias}) at {server.url}",
                  flush=True)
        await serving

    # Ctrl-C: uvicorn shuts down cleanly (stop record included), then raises it again
    with suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(run())
