"""``mlops serve``: the HTTP endpoint over ``models:/<name>@<alias>``, following the alias.

Defaults come from the runtime settings' ``serve`` section, and ``register.model_name`` of the params
file for the model.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve the model behind a registry alias over HTTP, following the alias")
    p.add_argument("--name", metavar="MODEL", help="registered model (default: register.model_name)")
    p.add_argument("--alias", help="alias to serve and follow (default: serve.alias)")
    p.add_argument("--host", help="address to bind (default: serve.host)")
    p.add_argument("--port", type=int, help="port to bind, 0 for any free port (default: serve.port)")
    p.add_argument("--endpoint", help="endpoint name in deployment records (default: serve.endpoint)")
    p.add_argument("--poll-interval", type=float, dest="poll_interval_s", metavar="SECONDS",
                   help="seconds between checks of the alias (default: serve.poll_interval_s)")
    p.add_argument("--keyring", metavar="FILE", help="public keys that verify approvals (default: "
                                                     "$MLOPS_APPROVAL_KEYRING, else the user's mlops-pipeline config dir)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    from deploy.records import check_endpoint_name
    from deploy.serve import serve
    from ml.config import build_section, load_params
    from ml.settings import ServeConfig
    from mlops.cli import settings, tracking_uri

    overrides = {key: getattr(args, key) for key in ("alias", "host", "port", "endpoint", "poll_interval_s")
                 if getattr(args, key) is not None}
    cfg = build_section(ServeConfig, "serve", {**settings(args).serve.model_dump(), **overrides})
    check_endpoint_name(cfg.endpoint)
    serve(cfg, tracking_uri(args), args.name or load_params(args.params).register.model_name, keyring=args.keyring)
