"""The approval service: a team's approval authority on a server, so approvers hold no key.

    python -m registry.service --tracking-uri http://mlflow-host:5000 [--host 127.0.0.1] [--port 5001]

``POST /decisions`` with JSON ``{"model", "version", "decision": "Approved" | "Rejected", "reason",
"allow_self_approval"}`` and the caller's MLflow credentials (HTTP basic auth). The service asks the
MLflow server (basic-auth mode) who the caller is and whether they hold MANAGE on the model, with
the caller's own credentials (:mod:`registry.auth`); then it decides and signs with its own key
(:func:`registry.store.decide`, the key under its ``$MLOPS_CONFIG_DIR``) and writes the tags with
its own credentials (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``: an account that may
write the model's tags). The signed approver is the authenticated caller. ``GET /keyring``: the
public keys that verify what it signed, for endpoints and flows. ``mlops models approve|reject``
send their decision here when ``$MLOPS_APPROVAL_SERVICE`` names the service.

Hand-written because no library signs after an MLflow permission check: a few Starlette routes.
The service must be reached over TLS (a reverse proxy) off loopback, as the MLflow server itself.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from typing import Any

from ml.errors import RegistryError, cli_errors
from registry.approval import APPROVED, REJECTED
from registry.auth import Credentials, check_can_manage, denied_as_error, is_server_uri, server_identity

SERVICE_ENV = "MLOPS_APPROVAL_SERVICE"
DECISIONS_PATH = "/decisions"


def basic_credentials(header: str | None) -> Credentials | None:
    """(username, password) from an ``Authorization: Basic`` header, None when absent or malformed."""
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (user, password) if user else None


def decide_for(tracking_uri: str, caller: Credentials, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """One decision requested by ``caller``: (HTTP status, answer). Pure of HTTP otherwise."""
    from registry import store
    from registry.actions import public_server, registry_client

    model, version = str(request.get("model", "")), str(request.get("version", ""))
    decision, reason = request.get("decision"), str(request.get("reason", ""))
    if not model or not version or decision not in (APPROVED, REJECTED):
        return 400, {"error": f'expected {{"model", "version", "decision": "{APPROVED}" | "{REJECTED}", "reason"}}'}
    what = f"{'approve' if decision == APPROVED else 'reject'} {model} v{version}"
    try:
        identity = server_identity(tracking_uri, what, caller)
    except RegistryError as exc:
        return 401, {"error": str(exc)}
    if identity is None:
        return 400, {"error": f"{what}: tracking server {tracking_uri} authenticates nobody; the approval service "
                              "needs an mlflow server with --app-name basic-auth"}
    try:
        check_can_manage(tracking_uri, identity, model, what, caller)
    except RegistryError as exc:
        return 403, {"error": str(exc)}
    client = registry_client(tracking_uri)
    try:
        with denied_as_error(what):
            record = store.decide(client, model, version, decision, identity.username, reason,
                                  bool(request.get("allow_self_approval")),
                                  identity=f"authenticated by {public_server(tracking_uri)} (approval service)")
    except RegistryError as exc:
        return 409, {"error": str(exc)}
    return 200, record.to_dict()


def create_app(tracking_uri: str, keyring: str | None = None) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from registry.signing import Keyring

    async def decisions_endpoint(request: Request) -> JSONResponse:
        from starlette.concurrency import run_in_threadpool

        caller = basic_credentials(request.headers.get("authorization"))
        if caller is None:
            return JSONResponse({"error": "expected the caller's MLflow credentials (HTTP basic auth)"}, 401,
                                headers={"WWW-Authenticate": 'Basic realm="mlops approval service"'})
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "expected a JSON object"}, 400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "expected a JSON object"}, 400)
        status, answer = await run_in_threadpool(decide_for, tracking_uri, caller, body)
        return JSONResponse(answer, status)

    async def keys(request: Request) -> JSONResponse:
        return JSONResponse(Keyring.load(keyring).to_dict())

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ready"})

    return Starlette(routes=[Route(DECISIONS_PATH, decisions_endpoint, methods=["POST"]),
                             Route("/keyring", keys, methods=["GET"]), Route("/health", health, methods=["GET"])])


def request_decision(service: str, tracking_uri: str, name: str, version: str | int, decision: str, reason: str,
                     allow_self_approval: bool, what: str) -> None:
    """Sends a decision to the approval service with this user's MLflow credentials; raises its
    refusal as one line."""
    import httpx

    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not user or not password:
        raise RegistryError(f"{what}: the approval service {service} needs MLFLOW_TRACKING_USERNAME and "
                            "MLFLOW_TRACKING_PASSWORD")
    body = {"model": name, "version": str(version), "decision": decision, "reason": reason,
            "allow_self_approval": allow_self_approval}
    try:
        response = httpx.post(service.rstrip("/") + DECISIONS_PATH, json=body, auth=(user, password), timeout=120)
    except httpx.HTTPError as exc:
        raise RegistryError(f"{what}: approval service {service} did not answer ({exc})") from None
    if response.status_code != 200:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = f"HTTP {response.status_code}: {response.text[:200]}"
        raise RegistryError(error if error.startswith(what) else f"{what}: approval service: {error}")


@cli_errors
def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m registry.service", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True, help="the mlflow server (basic-auth mode) it checks with")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--keyring", help="keyring served at /keyring (default: $MLOPS_APPROVAL_KEYRING, else "
                                          "the service's config dir)")
    args = parser.parse_args(argv)
    if not is_server_uri(args.tracking_uri):
        raise RegistryError(f"--tracking-uri {args.tracking_uri!r}: expected an mlflow server URL (http://...)")
    from registry.signing import load_private_key

    load_private_key()  # the key exists (created now on first start) before the first request
    uvicorn.run(create_app(args.tracking_uri, args.keyring), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
