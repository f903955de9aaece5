"""Builds a serving test project in the current directory (which holds a small params.yaml).

``python -m tests.integration.serving_setup`` runs the prepare, train, evaluate and register stage
functions twice (the second time with another seed), approves both versions, promotes the first to
``champion`` and prints ``{"tracking_uri", "model_name", "versions", "test_accuracy"}`` as JSON.
It runs in its own process so the stages' process-wide MLflow settings stay out of the test session.

:class:`LoopingClients` is the load a serving test keeps on an endpoint while the champion moves:
client threads that post one body after another and keep every answer, whatever its status or body.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml


def set_seed(params_path: Path, seed: int) -> None:
    params = yaml.safe_load(params_path.read_text())
    params["train"]["seed"] = seed
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    from mlflow import MlflowClient

    from ml.config import load_params
    from ml.settings import load_settings
    from registry import store
    from tasks import evaluate, prepare, register, train

    params_path = Path("params.yaml")
    params = load_params(params_path)
    prepare.run(str(params_path))
    versions, accuracy = [], {}
    for seed in (params.train.seed, params.train.seed + 1):
        set_seed(params_path, seed)
        train.run(str(params_path))
        evaluate.run(str(params_path))
        summary = register.run(str(params_path))
        versions.append(summary["version"])
        accuracy[summary["version"]] = summary["test_accuracy"]
    set_seed(params_path, params.train.seed)
    uri, name = load_settings().tracking.uri, params.register.model_name
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for version in versions:
        store.decide(client, name, version, "Approved", "tester", "serving test", allow_self_approval=True)
    store.promote(client, name, versions[0], "tester")
    print(json.dumps({"tracking_uri": uri, "model_name": name, "versions": versions, "test_accuracy": accuracy}))


@dataclass(frozen=True)
class Answer:
    """One request of a looping client: which body it sent, the HTTP status (None when no HTTP
    answer came: the transport error is the body) and the raw response body."""

    payload: int
    status: int | None
    body: str

    @property
    def model_version(self) -> str | None:
        """The version a 200 answer names; None for any other answer or a body that is no JSON object."""
        if self.status != 200:
            return None
        try:
            payload = json.loads(self.body)
        except ValueError:
            return None
        return payload.get("model_version") if isinstance(payload, dict) else None


class LoopingClients:
    """``clients`` threads, each posting ``payloads`` in turn to ``url + path`` until stopped.

    A thread catches nothing but httpx's transport errors (kept as answers with status None), so
    anything else ends it and surfaces as pytest's unhandled-thread-exception error; :meth:`dead`
    names the threads that ended before :meth:`stop`. Use as a context manager: it starts the
    threads on entry and stops and joins them on exit.
    """

    def __init__(self, url: str, payloads: Sequence[bytes], clients: int = 4, path: str = "/predict",
                 headers: dict[str, str] | None = None) -> None:
        self.url, self.path, self.payloads = url, path, list(payloads)
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.answers: list[list[Answer]] = [[] for _ in range(clients)]
        self._stop = threading.Event()
        self._answered = threading.Condition()  # notified on every answer and when a thread ends
        self.threads = [threading.Thread(target=self._run, args=(k,), name=f"looping-client-{k}", daemon=True)
                        for k in range(clients)]

    def _run(self, k: int) -> None:
        import httpx

        try:
            with httpx.Client(base_url=self.url, timeout=30, headers=self.headers) as client:
                i = k
                while not self._stop.is_set():
                    index = i % len(self.payloads)
                    try:
                        response = client.post(self.path, content=self.payloads[index])
                        answer = Answer(index, response.status_code, response.text)
                    except httpx.HTTPError as exc:
                        answer = Answer(index, None, repr(exc))
                    with self._answered:
                        self.answers[k].append(answer)
                        self._answered.notify_all()
                    i += 1
        finally:
            with self._answered:
                self._answered.notify_all()

    def __enter__(self) -> LoopingClients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 60) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout)

    def counts(self) -> list[int]:
        """How many answers each client has so far."""
        with self._answered:
            return [len(answers) for answers in self.answers]

    def dead(self) -> list[str]:
        """The threads that have ended although :meth:`stop` was not called."""
        return [t.name for t in self.threads if not t.is_alive() and not self._stop.is_set()]

    def failures(self) -> list[Answer]:
        """Every answer so far that is not a 200."""
        with self._answered:
            return [a for answers in self.answers for a in answers if a.status != 200]

    def wait_until_each(self, answered: Callable[[Answer], bool], since: Sequence[int], timeout: float,
                        what: str) -> list[int]:
        """Waits until every client has, after its first ``since[k]`` answers, an answer for which
        ``answered`` holds, and returns the counts at that moment. Fails as soon as a client thread
        has died or an answer is not a 200, naming them, and after ``timeout`` seconds."""
        checked = list(since)  # answers before these indices were looked at already
        seen = [False] * len(self.answers)

        def settled() -> bool:
            for k, answers in enumerate(self.answers):
                new = answers[checked[k]:]
                checked[k] += len(new)
                if any(a.status != 200 for a in new):
                    return True
                seen[k] = seen[k] or any(map(answered, new))
            return all(seen) or bool(self.dead())

        with self._answered:
            done = self._answered.wait_for(settled, timeout)
            counts = [len(answers) for answers in self.answers]
        failures, dead = self.failures(), self.dead()
        assert not failures and not dead, (
            f"while waiting until {what}: dead client threads {dead}, failed answers "
            f"{[(a.status, a.body[:200]) for a in failures[:5]]} ({len(failures)} in all)")
        assert done, f"not every client saw {what} within {timeout:.0f} s (answers per client: {counts})"
        return counts

if __name__ == "__main__":
    main()
