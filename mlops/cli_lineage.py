"""``mlops lineage``: which data, code and run produced what an endpoint serves, and the reverse.

    mlops lineage endpoint NAME            endpoint -> model version -> run/trial -> pipeline run -> dataset -> raw
    mlops lineage dataset MD5              dataset -> runs -> model versions -> endpoints
    mlops lineage model NAME VERSION       model version -> runs -> dataset, and its endpoints

``--format text|json|mermaid``. Deployment records are read from ``--records-dir`` (default:
serve.records_dir of the runtime settings).
"""

from __future__ import annotations

import argparse
from typing import Any


def records_dir(args: argparse.Namespace) -> str:
    if args.records_dir:
        return args.records_dir
    from mlops.cli import settings

    return settings(args).serve.records_dir


def cmd_lineage(args: argparse.Namespace) -> None:
    from mlops.cli import client_for
    import lineage.graph as lineage
    from registry.auth import denied_as_error
    from lineage.render import render

    client = client_for(args)
    directory = records_dir(args)
    with denied_as_error(f"lineage {args.target}"):
        if args.target == "endpoint":
            graph = lineage.lineage_of_endpoint(client, directory, args.name)
        elif args.target == "dataset":
            graph = lineage.lineage_of_dataset(client, directory, args.md5)
        else:
            graph = lineage.lineage_of_model_version(client, directory, args.name, args.version)
    print(render(graph, args.format))


def add_parser(subparsers: Any) -> None:
    from lineage.render import FORMATS

    parser = subparsers.add_parser("lineage", help="lineage of an endpoint, a dataset version or a model version")
    targets = parser.add_subparsers(dest="target", required=True)
    endpoint = targets.add_parser("endpoint", help="endpoint -> model version -> run -> dataset -> raw source")
    endpoint.add_argument("name", help="endpoint name (serve.endpoint)")
    dataset = targets.add_parser("dataset", help="dataset -> runs -> model versions -> endpoints")
    dataset.add_argument("md5", help="dataset version: the DVC md5 of data/processed (dataset_md5 tag)")
    model = targets.add_parser("model", help="model version -> runs -> dataset, and the endpoints serving it")
    model.add_argument("name", help="registered model name")
    model.add_argument("version")
    for sub in (endpoint, dataset, model):
        sub.add_argument("--format", choices=FORMATS, default="text")
        sub.add_argument("--records-dir", help="deployment records (default: serve.records_dir of the settings)")
        sub.set_defaults(func=cmd_lineage)
