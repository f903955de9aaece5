"""evaluate: test-set metrics and a confusion matrix (JSON, CSV for DVC plots, PNG)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ml.config import EvaluateConfig
from ml.data.prepare import Schema, load_split
from ml.io import atomic_write, atomic_write_json
from ml.model.predict import predict
from ml.model.serialization import load_model


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]
    confusion: list[list[int]]
    labels: list[str]


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> Evaluation:
    """Accuracy, macro averages and per-class precision/recall/F1, plus the confusion matrix."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    index = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=index, zero_division=0)
    metrics: dict[str, Any] = {
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "rows": int(len(y_true)),
        "per_class": {labels[i]: {"precision": float(precision[i]), "recall": float(recall[i]),
                                  "f1": float(f1[i]), "support": int(support[i])} for i in index},
    }
    matrix = confusion_matrix(y_true, y_pred, labels=index).tolist()
    return Evaluation(metrics, matrix, labels)


def render_confusion(evaluation: Evaluation, path: str | Path, title: str = "Confusion matrix (test)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(evaluation.confusion)
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    image = ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(evaluation.labels)), yticks=range(len(evaluation.labels)),
           xticklabels=evaluation.labels, yticklabels=evaluation.labels,
           xlabel="predicted", ylabel="actual", title=title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                color="white" if value > threshold else "black")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def evaluate(cfg: EvaluateConfig, model_dir: str | Path, processed_dir: str | Path) -> Evaluation:
    """The evaluate stage: the trained model on the test split; writes metrics, predictions and the PNG."""
    schema = Schema.read(processed_dir)
    x_test, y_test = load_split(processed_dir, "test")
    y_pred = predict(load_model(model_dir), x_test).classes
    evaluation = classification_metrics(y_test, y_pred, list(schema.classes))
    atomic_write_json(cfg.metrics_file, {**evaluation.metrics, "confusion_matrix": evaluation.confusion,
                                         "labels": evaluation.labels})
    frame = pd.DataFrame({"actual": [schema.classes[i] for i in y_test],
                          "predicted": [schema.classes[i] for i in y_pred]})
    atomic_write(cfg.predictions_file, lambda tmp: frame.to_csv(tmp, index=False))
    render_confusion(evaluation, cfg.confusion_png)
    return evaluation
