"""``mlops``: what is not already a dvc, prefect or mlflow command.

    mlops up                                   local MLflow UI + Prefect server, deployments and worker
    mlops up --backend-store postgresql://... --artifacts s3://bucket/prefix [--host H --auth]
    mlops db upgrade [URL]                     create or migrate MLflow's database schema
    mlops models list|show|history|approve|reject|promote|rollback
    mlops keys show|rotate|export-public       the approval signing key and the keyring
    mlops data contract init|diff|update       the data contract in git (gx/expectations/<name>.json)
    mlops data-remote pull NAME VERSION        dvc pull the data a model version was trained on (data_remote settings)
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ml.errors import ConfigError, cli_errors


# Command groups that live beside the code they drive; each module has add_parser(subparsers).
COMMAND_MODULES: tuple[str, ...] = ("mlops.cli_serve", "mlops.cli_lineage", "mlops.cli_checkpoints", "mlops.cli_runs",
                                  "mlops.cli_keys", "mlops.cli_data", "mlops.cli_data_remote")


def tracking_uri(args: argparse.Namespace) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else tracking.uri of the runtime settings."""
    if args.tracking_uri:
        return args.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return settings(args).tracking.uri


def settings(args: argparse.Namespace) -> Any:
    """The runtime settings: --settings, else $MLOPS_SETTINGS, else settings.yaml (MLOPS_* env on top)."""
    from ml.settings import load_settings

    return load_settings(getattr(args, "settings", None))


def current_user() -> str:
    """Against an mlflow server with basic auth the approver is the authenticated user."""
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


def client_for(args: argparse.Namespace) -> Any:
    from mlflow import MlflowClient

    uri = tracking_uri(args)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion_comparison(tags: dict[str, str]) -> str:
    """The champion/challenger verdict register recorded on a version, in a few words."""
    verdict = tags.get("champion_gate")
    if not verdict:
        return ""
    if "champion_delta" in tags:
        return (f"vs champion v{tags.get('champion_version', '?')} "
                f"{float(tags['champion_test_accuracy']):.4f}: {float(tags['champion_delta']):+.4f} ({verdict})")
    return f"champion gate: {verdict}"


def print_contract(tags: dict[str, str]) -> None:
    """The data contract a version was trained under, its input signature, and a recorded breaking change."""
    if "contract_digest" in tags:
        print(f"  contract: {tags.get('contract_path', '?')} v{tags.get('contract_version', '?')} "
              f"{tags['contract_digest']} ({tags.get('contract_artifact', 'no artifact')})")
    if "input_signature" in tags:
        signature = json.loads(tags["input_signature"])
        inputs = signature.get("inputs", [])
        shown = ", ".join(f"{name}:{dtype}" for name, dtype in inputs[:8]) + (", ..." if len(inputs) > 8 else "")
        print(f"  inputs ({len(inputs)}): {shown}")
        print(f"  classes ({len(signature.get('classes', []))}): {', '.join(signature.get('classes', []))}")
    if "breaking_change" in tags:
        print(f"  BREAKING CHANGE (register.allow_breaking_change): {tags['breaking_change']}")


def print_record(record: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(record.to_dict(), indent=2))
        return
    aliases = f" [{', '.join(record.aliases)}]" if record.aliases else ""
    print(f"{record.name} v{record.version}{aliases}: {record.status}")
    for key in ("test_accuracy", "dataset_md5", "dataset_source", "git_commit", "source_run_id"):
        if key in record.tags:
            print(f"  {key}: {record.tags[key]}")
    if record.tags.get("champion_gate"):
        print(f"  {champion_comparison(record.tags)}")
    if record.tags.get("retrain_replaces"):
        from tasks.retrain import replacement_line

        print(f"  retraining: {replacement_line(record.tags)}")
    if "release_version" in record.tags:
        print(f"  release: {record.tags['release_version']} at {record.tags.get('release_location', '?')} "
              f"(model.safetensors sha256 {record.tags.get('release_sha256', '?')})")
    print_contract(record.tags)
    for event in record.history:
        flag = " (self-approval)" if event.get("self_approval") else ""
        via = f" via {event['via']}" if event.get("via", "cli") != "cli" else ""
        signed = f" [signed, key {event['key_id']}]" if event.get("key_id") else ""
        print(f"  {event['at']}  {event['from_status']} -> {event['to_status']} by {event['by']}{flag}{via}{signed}: "
              f"{event['reason']}")


def list_line(record: Any) -> str:
    from registry.approval import PENDING
    from tasks.retrain import replacement_line

    aliases = f" [{', '.join(record.aliases)}]" if record.aliases else ""
    comparison = champion_comparison(record.tags)
    # a pending version a retraining registered: the champion it would replace, on both test splits
    replaces = replacement_line(record.tags) if record.status == PENDING else ""
    return (f"{record.name} v{record.version}{aliases}: {record.status}  "
            f"accuracy={record.tags.get('test_accuracy', '?')}{'  ' + comparison if comparison else ''}"
            + (f"\n  {replaces}" if replaces else ""))


def cmd_models(args: argparse.Namespace) -> None:
    """The registry commands; changes go through registry.actions, which authorizes them first."""
    from registry import actions, gate, store
    from registry.auth import denied_as_error

    uri = tracking_uri(args)
    what = f"models {args.action}" + (f" {args.name}" if args.name else "")
    if args.action == "approve":
        print_record(actions.approve_version(uri, args.name, args.version, args.reason, args.approver,
                                             args.allow_self_approval), args.json)
    elif args.action == "reject":
        print_record(actions.reject_version(uri, args.name, args.version, args.reason, args.approver), args.json)
    elif args.action == "promote":
        print_record(actions.promote_version(uri, args.name, args.version, args.alias,
                                             checkpoint=settings(args).checkpoint), args.json)
    elif args.action == "rollback":
        print_record(actions.rollback_alias(uri, args.name, args.alias, checkpoint=settings(args).checkpoint),
                     args.json)
    else:
        client = client_for(args)
        with denied_as_error(what):
            if args.action == "list":  # signatures checked; weights by show, serve and promotion
                names = [args.name] if args.name else [m.name for m in client.search_registered_models()]
                checked = [gate.list_findings(client, name) for name in names]
                if args.json:
                    print(json.dumps([{**r.to_dict(), "verification": gate.verdict_dict(verdicts[r.version])}
                                      for records, verdicts, _ in checked for r in records], indent=2))
                    return
                for name, (records, verdicts, findings) in zip(names, checked, strict=True):
                    for record in records:
                        print(list_line(record) + gate.flag(verdicts[record.version]))
                    for finding in findings:
                        if finding.alias:
                            print(finding.line(name))
                return
            record = store.get_version(client, args.name, args.version)
            verdict = store.verify_version(client, record) if args.action == "show" else None
        if args.action == "history":
            print(json.dumps(list(record.history), indent=2))
        elif args.json:
            print(json.dumps({**record.to_dict(), "verification": gate.verdict_dict(verdict)}, indent=2))
        else:
            print_record(record, False)
            print("\n".join(gate.show_lines(record.name, record, verdict)))


def server_store(args: argparse.Namespace) -> tuple[str, str]:
    """The database the tracking server serves and where that came from: --backend-store (or the
    db command's URL), else server.backend_store of the settings, else tracking.uri."""
    given = getattr(args, "backend_store", None) or getattr(args, "url", None)
    if given:
        return given, "--backend-store" if getattr(args, "backend_store", None) else "url"
    if settings(args).server.backend_store:
        return settings(args).server.backend_store, "server.backend_store"
    return tracking_uri(args), "tracking.uri"


def cmd_up(args: argparse.Namespace) -> None:
    """Starts the servers and keeps them up until Ctrl-C, SIGTERM or SIGHUP.

    What a user can get wrong about the tracking server (an address other machines reach without
    authentication, an unreachable or unmigrated database, a missing bucket, wrong S3 credentials)
    is checked first and ends in one line before any server starts.
    """
    from mlops import services

    conf = settings(args)
    server = conf.server
    uri, source = server_store(args)
    if not uri.startswith(("sqlite:", "postgresql:", "postgres:", "mysql:")):
        raise ConfigError(f"{source}: `mlops up` serves a database store (sqlite:///..., postgresql://...), got {uri!r}")
    artifacts = args.artifacts or server.artifacts or conf.tracking.artifact_root
    host, port = args.host or server.host, args.mlflow_port or server.port
    auth = args.auth or server.auth
    services.check_exposure(host, auth, args.insecure)
    services.check_database(uri)
    if str(artifacts).startswith("s3://"):
        services.check_bucket(artifacts, server.s3_endpoint_url)
    services.check_port_free(host, port, f"--mlflow-port {port}")
    if auth and approval_account():
        services.check_port_free(host, port + 1, f"the approval service (--mlflow-port {port} + 1)")
    env = {"MLFLOW_S3_ENDPOINT_URL": server.s3_endpoint_url} if server.s3_endpoint_url else {}
    extra = ["--app-name", "basic-auth"] if auth else []
    allowed_hosts = args.allowed_hosts or ",".join(server.allowed_hosts)
    if allowed_hosts:
        extra += ["--allowed-hosts", allowed_hosts]
    logs = Path(".mlops-logs")
    logs.mkdir(exist_ok=True)
    procs = []
    # A `kill` (SIGTERM) or a closed terminal (SIGHUP) stops everything as Ctrl-C does: the servers
    # run in sessions of their own, so nothing else would reach them.
    for signum in STOP_SIGNALS:
        signal.signal(signum, _interrupt)
    try:
        procs.append(services.start_mlflow(uri, artifacts, port, log=logs / "mlflow.log", extra=extra, env=env,
                                           host=host))
        print(f"MLflow UI:   {services.local_url(host, port)}" + (" (basic auth)" if auth else "")
              + ("" if services.is_loopback(host) else f", listening on {host}"))
        print(f"  store:     {services.describe_database(uri)}")
        proxied = services.is_remote_uri(artifacts) or not services.is_loopback(host)
        print(f"  artifacts: {artifacts}" + (" (proxied: clients need no storage credentials)" if proxied else ""))
        if auth:
            procs.extend(start_approval_service(services, host, port, logs))
        if not args.no_prefect:
            env = services.prefect_env(args.prefect_port)
            procs.append(services.start_prefect(args.prefect_port, log=logs / "prefect-server.log"))
            services.deploy_flows(".", env)
            procs.append(services.start_worker(".", env, log=logs / "prefect-worker.log"))
            print(f"Prefect UI:  http://127.0.0.1:{args.prefect_port}")
            print(f"Run the pipeline:  export PREFECT_API_URL={env['PREFECT_API_URL']}")
            print("                   .venv/bin/prefect deployment run 'training-pipeline/local'")
        print(f"Logs in {logs}/. Ctrl-C stops everything.")
        sys.stdout.flush()
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        dead = next(p for p in procs if p.poll() is not None)
        raise SystemExit(f"error: {Path(dead.args[0]).name} exited with {dead.returncode}; see {logs}/")
    except KeyboardInterrupt:
        pass
    finally:
        for signum in (*STOP_SIGNALS, signal.SIGINT):  # a second signal must not cut the shutdown short
            signal.signal(signum, signal.SIG_IGN)
        for proc in reversed(procs):
            services.stop(proc)
        print("Stopped.", flush=True)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def approval_account() -> bool:
    """Whether MLFLOW_TRACKING_USERNAME/PASSWORD name the account an approval service writes as."""
    return bool(os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD"))


def start_approval_service(services: Any, host: str, port: int, logs: Path) -> list[Any]:
    """Beside a basic-auth MLflow server, the approval service on the next port (registry/service.py):
    it signs for users the server authenticates as holding MANAGE, and writes as the account in
    MLFLOW_TRACKING_USERNAME/PASSWORD, which must be allowed to write the models' tags (an admin)."""
    if not approval_account():
        print("Approvals:   no approval service (set MLFLOW_TRACKING_USERNAME/PASSWORD to an admin account to "
              "start one); each approver signs with a key of their own")
        return []
    url = services.local_url(host, port + 1)
    proc = services.start_server([sys.executable, "-m", "registry.service", "--tracking-uri",
                                  services.local_url(host, port), "--host", host, "--port", str(port + 1)],
                                 f"{url}/health", 60, None, logs / "approval-service.log")
    print(f"Approvals:   {url}  (approvers: export MLOPS_APPROVAL_SERVICE={url}; endpoints: its /keyring)")
    return [proc]


def cmd_db_upgrade(args: argparse.Namespace) -> None:
    """``mlflow db upgrade`` with the URL from the settings and the checks ``mlops up`` makes."""
    from mlops import services

    uri, source = server_store(args)
    if not uri.startswith(("sqlite:", "postgresql:", "postgres:", "mysql:")):
        raise ConfigError(f"{source}: expected a database URL (sqlite:///..., postgresql://...), got {uri!r}")
    before, after = services.upgrade_database(uri)
    done = (f"schema created at revision {after}" if before is None else
            f"schema already at revision {after}" if before == after else f"schema migrated from {before} to {after}")
    print(f"{services.describe_database(uri)}: {done}")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlops", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (for register.model_name)")
    parser.add_argument("--settings", help="runtime settings file (default: $MLOPS_SETTINGS, else settings.yaml)")
    parser.add_argument("--tracking-uri", help="MLflow store or server (default: tracking.uri of the settings)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="MLflow UI on the pipeline's store, Prefect server, deployments and worker")
    up.add_argument("--mlflow-port", type=int, help="MLflow server port (default: server.port, 5000)")
    up.add_argument("--prefect-port", type=int, default=4200)
    up.add_argument("--no-prefect", action="store_true", help="only the MLflow UI")
    up.add_argument("--backend-store", help="database the MLflow server serves, e.g. postgresql://user:pw@host:5432/mlflow "
                                            "(default: server.backend_store, else tracking.uri)")
    up.add_argument("--artifacts", help="s3://bucket/prefix (proxied by the server) or a directory "
                                        "(default: server.artifacts, else tracking.artifact_root)")
    up.add_argument("--host", help="interface the MLflow server binds (default: server.host, 127.0.0.1)")
    up.add_argument("--auth", action="store_true", help="MLflow's basic-auth mode (--app-name basic-auth)")
    up.add_argument("--insecure", action="store_true",
                    help="allow a --host other machines reach without --auth (anyone there can approve models)")
    up.add_argument("--allowed-hosts", help="Host headers the MLflow server accepts, comma-separated "
                                            "(default: server.allowed_hosts, else MLflow's: localhost, private IPs)")
    up.set_defaults(func=cmd_up)

    db = sub.add_parser("db", help="the MLflow database's schema")
    db_actions = db.add_subparsers(dest="action", required=True)
    upgrade = db_actions.add_parser("upgrade", help="mlflow db upgrade: create or migrate MLflow's schema "
                                                    "(back the database up first)")
    upgrade.add_argument("url", nargs="?", help="database URL (default: server.backend_store, else tracking.uri)")
    upgrade.set_defaults(func=cmd_db_upgrade)

    models = sub.add_parser("models", help="the approval-gated model registry")
    actions = models.add_subparsers(dest="action", required=True)
    for action, help_text in (("list", "versions and their approval status"), ("show", "one version"),
                              ("history", "a version's approval history as JSON"),
                              ("approve", "PendingManualApproval -> Approved"),
                              ("reject", "PendingManualApproval or Approved -> Rejected"),
                              ("promote", "point the champion alias at an Approved version"),
                              ("rollback", "give champion back to the previous version")):
        p = actions.add_parser(action, help=help_text)
        p.add_argument("name", nargs="?" if action == "list" else None)
        if action not in ("list", "rollback"):
            p.add_argument("version")
        if action in ("approve", "reject"):
            p.add_argument("--reason", required=True, help="why; kept in the history")
            p.add_argument("--approver", help="against a local store (default: the OS user); an authenticating "
                                              "server records the authenticated user and refuses another name")
        if action == "approve":
            p.add_argument("--allow-self-approval", action="store_true",
                           help="let the run's author approve (recorded in the history)")
        if action in ("promote", "rollback"):
            p.add_argument("--alias", default="champion", help="the alias to move (default: champion)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_models)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
