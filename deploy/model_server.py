"""The state of one endpoint: the version served, the alias it follows (polled, a moved alias
loaded whole and then swapped in with one reference assignment), and the deployment records and
``deployment.<endpoint>`` tags of what was served when (see :mod:`deploy.serve`)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from deploy.model_loader import ServedModel, UnverifiedVersion, load_version, public_uri
from deploy.records import DeploymentRecord, append_record, check_endpoint_name, utc_now
from ml.errors import RegistryError
from ml.settings import ServeConfig
from registry.releases import ReleaseMismatch
from registry.signing import Keyring, verify_tags

log = logging.getLogger("deploy.serve")
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # what MLflow says of a missing model/alias


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
