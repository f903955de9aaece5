import re

import pytest

from ml.observe.anomaly import AnomalyEvent
from ml.observe.report import MetricSummary, recommendations, slope, summarize_metrics, summary_report, trend


def history(train, val, accuracy=None):
    rows = []
    for i, (t, v) in enumerate(zip(train, val), start=1):
        row = {"epoch": i, "step": 10 * i, "train_loss": t, "val_loss": v}
        if accuracy is not None:
            row["val_accuracy"] = accuracy[i - 1]
        rows.append(row)
    return rows


FALLING = [1.0, 0.8, 0.6, 0.5, 0.4, 0.3]
RISING = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75]
FLAT = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]


def rules(**inputs):
    return [r.rule for r in recommendations(**inputs)]


# --- pure pieces --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, mode", [("val_loss", "min"), ("train_loss", "min"), ("val_accuracy", "max"),
                                        ("macro_f1", "max"), ("train/step_ms", "min"), ("samples_per_s", "max"),
                                        ("test_error", "min")])
def test_metric_directions_come_from_the_one_table(name, mode):
    (summary,) = summarize_metrics([{"epoch": 1, "step": 1, name: 1.0}])
    assert summary.mode == mode


@pytest.mark.parametrize("values, mode, expected", [
    (FALLING, "min", "improving"),
    (FALLING, "max", "worsening"),
    (RISING, "min", "worsening"),
    (RISING, "max", "improving"),
    (FLAT, "min", "flat"),
    ([1.0, 1.001, 0.999, 1.0, 1.002], "min", "flat"),          # moves less than 1% of its level
    ([5.0, 4.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0], "min", "flat"),  # only the last 5 count
    ([1.0], "min", "n/a"),
    ([1.0, float("nan"), 0.5], "min", "improving"),
])
def test_trend(values, mode, expected):
    assert trend(values, mode, window=5) == expected


def test_slope():
    assert slope([1.0, 3.0, 5.0]) == pytest.approx(2.0)
    assert slope([2.0]) == 0.0


def test_summarize_metrics_best_with_epoch_and_step():
    rows = history([1.0, 0.5, 0.7], [0.9, 0.4, 0.4], accuracy=[0.5, 0.9, 0.8])
    summaries = {s.name: s for s in summarize_metrics(rows, window=3)}
    assert summaries["val_loss"] == MetricSummary("val_loss", "min", 0.4, 2, 20, 0.9, 0.4, "improving")
    assert summaries["val_accuracy"].best == 0.9 and summaries["val_accuracy"].best_epoch == 2
    assert summaries["train_loss"].mode == "min" and summaries["train_loss"].last == 0.7
    assert set(summaries) == {"train_loss", "val_loss", "val_accuracy"}   # epoch and step are not metrics


# --- rules --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data_s, compute_s, fires", [(4.0, 6.0, True), (3.0, 7.0, False), (0.0, 10.0, False)])
def test_data_bound_rule(data_s, compute_s, fires):
    timing = {"steps": 100, "samples": 6400, "data_s": data_s, "compute_s": compute_s, "wall_s": 10.0}
    assert ("data_bound" in rules(timing=timing)) is fires


@pytest.mark.parametrize("resources, fires", [
    ({"system/peak/process_rss_mb": 1000.0, "memory_total_mb": 8000.0}, True),
    ({"system/peak/process_rss_mb": 5000.0, "memory_total_mb": 8000.0}, False),
    ({"system/peak/process_rss_mb": 1000.0}, False),                                # no total: silent
    ({"system/peak/gpu0/memory_used_mb": 10_000.0, "gpu0/memory_total_mb": 80_000.0,
      "system/peak/process_rss_mb": 7000.0, "memory_total_mb": 8000.0}, True),     # a GPU run: GPU memory decides
    ({"system/peak/gpu0/memory_used_mb": 70_000.0, "gpu0/memory_total_mb": 80_000.0,
      "system/peak/process_rss_mb": 100.0, "memory_total_mb": 8000.0}, False),
    ({"gpu0/memory_used_mb": 1000.0, "gpu0/memory_total_mb": 8000.0,
      "gpu1/memory_used_mb": 7000.0, "gpu1/memory_total_mb": 8000.0}, False),      # every GPU must have room
])
def test_memory_headroom_rule(resources, fires):
    assert ("memory_headroom" in rules(resources=resources)) is fires


@pytest.mark.parametrize("train, val, expected", [
    (FALLING, RISING, ["overfitting"]),
    (FALLING, FALLING, ["still_improving"]),
    (FLAT, RISING, []),                  # both getting worse or flat is not overfitting
    (FALLING, FLAT, []),
    (FALLING[:1], RISING[:1], []),       # one epoch: no trend
])
def test_epoch_rules(train, val, expected):
    assert rules(history=history(train, val)) == expected


def test_anomaly_and_early_stopping_rules():
    events = [{"kind": "loss_spike", "step": 7, "epoch": 1, "value": 9.0, "threshold": 6.0, "message": "m"}]
    reason = "early stopping: val_loss has not improved on 0.4 (epoch 3) for 2 epochs"
    found = {r.rule: r for r in recommendations(anomalies=events, stop_reason=reason)}
    assert set(found) == {"early_stopped", "unstable"}
    assert found["early_stopped"].finding == reason and "lower the learning rate" in found["early_stopped"].advice
    assert found["unstable"].finding == "training was unstable: 1 loss spike event(s)"
    assert rules(anomalies=[]) == []
    assert rules(stop_reason="anomaly loss_spike: ...") == []   # an anomaly stop is reported by its own rule


@pytest.mark.parametrize("checkpoints, fires", [
    ([{"blocking_s": 0.4, "background_s": 2.0, "bytes_written": 1e9}] * 2, True),   # 0.8 s of 10 s
    ([{"blocking_s": 0.1, "background_s": 2.0, "bytes_written": 1e9}] * 2, False),  # 0.2 s of 10 s
    ({"saves": 3, "blocking_s": 0.6, "background_s": 0.0, "bytes_written": 3e6}, True),
])
def test_checkpoint_blocking_rule(checkpoints, fires):
    timing = {"steps": 100, "samples": 6400, "data_s": 1.0, "compute_s": 9.0, "wall_s": 10.0}
    assert ("checkpoint_blocking" in rules(timing=timing, checkpoints=checkpoints)) is fires
    assert "checkpoint_blocking" not in rules(checkpoints=checkpoints)   # no step time: silent


def test_nothing_fires_on_healthy_inputs():
    assert recommendations(
        history(FALLING, [0.5, 0.35, 0.35, 0.35, 0.35, 0.35]),
        resources={"process_rss_mb": 6000.0, "memory_total_mb": 8000.0},
        timing={"steps": 10, "samples": 640, "data_s": 0.1, "compute_s": 0.9, "wall_s": 1.0},
        checkpoints=[{"blocking_s": 0.01, "background_s": 0.2, "bytes_written": 100}], anomalies=[]) == []


# --- Markdown -----------------------------------------------------------------------------------------


def sections(markdown):
    return re.findall(r"^## (.+)$", markdown, flags=re.MULTILINE)


def test_full_report_structure():
    from ml.train.loop import StepTiming

    md = summary_report(
        history(FALLING, RISING, accuracy=[0.5, 0.6, 0.7, 0.75, 0.8, 0.85]),
        resources={"system/peak/cpu_percent": 180.0, "system/peak/process_rss_mb": 512.0,
                   "system/peak/memory_used_percent": 40.0, "system/peak/gpu0/memory_used_mb": 2000.0,
                   "system/peak/gpu0/utilization_percent": 95.0, "gpu0/memory_total_mb": 80000.0,
                   "memory_total_mb": 16000.0},
        timing=StepTiming(steps=100, samples=6400, data_s=4.0, compute_s=6.0, wall_s=10.0),
        checkpoints=[{"blocking_s": 0.4, "background_s": 2.0, "bytes_written": 1.5e9}] * 2,
        anomalies=[AnomalyEvent("loss_spike", 60, 6, 7.5, 6.0, "loss 3 at step 60 | above the median")],
        stop_reason="early stopping: val_loss has not improved on 0.5 (epoch 1) for 5 epochs",
        title="Run abc")
    assert md.startswith("# Run abc\n")
    assert sections(md) == ["Metrics", "Resources (peaks)", "Step timing", "Checkpoints", "Anomalies",
                            "Stopped early", "Recommendations"]
    assert "| val_loss ↓ | 0.5 | 1 | 10 | 0.5 | 0.75 | worsening |" in md
    assert "| val_accuracy ↑ | 0.85 | 6 | 60 | 0.5 | 0.85 | improving |" in md
    assert "| process RSS | 512 MB | 3% of 16000 MB |" in md
    assert "| GPU 0 memory | 2000 MB | 2% of 80000 MB |" in md
    assert "| GPU 0 utilization | 95 % |  |" in md
    assert "| mean step time | 100 ms |" in md and "| throughput | 640 samples/s |" in md
    assert "| data wait | 4 s (40%) |" in md
    assert "| written | 3 GB |" in md and "| blocking share of step time | 8.0% |" in md
    assert "loss 3 at step 60 \\| above the median" in md      # pipes in messages do not break the table
    recommendations_part = md.split("## Recommendations")[1]
    for rule in ("data_bound", "memory_headroom", "overfitting", "early_stopped", "unstable", "checkpoint_blocking"):
        assert f"- **{rule}**:" in recommendations_part
    # every table row has as many cells as its header
    for block in re.findall(r"(?:^\|.*\|\n)+", md, flags=re.MULTILINE):
        rows = block.strip().split("\n")
        widths = {len(re.split(r"(?<!\\)\|", row)) for row in rows}
        assert len(widths) == 1, block


def test_missing_inputs_omit_their_sections():
    md = summary_report(history(FALLING, FALLING))
    assert sections(md) == ["Metrics", "Recommendations"]
    assert "- **still_improving**:" in md
    md = summary_report()
    assert sections(md) == ["Recommendations"] and "- No rule fired on these inputs." in md
    md = summary_report(anomalies=[], timing={"steps": 0, "wall_s": 0.0}, resources={"memory_total_mb": 8000.0})
    assert sections(md) == ["Anomalies", "Recommendations"] and "None detected." in md


def test_steps_per_second_without_samples_and_long_anomaly_lists():
    events = [AnomalyEvent("loss_spike", i, 1, 9.0, 6.0, "spike") for i in range(25)]
    md = summary_report(timing={"steps": 50, "wall_s": 5.0}, anomalies=events)
    assert "| throughput | 10 steps/s |" in md and "data wait" not in md
    assert "25 event(s): loss_spike 25." in md and "… and 5 more" in md
    assert md.count("| loss_spike |") == 20


def test_modes_override_and_bad_window():
    rows = [{"epoch": 1, "step": 1, "score": 3.0}, {"epoch": 2, "step": 2, "score": 1.0}]
    assert "| score ↓ | 1 | 2 | 2 |" in summary_report(rows, modes={"score": "min"})
    assert "| score ↑ | 3 | 1 | 1 |" in summary_report(rows)
    with pytest.raises(ValueError, match=r"^trend_window: expected an integer >= 2, got 1$"):
        summary_report(rows, trend_window=1)
