"""Lineage queries both ways over the MLflow store and the deployment records.

    endpoint -> model version -> source run (or tuning trial) -> parent runs -> dataset -> raw source
    dataset -> runs -> model versions -> endpoints

Links followed, as the pipeline records them:

- endpoint -> version: deployment records (``deploy.records``, one JSON-lines file per endpoint);
- version -> run: the version's ``run_id``;
- run -> parent: the ``mlflow.parentRunId`` tag (a pipeline run, ``mlops.run_kind=pipeline``, carries
  ``prefect_flow_run_id``; an Optuna study run parents its trials);
- run -> dataset: tags ``dataset_md5``, ``dataset_source``, ``git_commit`` and the logged dataset
  input (digest = DVC md5), on the run or its nearest ancestor.

A model version shows who signed its approval (checked against the keyring, see
:mod:`registry.signing`), or why the decision its tags claim does not verify, and the production
release it was published as when promoted (:mod:`registry.releases`).

A link that is not recorded, or points at something deleted, becomes a node marked missing, so a
partial lineage is still shown. Results are a :class:`Lineage` graph; :mod:`lineage.render`
prints it as text, JSON or Mermaid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml.errors import RegistryError
from registry.approval import CHAMPION
from registry.releases import release_of
from registry.signing import Keyring, verify_tags
from registry.store import VersionRecord, get_version, is_not_found

PARENT_TAG = "mlflow.parentRunId"
RUN_KIND_TAG = "mlops.run_kind"
TRIAL_TAG = "optuna_trial"
MAX_PARENT_DEPTH = 8
_DIGEST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class Node:
    """One thing in the lineage: an endpoint, a model version, a run, a dataset, a raw source, or a
    link that is missing."""

    id: str
    kind: str
    label: str
    attrs: dict[str, Any] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)
    missing: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "label": self.label, "missing": self.missing, **self.attrs}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    relation: str


@dataclass
class Lineage:
    """A directed graph from ``root``, in the direction of the query."""

    root: str = ""
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)

    def add(self, node: Node) -> str:
        self.nodes.setdefault(node.id, node)
        self.root = self.root or node.id
        return node.id

    def link(self, source: str, target: str, relation: str) -> None:
        edge = Edge(source, target, relation)
        if edge not in self.edges:
            self.edges.append(edge)

    def missing(self, source: str, relation: str, what: str) -> None:
        """Records that the link ``relation`` from ``source`` leads nowhere, and why."""
        node_id = self.add(Node(f"missing:{source}:{relation}", "missing", f"missing: {what}", missing=True))
        self.link(source, node_id, relation)

    def children(self, node_id: str) -> list[Edge]:
        return [e for e in self.edges if e.source == node_id]

    def of_kind(self, kind: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "nodes": [n.to_dict() for n in self.nodes.values()],
                "edges": [{"from": e.source, "to": e.target, "relation": e.relation} for e in self.edges]}


# -- nodes ------------------------------------------------------------------------------------------

def _history_line(event: dict) -> str:
    via = f" via {event['via']}" if event.get("via", "cli") != "cli" else ""
    return (f"{event.get('at', '?')} {event.get('from_status', '?')} -> {event.get('to_status', '?')} "
            f"by {event.get('by', '?')}{via}: {event.get('reason', '')}")


def version_node(record: VersionRecord, keyring: Keyring | None = None) -> Node:
    """The version, its gate verdicts, and its approval: who signed it (``keyring``: default the
    user's, see :func:`registry.signing.keyring_path`), or why the claimed decision does not verify."""
    aliases = f" [{', '.join(record.aliases)}]" if record.aliases else ""
    gate = {k: record.tags[k] for k in ("test_accuracy", "champion_gate", "champion_version",
                                          "champion_test_accuracy", "champion_delta") if k in record.tags}
    verdict = verify_tags(record.name, record.version, record.tags, keyring or Keyring.load())
    signed = verdict.record if verdict.record and not verdict.why else None
    details = [f"signature: {verdict.line()}" if signed else
               f"signature: UNVERIFIED: {verdict.why}" if verdict.why else "signature: no signed decision"]
    details += [f"{k}: {v}" for k, v in gate.items()]
    details += [f"approval: {_history_line(e)}" for e in record.history] or ["approval: no decision recorded"]
    return Node(f"version:{record.name}/{record.version}", "model_version",
                f"model {record.name} v{record.version}{aliases}: {verdict.status}",
                {"name": record.name, "version": record.version, "status": verdict.status,
                 "claimed_status": record.status, "aliases": list(record.aliases), "run_id": record.run_id,
                 "source": record.source, "history": list(record.history),
                 "signed_by": signed.approver if signed else None,
                 "signer_identity": signed.identity if signed else None,
                 "signer_key_id": signed.key_id if signed else None, "signed_at": signed.at if signed else None,
                 "unverified": verdict.why or None, **gate}, details)


def run_kind(tags: dict[str, str]) -> str:
    """training | trial | pipeline | study | ... from the run's tags."""
    if TRIAL_TAG in tags or tags.get(RUN_KIND_TAG) == "trial":
        return "trial"
    return tags.get(RUN_KIND_TAG) or tags.get("stage", "run")


def run_node(run: Any) -> Node:
    tags = run.data.tags
    kind = run_kind(tags)
    name = tags.get("mlflow.runName") or run.info.run_name or ""
    attrs = {"run_id": run.info.run_id, "run_name": name, "run_kind": kind,
             "experiment_id": run.info.experiment_id, "status": run.info.status,
             "user": tags.get("mlflow.user"), "git_commit": tags.get("git_commit")}
    for key in ("prefect_flow_run_id", TRIAL_TAG, "registered_version", "champion_gate", "register_refused"):
        if key in tags:
            attrs[key] = tags[key]
    details = [f"{k}: {attrs[k]}" for k in ("prefect_flow_run_id", TRIAL_TAG, "git_commit", "user", "status",
                                            "experiment_id", "champion_gate", "register_refused") if attrs.get(k)]
    return Node(f"run:{run.info.run_id}", "run", f"{kind} run {run.info.run_id} ({name})", attrs, details)


def dataset_inputs(run: Any) -> list[dict[str, Any]]:
    inputs = getattr(getattr(run, "inputs", None), "dataset_inputs", None) or []
    out = []
    for item in inputs:
        tags = {t.key: t.value for t in (item.tags or [])}
        out.append({"name": item.dataset.name, "digest": item.dataset.digest, "source": item.dataset.source,
                    "context": tags.get("mlflow.data.context"), "raw_source": tags.get("raw_source"),
                    "git_commit": tags.get("git_commit")})
    return out


def dataset_of(run: Any) -> dict[str, Any] | None:
    """The dataset version a run records (tags first, then its dataset inputs), or None."""
    tags, inputs = run.data.tags, dataset_inputs(run)
    md5 = tags.get("dataset_md5") or next((i["digest"] for i in inputs), None)
    if not md5:
        return None
    matching = [i for i in inputs if i["digest"] == md5]
    return {"md5": md5, "git_commit": tags.get("git_commit") or next((i["git_commit"] for i in matching), None),
            "source": tags.get("dataset_source") or next((i["raw_source"] for i in matching), None),
            "inputs": matching}


def dataset_node(dataset: dict[str, Any]) -> Node:
    details = [f"git_commit: {dataset.get('git_commit') or 'not recorded'}"]
    details += [f"input: {i['name']} ({i.get('context') or 'no context'}) from {i['source']}"
                for i in dataset["inputs"]]
    return Node(f"dataset:{dataset['md5']}", "dataset", f"dataset {dataset['md5']}", dict(dataset), details)


def endpoint_node(name: str, records: list[Any]) -> Node:
    serving = [r for r in records if r.event != "stop"]
    last = records[-1]
    state = f"stopped at {last.at}" if last.event == "stop" else f"serving since {serving[-1].at}"
    served = [{"model_name": r.model_name, "model_version": r.model_version, "event": r.event, "at": r.at}
              for r in records]
    details = [f"{r['at']} {r['event']} {r['model_name']} v{r['model_version']}" for r in served]
    return Node(f"endpoint:{name}", "endpoint", f"endpoint {name} {last.url}: {state}",
                {"endpoint": name, "url": last.url, "state": "stopped" if last.event == "stop" else "serving",
                 "records": served}, details)


# -- links ------------------------------------------------------------------------------------------

def _get_run(client: Any, run_id: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
        return None


def add_run_chain(graph: Lineage, client: Any, run_id: str | None, source: str, relation: str) -> None:
    """The run, its parents up to the root run, and the dataset it (or an ancestor) trained on."""
    if not run_id:
        graph.missing(source, relation, "no source run recorded")
        return
    run = _get_run(client, run_id)
    if run is None:
        graph.missing(source, relation, f"run {run_id} not found (deleted?)")
        return
    node_id = graph.add(run_node(run))
    graph.link(source, node_id, relation)
    dataset, current = dataset_of(run), run
    for _ in range(MAX_PARENT_DEPTH):
        parent_id = current.data.tags.get(PARENT_TAG)
        if not parent_id:
            if current is run:
                graph.missing(node_id, "part of", "no parent pipeline run recorded")
            break
        parent = _get_run(client, parent_id)
        if parent is None:
            graph.missing(node_id, "part of", f"parent run {parent_id} not found (deleted?)")
            break
        parent_node = graph.add(run_node(parent))
        graph.link(node_id, parent_node, "part of")
        dataset = dataset or dataset_of(parent)
        current, node_id = parent, parent_node
    run_node_id = f"run:{run.info.run_id}"
    if dataset is None:
        graph.missing(run_node_id, "trained on", "no dataset version recorded on the run or its parents")
        return
    dataset_id = graph.add(dataset_node(dataset))
    graph.link(run_node_id, dataset_id, "trained on")
    if dataset.get("source"):
        raw_id = graph.add(Node(f"raw:{dataset['source']}", "raw_source", f"raw source {dataset['source']}",
                                {"source": dataset["source"]}))
        graph.link(dataset_id, raw_id, "prepared from")
    else:
        graph.missing(dataset_id, "prepared from", "no raw source recorded")


def add_contract(graph: Lineage, record: Any, version_id: str) -> None:
    """The data contract a version was trained under (tags set at register), when it records one."""
    tags = record.tags
    if "contract_digest" not in tags:
        return
    node = Node(f"contract:{tags['contract_digest']}", "contract",
                f"data contract {tags.get('contract_path', '?')} v{tags.get('contract_version', '?')}",
                {"path": tags.get("contract_path"), "digest": tags["contract_digest"],
                 "version": tags.get("contract_version"), "artifact": tags.get("contract_artifact")},
                [f"digest: {tags['contract_digest']}", f"artifact: {tags.get('contract_artifact', 'not recorded')}"])
    graph.link(version_id, graph.add(node), "trained under")


def add_release(graph: Lineage, record: Any, version_id: str) -> None:
    """The production release a version was published as (tags set at promotion), when it has one;
    ``live`` when the version holds the champion alias."""
    release = release_of(record.name, record.version, record.tags)
    if release is None:
        return
    live = CHAMPION in record.aliases
    node = Node(f"release:{record.name}/{release.version}", "release",
                f"production release {release.version}{f' (live as {CHAMPION})' if live else ''}",
                {"release": release.version, "sha256": release.sha256, "weights_sha256": release.weights_sha256,
                 "location": release.location, "live": live},
                [f"model.safetensors sha256: {release.sha256}", f"location: {release.location or 'not recorded'}"])
    graph.link(version_id, graph.add(node), "released as")


def add_version(graph: Lineage, client: Any, name: str, version: str, source: str, relation: str,
                run_id_hint: str | None) -> None:
    """A version linked from ``source``, then its run chain. When the registry no longer has the
    version, a missing node stands in for it and the chain follows ``run_id_hint`` (the run a
    deployment record names)."""
    try:
        record = get_version(client, name, version)
    except RegistryError:
        graph.missing(source, relation, f"model {name} v{version} not in the registry (deleted?)")
        add_run_chain(graph, client, run_id_hint, f"missing:{source}:{relation}", "trained by")
        return
    version_id = graph.add(version_node(record))
    graph.link(source, version_id, relation)
    add_contract(graph, record, version_id)
    add_release(graph, record, version_id)
    add_run_chain(graph, client, record.run_id or run_id_hint, version_id, "trained by")


# -- queries ----------------------------------------------------------------------------------------

def _records(records_dir: str | Path) -> list[Any]:
    from deploy.records import read_records

    return read_records(records_dir) if Path(records_dir).is_dir() else []


def lineage_of_endpoint(client: Any, records_dir: str | Path, endpoint: str) -> Lineage:
    """endpoint -> the version it serves (or last served) -> run -> parents -> dataset -> raw."""
    from deploy.records import check_endpoint_name, endpoints, read_records

    check_endpoint_name(endpoint)
    records = read_records(records_dir, endpoint) if Path(records_dir).is_dir() else []
    if not records:
        known = ", ".join(endpoints(records_dir)) if Path(records_dir).is_dir() else ""
        raise RegistryError(f"endpoint {endpoint!r}: no deployment records in {records_dir}/"
                            f" (known: {known or 'none'})")
    graph = Lineage()
    root = graph.add(endpoint_node(endpoint, records))
    serving = [r for r in records if r.event != "stop"]
    if not serving:
        graph.missing(root, "serves", "no model version in the deployment records")
        return graph
    now = serving[-1]
    relation = "serves" if records[-1].event != "stop" else "served"
    add_version(graph, client, now.model_name, now.model_version, root, relation, now.run_id)
    return graph


def _served_by(graph: Lineage, records: list[Any], versions: dict[tuple[str, str], str]) -> None:
    """Links each version node to the endpoints whose records show it served."""
    by_endpoint: dict[str, list[Any]] = {}
    for record in records:
        by_endpoint.setdefault(record.endpoint, []).append(record)
    for endpoint, own in by_endpoint.items():
        for key, version_id in versions.items():
            if any((r.model_name, r.model_version) == key and r.event != "stop" for r in own):
                current = [r for r in own if r.event != "stop"][-1]
                serving_now = own[-1].event != "stop" and (current.model_name, current.model_version) == key
                graph.link(version_id, graph.add(endpoint_node(endpoint, own)),
                           "served by (now)" if serving_now else "served by (earlier)")


def lineage_of_model_version(client: Any, records_dir: str | Path, name: str, version: str | int) -> Lineage:
    """version -> run -> parents -> dataset -> raw, and version -> endpoints that serve or served it."""
    graph = Lineage()
    record = get_version(client, name, version)
    version_id = graph.add(version_node(record))
    add_contract(graph, record, version_id)
    add_release(graph, record, version_id)
    add_run_chain(graph, client, record.run_id, version_id, "trained by")
    _served_by(graph, _records(records_dir), {(record.name, record.version): version_id})
    return graph


def _experiment_ids(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def runs_of_dataset(client: Any, md5: str) -> list[Any]:
    """Runs whose ``dataset_md5`` tag or a logged dataset input's digest is ``md5``, oldest first."""
    ids = _experiment_ids(client)
    if not ids:
        return []
    found: dict[str, Any] = {}
    for query in (f"tags.dataset_md5 = '{md5}'", f"dataset.digest = '{md5}'"):
        for run in client.search_runs(ids, query, max_results=1000):
            found.setdefault(run.info.run_id, run)
    return sorted(found.values(), key=lambda r: r.info.start_time or 0)


def versions_of_runs(client: Any, run_ids: list[str], md5: str) -> list[Any]:
    found: dict[tuple[str, str], Any] = {}
    queries = [f"tags.dataset_md5 = '{md5}'"]
    for i in range(0, len(run_ids), 50):
        queries.append("run_id IN (" + ", ".join(f"'{r}'" for r in run_ids[i:i + 50]) + ")")
    for query in queries:
        for mv in client.search_model_versions(query):
            found.setdefault((mv.name, str(mv.version)), mv)
    return sorted(found.values(), key=lambda mv: (mv.name, int(mv.version)))


def lineage_of_dataset(client: Any, records_dir: str | Path, md5: str) -> Lineage:
    """dataset -> runs that trained on it -> versions registered from them -> endpoints serving them."""
    if not _DIGEST.fullmatch(md5):
        raise RegistryError(f"dataset {md5!r}: expected a digest such as a DVC md5 (hex digits, optionally .dir)")
    runs = runs_of_dataset(client, md5)
    versions = versions_of_runs(client, [r.info.run_id for r in runs], md5)
    if not runs and not versions:
        raise RegistryError(f"dataset {md5!r}: no run or model version records it")
    graph = Lineage()
    dataset = next((d for d in map(dataset_of, runs) if d and d["md5"] == md5), None)
    root = graph.add(dataset_node(dataset or {"md5": md5, "git_commit": None, "source": None, "inputs": []}))
    if dataset and dataset.get("source"):
        raw_id = graph.add(Node(f"raw:{dataset['source']}", "raw_source", f"raw source {dataset['source']}",
                                {"source": dataset["source"]}))
        graph.link(root, raw_id, "prepared from")
    for run in runs:
        graph.link(root, graph.add(run_node(run)), "used by")
    version_ids: dict[tuple[str, str], str] = {}
    for mv in versions:
        record = get_version(client, mv.name, mv.version)
        version_id = graph.add(version_node(record))
        version_ids[(record.name, record.version)] = version_id
        add_release(graph, record, version_id)
        source = f"run:{record.run_id}" if f"run:{record.run_id}" in graph.nodes else root
        graph.link(source, version_id, "registered as")
    _served_by(graph, _records(records_dir), version_ids)
    return graph


