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
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from deploy.records import DeploymentRecord, append_record, check_endpoint_name, utc_now
from ml.settings import ServeConfig
from ml.errors import ConfigError, RegistryError
from registry.releases import ReleaseMismatch, check_release_weights
from registry.signing import Keyring, directory_digest, verify_tags

try:
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

    loads = orjson.loads
except ImportError:  # orjson is optional: the standard library is slower but equivalent
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, default=lambda a: a.tolist()).encode()

    loads = json.loads

log = logging.getLogger("deploy.serve")
INPUT_KEYS = ("inputs", "instances", "dataframe_split", "dataframe_records")
_NUMBER_TYPES = {int, float}
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # what MLflow says of a missing model/alias


class UnverifiedVersion(RegistryError):
    """A version the alias names whose signed approval does not verify; it is not served."""

    def __init__(self, version: str, why: str) -> None:
        super().__init__(why)
        self.version, self.why = version, why


class InvalidInput(ValueError):
    """A request body the model's signature does not accept (answered with 422)."""


@dataclass(frozen=True)
class InputSpec:
    """What the signature accepts: ``width`` numbers per row, named by ``columns`` when column-based."""

    width: int
    dtype: str
    columns: tuple[str, ...] | None = None

    @classmethod
    def from_signature(cls, signature: Any, model: str) -> InputSpec:
        schema = signature.inputs if signature is not None else None
        if schema is None:
            raise RegistryError(f"{model}: no input signature; expected a model logged with a signature")
        if schema.is_tensor_spec():
            spec = schema.inputs[0]
            if len(schema.inputs) != 1 or len(spec.shape) != 2 or spec.shape[1] < 1 or spec.type.kind != "f":
                raise RegistryError(f"{model}: input {schema}; expected one floating-point tensor of shape [-1, n]")
            return cls(int(spec.shape[1]), str(spec.type))
        kinds = {c.type.to_numpy().kind for c in schema.inputs}
        if not schema.has_input_names() or not kinds <= set("fiu"):
            raise RegistryError(f"{model}: input columns {schema}; expected named numeric columns")
        return cls(len(schema.inputs), "float32", tuple(schema.input_names()))

    def describe(self) -> str:
        if self.columns:
            return f"rows of {self.width} numbers in column order {self.columns[0]}..{self.columns[-1]}"
        return f"rows of {self.width} numbers (a {self.dtype} tensor of shape [-1, {self.width}])"


def parse_inputs(body: bytes, spec: InputSpec) -> np.ndarray:
    """The request body as a matrix of ``spec.dtype``, shape (rows, spec.width); raises :class:`InvalidInput`."""
    try:
        payload = loads(body)
    except ValueError as exc:
        raise InvalidInput(f"body is not valid JSON ({str(exc).splitlines()[0]}); "
                           f'expected {{"inputs": [...]}} with {spec.describe()}') from None
    keys = [k for k in INPUT_KEYS if k in payload] if isinstance(payload, dict) else []
    if len(keys) != 1:
        got = ", ".join(map(repr, payload)) if isinstance(payload, dict) else f"a JSON {type(payload).__name__}"
        raise InvalidInput(f"expected a JSON object with exactly one of the keys {', '.join(INPUT_KEYS)}; "
                           f"got {got or 'an empty object'}")
    key = keys[0]
    value = payload[key]
    if key == "dataframe_split":
        if not isinstance(value, dict) or "data" not in value:
            raise InvalidInput('dataframe_split: expected an object with "data" (rows) and optional "columns"')
        return _to_matrix(_reorder(value["data"], value.get("columns"), spec, key), spec, key)
    if key == "dataframe_records":
        if not spec.columns:
            raise InvalidInput("dataframe_records: this model takes a tensor without column names; "
                               f'expected {{"inputs": [...]}} with {spec.describe()}')
        if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
            raise InvalidInput("dataframe_records: expected a list of objects mapping column to value")
        check_columns([c for r in value for c in r], spec, key)
        missing = next((c for r in value for c in spec.columns if c not in r), None)
        if missing is not None:
            raise InvalidInput(f"dataframe_records: column {missing!r} missing in a record; expected {spec.describe()}")
        return _to_matrix([[r[c] for c in spec.columns] for r in value], spec, key)
    if isinstance(value, dict) and spec.columns:  # {"inputs": {"column": [values...]}}
        check_columns(list(value), spec, key)
        columns = [value[c] for c in spec.columns]
        if not all(isinstance(c, list) for c in columns):
            raise InvalidInput(f"{key}: expected each column to be a list of numbers")
        return _to_matrix([list(r) for r in zip(*columns, strict=False)], spec, key)
    return _to_matrix(value, spec, key)


def check_columns(names: list[Any], spec: InputSpec, key: str) -> None:
    """Column names a request gives against the served version's feature names (from its data
    contract or its signature): unknown and missing ones are named in the 422."""
    given = list(dict.fromkeys(names))
    unknown = [str(c) for c in given if c not in spec.columns]
    missing = [c for c in spec.columns if c not in given]

    def named(columns: list[str]) -> str:
        return ("column " if len(columns) == 1 else "columns ") + ", ".join(map(repr, columns[:10]))

    if unknown or missing:
        parts = ([f"unknown {named(unknown)}"] if unknown else []) + ([f"{named(missing)} missing"] if missing else [])
        raise InvalidInput(f"{key}: {'; '.join(parts)}; expected {spec.describe()}")


def _reorder(rows: Any, columns: Any, spec: InputSpec, key: str) -> Any:
    if columns is None:
        return rows
    if not isinstance(columns, list) or not isinstance(rows, list):
        raise InvalidInput(f"{key}: expected \"columns\" and \"data\" to be lists")
    if not spec.columns:
        if len(columns) != spec.width:
            raise InvalidInput(f"{key}: expected {spec.width} columns, got {len(columns)}")
        return rows
    check_columns(columns, spec, key)
    index = {c: i for i, c in enumerate(columns)}
    if list(spec.columns) == columns:
        return rows
    order = [index[c] for c in spec.columns]
    if not all(isinstance(r, list) and len(r) == len(columns) for r in rows):
        raise InvalidInput(f"{key}: expected each row to have {len(columns)} values, one per column")
    return [[r[i] for i in order] for r in rows]


def _to_matrix(rows: Any, spec: InputSpec, key: str) -> np.ndarray:
    if not isinstance(rows, list) or not rows:
        raise InvalidInput(f"{key}: expected a non-empty list of {spec.describe()}")
    if not all(type(r) is list for r in rows):
        raise InvalidInput(f"{key}: expected a list of rows (a 2-D array), each a list of {spec.width} numbers")
    bad = next((n for n in map(len, rows) if n != spec.width), None)
    if bad is not None:
        raise InvalidInput(f"{key}: expected {spec.describe()}, got a row of {bad}")
    types = set(map(type, chain.from_iterable(rows)))
    if not types <= _NUMBER_TYPES:
        odd = sorted(t.__name__ if t is not type(None) else "null" for t in types - _NUMBER_TYPES)
        raise InvalidInput(f"{key}: expected numbers, got {', '.join(odd)}")
    try:
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
            matrix = np.array(rows, dtype=spec.dtype)
    except OverflowError:
        matrix = np.full((1, 1), np.inf, dtype=np.float32)
    if not np.isfinite(matrix).all():
        raise InvalidInput(f"{key}: expected finite numbers within {spec.dtype} range")
    return matrix


@dataclass(frozen=True)
class ServedModel:
    """One loaded model version and where it came from."""

    name: str
    version: str
    run_id: str | None
    status: str
    dataset_md5: str | None
    dataset_source: str | None
    module: Any
    spec: InputSpec
    since: str = ""
    approval: str = ""  # who signed the approval that let it be served
    labels: tuple[str, ...] | None = None  # class names by output index, from the version's data contract

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class indices and class probabilities for a float32 matrix."""
        from ml.model.predict import predict

        classes, probabilities = predict(self.module, x, probabilities=True)
        return classes, probabilities


def public_uri(uri: str) -> str:
    """``uri`` fit for records, tags and /info: no credentials, a SQLite file by its absolute path."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))


def load_version(client: Any, tracking_uri: str, name: str, version: str,
                 keyring: Keyring | None = None) -> ServedModel:
    """Downloads and loads one model version completely, checked against its signature; raises
    :class:`UnverifiedVersion` unless its signed approval verifies over the files downloaded, and
    :class:`registry.releases.ReleaseMismatch` when the version names a production release whose
    weights digest is not that of the weights loaded."""
    import mlflow.artifacts
    import mlflow.pytorch
    import torch
    from mlflow.models import Model

    from ml.model.predict import inference_model
    from registry.store import get_version, run_author

    record = get_version(client, name, version)
    keyring = keyring or Keyring.load()
    verdict = verify_tags(name, record.version, record.tags, keyring)  # the signature, before any download
    if not verdict.approved:
        raise UnverifiedVersion(record.version, verdict.why or f"its signed status is {verdict.status}")
    with tempfile.TemporaryDirectory(prefix="mlops-serve-") as tmp:
        # the version's own artifact location: a models:/ URI would be resolved against the
        # process-wide registry URI, not this server's
        source = client.get_model_version_download_uri(name, record.version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri)
        verdict = verify_tags(name, record.version, record.tags, keyring,
                              weights_digest=directory_digest(local), author=run_author(client, record.run_id))
        if not verdict.approved:
            raise UnverifiedVersion(record.version, verdict.why or f"its signed status is {verdict.status}")
        spec = InputSpec.from_signature(Model.load(local).signature, f"{name} v{version}")
        module = mlflow.pytorch.load_model(local)
    check_release_weights(name, record.version, record.tags, module.state_dict())  # refuses: ReleaseMismatch
    contract = json.loads(record.tags["input_signature"]) if "input_signature" in record.tags else {}
    inputs = [name for name, _ in contract.get("inputs", [])]
    if spec.columns is None and len(inputs) == spec.width:
        spec = replace(spec, columns=tuple(inputs))
    module = inference_model(module, spec.width)
    with torch.inference_mode():  # the first call pays for lazy initialization, not a request
        out = module(torch.zeros(2, spec.width))
    if out.ndim != 2:
        raise RegistryError(f"{name} v{version}: model output has shape {list(out.shape)}; expected [rows, classes]")
    labels = tuple(contract.get("classes", ()))
    return ServedModel(name, record.version, record.run_id, verdict.status, record.tags.get("dataset_md5"),
                       record.tags.get("dataset_source"), module, spec, approval=verdict.line(),
                       labels=labels if len(labels) == out.shape[1] else None)


class ModelServer:
    """The served model, the alias it follows, and the records of what was served when."""

    def __init__(self, cfg: ServeConfig, tracking_uri: str, model_name: str, url: str,
                 keyring: str | None = None) -> None:
        self.cfg = cfg
        self.keyring_path = keyring  # None: $MLOPS_APPROVAL_KEYRING, else the user's config dir
        self.unverified: tuple[str, str] | None = None  # (version the alias names, why it is not served)
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.url = url
        self.served: ServedModel | None = None
        self.alias_target: str | None = None
        self.last_poll: str | None = None
        # (version, its signature tag, monotonic time to retry loading it): a new signature retries at once
        self._unloadable: tuple[str, str, float] | None = None
        self._client: Any = None
        # Registry and loading work runs off the event loop, always on this one thread, so the
        # store's per-thread connection stays warm and polls stay short.
        self._registry = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry")
        check_endpoint_name(cfg.endpoint)

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._registry, fn, *args)

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def resolve_alias(self) -> str | None:
        """The version the alias names now, or None when the alias is not set. An unreachable
        registry raises (MlflowException)."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.model_name, self.cfg.alias).version)
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                return None
            raise

    def keyring(self) -> Keyring:
        return Keyring.load(self.keyring_path)

    def resolve_target(self) -> Any:
        """The version record the alias names now, or None when the alias is not set."""
        from registry.store import champion

        return champion(self.client, self.model_name, self.cfg.alias)

    def load_alias(self) -> ServedModel:
        """Loads the version behind the alias; refuses clearly when the model or the alias is missing,
        or when the version's approval does not verify."""
        from mlflow.exceptions import MlflowException

        where = public_uri(self.tracking_uri)
        try:
            self.client.get_registered_model(self.model_name)
            version = self.resolve_alias()
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                raise RegistryError(f"model {self.model_name!r}: not found in the registry at {where}") from None
            raise RegistryError(f"registry at {where}: {str(exc).splitlines()[0]}") from None
        if version is None:
            raise RegistryError(f"model {self.model_name!r} has no alias {self.cfg.alias!r}; "
                                "approve and promote a version first (mlops models promote)")
        self.alias_target = version
        try:
            return load_version(self.client, self.tracking_uri, self.model_name, version, self.keyring())
        except UnverifiedVersion as exc:
            raise RegistryError(f"{self.model_name}@{self.cfg.alias} names v{exc.version}, whose approval does not "
                                f"verify: {exc.why}; nothing served (approve it with `mlops models approve`, "
                                f"or move {self.cfg.alias} back)") from None
        except ReleaseMismatch as exc:
            raise RegistryError(f"{self.model_name}@{self.cfg.alias}: {exc}; nothing served") from None

    def record(self, event: str, served: ServedModel) -> None:
        append_record(self.cfg.records_dir, DeploymentRecord(
            endpoint=self.cfg.endpoint, event=event, url=self.url, model_name=served.name,
            model_version=served.version, model_uri=served.uri, run_id=served.run_id or "",
            tracking_uri=public_uri(self.tracking_uri), at=utc_now(), host=socket.gethostname(), pid=os.getpid()))

    def tag(self, served: ServedModel, until: str | None = None) -> None:
        """Tags the version ``deployment.<endpoint>`` with where and since when it is served here
        (``until`` once it no longer is), so MLflow alone answers which endpoint serves it."""
        key = f"deployment.{self.cfg.endpoint}"
        value = {"url": self.url, "alias": self.cfg.alias, "since": served.since, "until": until,
                 "host": socket.gethostname(), "pid": os.getpid()}
        try:
            self.client.set_model_version_tag(served.name, served.version, key, json.dumps(value))
        except Exception as exc:  # noqa: BLE001 - the tag is a convenience; the record is the contract
            log.warning("could not tag %s v%s with %s: %s", served.name, served.version, key,
                        str(exc).splitlines()[0])

    def start(self) -> None:
        """Loads the alias's version (unless already loaded), then records the start."""
        if self.served is None:
            self.served = self.load_alias()
        self.served = replace(self.served, since=utc_now())
        self.record("start", self.served)
        self.tag(self.served)

    def stop(self) -> None:
        """Records the stop (called on a clean shutdown)."""
        if self.served is not None:
            self.record("stop", self.served)
            self.tag(self.served, until=utc_now())

    def close(self) -> None:
        self._registry.shutdown(wait=False)

    async def follow_alias(self) -> None:
        """Polls the alias forever; a moved alias loads the new version, then swaps it in."""
        while True:
            await asyncio.sleep(self.cfg.poll_interval_s)
            try:
                await self.poll_once()
            except Exception as exc:  # noqa: BLE001 - a registry hiccup must not stop serving
                log.warning("%s: %s, still serving v%s", self.cfg.endpoint, str(exc).splitlines()[0],
                            self.served.version if self.served else "-")

    def set_unverified(self, state: tuple[str, str] | None) -> None:
        """Records whether the alias names a version that is not served, logging each change once."""
        if state == self.unverified:
            return
        self.unverified = state
        served = self.served.version if self.served else "-"
        if state is not None:
            log.error("%s: %s@%s names v%s, whose approval does not verify: %s; serving v%s",
                      self.cfg.endpoint, self.model_name, self.cfg.alias, state[0], state[1], served)

    async def poll_once(self) -> None:
        """One check of the alias: when it names another version whose signed approval verifies,
        load that one whole (its weights checked against the signature), then swap."""
        try:
            record = await self.off_loop(self.resolve_target)
            keyring = await self.off_loop(self.keyring)
        except Exception as exc:
            raise RuntimeError(f"checking {self.model_name}@{self.cfg.alias} failed: {exc}") from exc
        target = record.version if record is not None else None
        self.alias_target, self.last_poll = target, utc_now()
        current = self.served
        if target is None or current is None:
            self.set_unverified(None)
            return
        verdict = verify_tags(self.model_name, target, record.tags, keyring)
        if not verdict.approved:  # the served version stays, verified when it was loaded
            self.set_unverified((target, verdict.why or f"its signed status is {verdict.status}"))
            return
        if target == current.version:
            self.set_unverified(None)
            return
        signature = record.tags.get("approval_signature", "")
        if self._unloadable and self._unloadable[:2] == (target, signature) and time.monotonic() < self._unloadable[2]:
            return
        try:
            loaded = await self.off_loop(load_version, self.client, self.tracking_uri, self.model_name, target, keyring)
        except UnverifiedVersion as exc:
            self._unloadable = (target, signature, time.monotonic() + max(60.0, 10 * self.cfg.poll_interval_s))
            self.set_unverified((target, exc.why))
            return
        except Exception as exc:
            # retried after a while, not on every poll: a broken version is not downloaded in a loop
            self._unloadable = (target, signature, time.monotonic() + max(60.0, 10 * self.cfg.poll_interval_s))
            raise RuntimeError(f"loading {self.model_name} v{target} failed: {exc}") from exc
        self.set_unverified(None)
        self.served = replace(loaded, since=utc_now())  # one reference assignment: the swap
        log.info("%s: %s@%s moved, serving v%s (was v%s)", self.cfg.endpoint, self.model_name, self.cfg.alias,
                 target, current.version)
        await self.off_loop(self._after_switch, current, self.served)

    def _after_switch(self, old: ServedModel, new: ServedModel) -> None:
        self.record("switch", new)
        self.tag(old, until=new.since)
        self.tag(new)

    def info(self) -> dict[str, Any]:
        served = self.served
        return {
            "endpoint": self.cfg.endpoint, "url": self.url, "model_name": self.model_name,
            "alias": self.cfg.alias, "alias_target": self.alias_target, "last_alias_check": self.last_poll,
            "poll_interval_s": self.cfg.poll_interval_s, "tracking_uri": public_uri(self.tracking_uri),
            "model_version": served.version if served else None, "model_uri": served.uri if served else None,
            "run_id": served.run_id if served else None,
            "approval_status": served.status if served else None,
            "approval": served.approval if served else None,
            "alias_unverified": ({"version": self.unverified[0], "why": self.unverified[1]}
                                 if self.unverified else None),
            "dataset_md5": served.dataset_md5 if served else None,
            "dataset_source": served.dataset_source if served else None,
            "serving_since": served.since if served else None,
            "input": ({"width": served.spec.width, "dtype": served.spec.dtype, "columns": served.spec.columns}
                      if served else None),
            "classes": served.labels if served else None,
        }


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
