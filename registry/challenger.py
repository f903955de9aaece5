"""Champion/challenger: the current champion scored on the challenger's test set, and the verdict.

Both accuracies come from the same rows (``data.processed_dir``'s test split), so the comparison
says which model is better on today's data, not which was better on the data each was trained
with. The decision itself is :func:`registry.approval.is_better_than_champion`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ml.data.contract import ContractError, signature_difference
from ml.errors import RegistryError
from registry.approval import CHAMPION, is_better_than_champion
from registry.store import champion

PASSED = "passed"
FAILED = "failed"
NO_CHAMPION = "no_champion"
INCOMPARABLE = "incomparable"
SIGNATURE_TAG = "input_signature"  # JSON of ml.data.contract.ContractSpec.signature(), set at register


@dataclass(frozen=True)
class ChampionComparison:
    """The outcome of the gate, as recorded on the version, the run and reports/registered.json."""

    verdict: str
    reason: str
    challenger_test_accuracy: float
    champion_version: str | None = None
    champion_test_accuracy: float | None = None
    delta: float | None = None

    @property
    def passed(self) -> bool:
        return self.verdict != FAILED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tags(self) -> dict[str, str]:
        """MLflow tags: ``champion_gate`` and, when a champion was scored, its numbers."""
        tags = {"champion_gate": self.verdict, "champion_gate_reason": self.reason[:5000]}
        if self.champion_version is not None:
            tags["champion_version"] = self.champion_version
        if self.champion_test_accuracy is not None:
            tags["champion_test_accuracy"] = f"{self.champion_test_accuracy:.6f}"
            tags["champion_delta"] = f"{self.delta:+.6f}"
        return tags


def accuracy_on_test_split(model: Any, processed_dir: str | Path) -> float:
    """Accuracy of a torch classifier (any form MLflow loads, see :mod:`ml.model.predict`) on the
    test split of ``processed_dir``."""
    from ml.data.prepare import load_split
    from ml.model.predict import inference_model, predict

    x_test, y_test = load_split(processed_dir, "test")
    return float((predict(inference_model(model), x_test).classes == y_test).mean()) if len(y_test) else 0.0


def load_registered_model(name: str, version: str) -> Any:
    """The PyTorch model of a registered version, on the CPU (the registry set by ml.tracking.mlflow_tracker)."""
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    uri = f"models:/{name}/{version}"
    try:
        return mlflow.pytorch.load_model(uri, map_location="cpu")
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"champion {uri}: could not be loaded to compare against "
                            f"({str(exc).splitlines()[0][:200]})") from None


def compare_with_champion(client: Any, name: str, challenger_accuracy: float, processed_dir: str | Path,
                          min_delta: float, alias: str = CHAMPION, *, signature: dict[str, Any] | None = None,
                          allow_breaking_change: bool = False) -> ChampionComparison:
    """Scores the version holding ``alias`` on the test split and applies the gate.

    No champion: the gate passes (nothing to beat). The labels of the test split are indices into
    the data contract's class list, the mapping the champion was trained under when its input
    ``signature`` (feature names, order, dtypes and class list) equals the challenger's. A champion
    whose signature differs, or that cannot score these rows, raises :class:`ContractError` naming
    why, never a low score; with ``allow_breaking_change`` the gate passes as ``incomparable`` and
    the approver sees that verdict on the version.
    """
    current = champion(client, name, alias)
    if current is None:
        return ChampionComparison(NO_CHAMPION, f"model {name!r} has no {alias} yet", challenger_accuracy)
    recorded = current.tags.get(SIGNATURE_TAG)
    difference = signature_difference(json.loads(recorded), signature) if recorded and signature else None
    if difference:
        if not allow_breaking_change:
            raise ContractError(f"not a challenger of {name} v{current.version}: {difference}; a deliberate schema "
                                "change needs register.allow_breaking_change: true")
        return ChampionComparison(INCOMPARABLE, f"breaking change from champion v{current.version}: {difference}",
                                  challenger_accuracy, current.version)
    model = load_registered_model(name, current.version)
    try:
        champion_accuracy = accuracy_on_test_split(model, processed_dir)
    # a shape mismatch: eager modules raise RuntimeError, torch.export programs fail a shape guard
    except (RuntimeError, AssertionError) as exc:
        why = f"champion {name} v{current.version} cannot score the test split of {processed_dir} " \
              f"({str(exc).splitlines()[0][:200]})"
        if not allow_breaking_change:
            raise ContractError(why) from None
        return ChampionComparison(INCOMPARABLE, why, challenger_accuracy, current.version)
    passed, why = is_better_than_champion(challenger_accuracy, champion_accuracy, current.version, min_delta)
    return ChampionComparison(PASSED if passed else FAILED, why, challenger_accuracy, current.version,
                              champion_accuracy, challenger_accuracy - champion_accuracy)
