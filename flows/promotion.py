"""The promotion flow: wait for a person's decision on a model version in the registry, then act.

    python -m flows.promotion --model NAME --version V [--settings settings.yaml]
    (exit status 0 when promoted, 1 when rejected or timed out)

The registry is the single source of truth, and a decision in it is a signed record
(:mod:`registry.signing`): the flow polls every ``promotion.poll_interval_s`` for a decision from
``mlops models approve|reject`` whose signature verifies with the keyring. Tags and aliases set by
hand (the MLflow UI, a client with EDIT permission) are reported, never adopted: at its start the
flow names every version whose tags claim a decision the signature does not prove and an alias on a
version whose approval does not verify ("champion set outside the gate"), and with
``promotion.revert_unverified_alias`` it moves that alias back to the last verified holder,
recording that it did in the alias history. Approved: the flow moves ``promotion.alias`` to the
version through :mod:`registry.actions`, which verifies the weights against the signed record,
publishes the version's production release (:mod:`registry.releases`) and records the previous
holder (rollback is one command).
Rejected: it ends without touching the alias. No decision within ``promotion.timeout_s``: it ends,
leaving the version pending; ``mlops models promote`` still works later.

Every outcome of a working process ends the run Completed, with the outcome as the state's name
(``Promoted``, ``Rejected``, ``TimedOut``), a one-line message, and a result dict. A rejection is the
approval process doing its job, not a failure of the software: a Failed state would page whoever
watches failures, trigger flow retries and mark a calling flow failed. Failed is kept for what
needs fixing: an unknown version, a refused authorization, an unreachable registry.

No Prefect-UI approval form (``pause_flow_run(wait_for_input=...)``) is offered: Prefect's open
source server knows no user, so a decision entered there could not name an authenticated approver,
and approval requires one.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from ml.settings import load_settings
from ml.errors import ConfigError, cli_errors
from registry import actions, store
from registry.approval import APPROVED, PENDING, REJECTED
from tasks.entry import should_retry

PROMOTION_DEPLOYMENT = "promotion/local"
PROMOTED, REJECTED_OUTCOME, TIMED_OUT = "Promoted", "Rejected", "TimedOut"


def wait_for_decision(read: Callable[[], Any], timeout_s: float, poll_interval_s: float,
                      sleep: Callable[[float], None] = time.sleep,
                      clock: Callable[[], float] = time.monotonic) -> Any | None:
    """Calls ``read()`` (a version record) until its status is Approved or Rejected; None once
    ``timeout_s`` has passed without a decision. The status is read at least once."""
    deadline = clock() + timeout_s
    while True:
        record = read()
        if record.status in (APPROVED, REJECTED):
            return record
        remaining = deadline - clock()
        if remaining <= 0:
            return None
        sleep(min(poll_interval_s, remaining))


def _promote(tracking_uri: str, name: str, version: str, alias: str, flow_run_id: str | None,
             checkpoint: Any = None) -> dict[str, Any]:
    note = {"via": "promotion flow", **({"flow_run_id": flow_run_id} if flow_run_id else {})}
    record = actions.promote_version(tracking_uri, name, version, alias, note=note, checkpoint=checkpoint)
    last = store.alias_history(actions.registry_client(tracking_uri), name, alias)[-1]
    return {"previous": last["previous"], "aliases": list(record.aliases), "release": last.get("release")}


promote_task = task(_promote, name="promote", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
                    retry_condition_fn=should_retry)


def _check_gate(tracking_uri: str, name: str, alias: str, revert: bool) -> dict[str, Any]:
    lines, reverted = actions.check_gate(tracking_uri, name, alias, revert)
    for line in lines:
        print(f"outside the gate: {line}")
    if reverted:
        where = f"v{reverted['version']}" if reverted["version"] else "no version (none verifies)"
        print(f"{name}@{alias} moved back to {where}: {reverted['reverted']}")
    return {"outside_gate": lines, "reverted": reverted}


check_gate_task = task(_check_gate, name="check-gate", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
                       retry_condition_fn=should_retry)


def _signed(verdict: Any) -> str:
    """" by <approver>: <reason>" from the signed record (the history tag is editable by hand)."""
    return f" by {verdict.record.approver}: {verdict.record.reason}" if verdict.record else ""


def verified_reader(tracking_uri: str, name: str, version: str, last: dict[str, Any]) -> Callable[[], Any]:
    """A ``read`` for :func:`wait_for_decision`: the version with the status its signature proves;
    ``last["verdict"]`` keeps the latest verdict, and a tag claim it does not prove is printed once."""
    def read() -> Any:
        record, verdict = actions.read_verified(tracking_uri, name, version)
        if verdict.why and verdict.why != getattr(last.get("verdict"), "why", None):
            print(f"{name} v{version}: not adopted: {verdict.why}; waiting for a signed decision")
        last["verdict"] = verdict
        return record
    return read


@flow(name="promotion", log_prints=True)
def promotion(model_name: str, version: str, settings_path: str | None = None,
              tracking_uri: str | None = None) -> Any:
    """Waits for the approval of ``model_name`` ``version`` and promotes it when it is approved.

    Returns a Completed state named Promoted, Rejected or TimedOut whose result is a dict with
    ``outcome``, ``model_name``, ``version``, ``status`` (the signed decision), ``alias``,
    ``previous`` (the version the alias pointed at before, when promoted), ``release`` (the production
    release the promoted version is live as, see :mod:`registry.releases`), ``outside_gate`` (lines
    naming what was set by hand) and ``reverted`` (the alias history entry when the alias was moved
    back, else None). ``settings_path``: the runtime settings file
    (default: settings.yaml of the working directory, or $MLOPS_SETTINGS).
    """
    from prefect.runtime import flow_run
    from prefect.states import Completed

    settings = load_settings(settings_path)
    cfg, uri = settings.promotion, tracking_uri or settings.tracking.uri
    version = str(version)
    print(f"waiting for a decision on {model_name} v{version} (every {cfg.poll_interval_s:g} s, "
          f"at most {cfg.timeout_s:g} s)")
    gate = check_gate_task(uri, model_name, cfg.alias, cfg.revert_unverified_alias)
    last: dict[str, Any] = {}
    record = wait_for_decision(verified_reader(uri, model_name, version, last), cfg.timeout_s, cfg.poll_interval_s)
    result: dict[str, Any] = {"model_name": model_name, "version": version, "alias": cfg.alias, "previous": None,
                              **gate}
    if record is None:
        message = (f"{model_name} v{version}: no decision within {cfg.timeout_s:g} s; still pending, "
                   f"{cfg.alias} untouched")
        return Completed(name=TIMED_OUT, message=message,
                         data={**result, "outcome": TIMED_OUT, "status": PENDING})
    if record.status == REJECTED:
        message = f"{model_name} v{version} was rejected{_signed(last['verdict'])}; {cfg.alias} untouched"
        return Completed(name=REJECTED_OUTCOME, message=message,
                         data={**result, "outcome": REJECTED_OUTCOME, "status": record.status})
    run_id = str(flow_run.id) if flow_run.id else None
    promoted = promote_task(uri, model_name, version, cfg.alias, run_id, settings.checkpoint)
    previous = f" (was v{promoted['previous']})" if promoted["previous"] else ""
    release = f", release {promoted['release']}" if promoted["release"] else ""
    message = f"{model_name} v{version} approved{_signed(last['verdict'])}; now {cfg.alias}{release}{previous}"
    return Completed(name=PROMOTED, message=message,
                     data={**result, "outcome": PROMOTED, "status": record.status, "previous": promoted["previous"],
                           "release": promoted["release"]})


def start_promotion(model_name: str, version: str, settings_path: str | None = None,
                    deployment: str = PROMOTION_DEPLOYMENT) -> str | None:
    """Starts a promotion flow run for a freshly registered version when ``promotion.after_training``
    is true; returns its flow run id (None when the setting is off).

    The run is created from the ``promotion/local`` deployment (deploy/prefect.yaml) and this call
    returns at once: waiting for a person can take a day, and the training flow run should end when
    training does. Called inside a flow run, the new run is linked to it as a subflow in the UI.
    """
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    if not load_settings(settings_path).promotion.after_training:
        return None
    parameters = {"model_name": model_name, "version": str(version)}
    if settings_path is not None:
        parameters["settings_path"] = settings_path
    try:
        started = run_deployment(deployment, parameters=parameters, timeout=0)
    except ObjectNotFound:
        raise ConfigError(f"promotion.after_training: deployment {deployment!r} not found on the Prefect API; "
                          "apply deploy/prefect.yaml (mlops up) or set promotion.after_training: false") from None
    print(f"promotion of {model_name} v{version}: flow run {started.name} ({started.id}) waits for approval")
    return str(started.id)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.promotion", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--version", required=True, help="model version to wait for")
    parser.add_argument("--settings", default=None,
                        help="runtime settings file, promotion and tracking sections (default: settings.yaml, $MLOPS_SETTINGS)")
    args = parser.parse_args(argv)
    tracking_uri = load_settings(args.settings).tracking.uri
    store.get_version(actions.registry_client(tracking_uri), args.model, args.version)  # unknown: one line, no flow run
    state = promotion(args.model, args.version, args.settings, return_state=True)
    if state.is_failed():
        state.result()
    print(state.message)
    if state.name != PROMOTED:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
