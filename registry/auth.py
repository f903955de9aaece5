"""Who is acting on the registry, and may they: identity and permission from an ``mlflow server``
running with ``--app-name basic-auth``.

MLflow's basic-auth lets a user with EDIT on a registered model set its tags and aliases, so MLflow
alone would let an editor approve or promote. Registry decisions need MANAGE, and this module
checks it by asking the server what the authenticated user holds, before anything is changed. Both
questions are ones a non-admin user may ask about themselves:

- ``GET /api/2.0/mlflow/users/current``: the authenticated user (401 without valid credentials;
  404 from a server without the auth app, which authenticates nobody);
- ``GET /api/3.0/mlflow/users/permissions/get``: that user's effective permission on the model,
  resolved the way the server's own checks resolve it.

Credentials come from ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``, as for every
MLflow client call, or are passed in (the approval service checks its callers' credentials). A
local store (SQLite, a directory) authenticates nobody.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ml.errors import RegistryError

CURRENT_USER_PATH = "/api/2.0/mlflow/users/current"
USER_PERMISSION_PATH = "/api/3.0/mlflow/users/permissions/get"
MANAGE = "MANAGE"
NOT_AUTHENTICATED = "not authenticated (set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"


@dataclass(frozen=True)
class Identity:
    """A user the tracking server authenticated."""

    username: str
    is_admin: bool


def is_server_uri(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


Credentials = tuple[str, str]  # (username, password) for HTTP basic auth


def _get(tracking_uri: str, path: str, what: str, params: dict[str, str] | None = None,
         credentials: Credentials | None = None) -> Any:
    """One GET to the tracking server with ``credentials`` (default: the environment's); the raw response."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    creds = get_default_host_creds(tracking_uri) if credentials is None else MlflowHostCreds(
        tracking_uri, username=credentials[0], password=credentials[1])
    try:
        return http_request(creds, path, "GET", params=params, max_retries=2, backoff_factor=1)
    except MlflowException as exc:
        raise RegistryError(f"{what}: tracking server {tracking_uri} did not answer "
                            f"({str(exc).splitlines()[0][:200]})") from None


def _unauthenticated(what: str, credentials: Credentials | None = None) -> RegistryError:
    user = credentials[0] if credentials else os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        return RegistryError(f"{what}: user {user!r} could not be authenticated "
                             "(check MLFLOW_TRACKING_PASSWORD)")
    return RegistryError(f"{what}: {NOT_AUTHENTICATED}")


def server_identity(tracking_uri: str, what: str, credentials: Credentials | None = None) -> Identity | None:
    """The authenticated user, or None when the store authenticates nobody.

    ``what`` names the request in errors ("approve digits-classifier v1").
    """
    if not is_server_uri(tracking_uri):
        return None
    response = _get(tracking_uri, CURRENT_USER_PATH, what, credentials=credentials)
    if response.status_code == 404:
        return None
    if response.status_code == 401:
        raise _unauthenticated(what, credentials)
    if response.status_code != 200:
        raise RegistryError(f"{what}: {CURRENT_USER_PATH} answered HTTP {response.status_code}: "
                            f"{response.text[:200]}")
    user = response.json()["user"]
    return Identity(user["username"], bool(user.get("is_admin")))


def model_permission(tracking_uri: str, identity: Identity, model_name: str, what: str,
                     credentials: Credentials | None = None) -> str:
    """The permission name (READ, USE, EDIT, MANAGE, ...) ``identity`` holds on ``model_name``."""
    response = _get(tracking_uri, USER_PERMISSION_PATH, what, params={
        "username": identity.username, "resource_type": "registered_model", "resource_id": model_name},
        credentials=credentials)
    if response.status_code == 401:
        raise _unauthenticated(what, credentials)
    if response.status_code == 404:
        raise RegistryError(f"{what}: the tracking server authenticates users but does not answer "
                            f"{USER_PERMISSION_PATH}; an MLflow server of the installed version is needed")
    if response.status_code != 200:
        raise RegistryError(f"{what}: {USER_PERMISSION_PATH} answered HTTP {response.status_code}: "
                            f"{response.text[:200]}")
    return str(response.json().get("permission", "NO_PERMISSIONS"))


def check_can_manage(tracking_uri: str, identity: Identity, model_name: str, what: str,
                     credentials: Credentials | None = None) -> None:
    """Raises unless ``identity`` is an admin or holds MANAGE on the registered model."""
    if identity.is_admin:
        return
    permission = model_permission(tracking_uri, identity, model_name, what, credentials)
    if permission != MANAGE:
        raise RegistryError(f"{what}: user {identity.username!r} lacks {MANAGE} permission on the registered "
                            f"model (has {permission})")


@contextmanager
def denied_as_error(what: str) -> Iterator[None]:
    """Turns the server's 401/403 on any MLflow call inside into a one-line :class:`RegistryError`."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if exc.error_code == "UNAUTHENTICATED":
            raise _unauthenticated(what) from None
        if exc.error_code == "PERMISSION_DENIED":
            user = os.environ.get("MLFLOW_TRACKING_USERNAME", "anonymous")
            raise RegistryError(f"{what}: the tracking server denied user {user!r} "
                                f"({str(exc).splitlines()[0][:200]})") from None
        raise
