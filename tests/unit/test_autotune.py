"""train.optimize auto: the decision rules over measurements a fake probe makes up (pure logic),
the cache next to the checkpoints, and the real probe on the real train stage: model and RNG
untouched, and an auto run bit-identical to its choice written by hand."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from ml.config import TrainConfig, load_params
from ml.data.contract import load_contract
from ml.data.prepare import prepare
from ml.model.architectures import ModelSpec, build_model
from ml.tracking.base import NullTracker
from ml.train.autotune import (CACHE_FILE, REFERENCE, Candidate, Decision, Policy, Row, candidates, decide,
                               measurer, probe_batches, record_decision, tune)
from ml.train.speed import SpeedSettings
from ml.train.stage import config_fingerprint, train, tune_speed
from tests.conftest import REPO, small_params, write_params

ALL = Policy(overhead=1e9)   # probes every candidate
BF16, COMPILED = Candidate(precision="bf16"), Candidate(compile="default")
BF16_COMPILED = Candidate(precision="bf16", compile="default")


class FakeProbe:
    """Measurements made up per candidate: (steps/s, compile s, loss), and a probe time."""

    def __init__(self, table, probe_s=0.1):
        self.table, self.probe_s, self.calls = table, probe_s, []

    def __call__(self, c):
        self.calls.append(c)
        sps, compile_s, loss = self.table[c]
        return Row(candidate=c, steps_per_s=sps, compile_s=compile_s, loss=loss, probe_s=self.probe_s)


def row(decision, c):
    return next(r for r in decision.rows if r.candidate == c)


def test_a_candidate_whose_loss_disagrees_is_rejected_with_its_reason():
    probe = FakeProbe({REFERENCE: (10.0, 0.0, 2.0), BF16: (50.0, 0.0, 2.6), COMPILED: (20.0, 1.0, 2.02),
                       BF16_COMPILED: (90.0, 1.0, 2.6)})
    decision = decide([REFERENCE, BF16, COMPILED, BF16_COMPILED], probe, job_steps=1000, policy=ALL)
    assert row(decision, BF16).rejected == "loss 2.6 vs fp32 eager 2: gap 30.0% > 5%"
    assert row(decision, BF16).loss_gap == pytest.approx(0.3)
    assert row(decision, BF16_COMPILED).rejected == "not probed: its eager counterpart was rejected"
    assert BF16_COMPILED not in probe.calls
    assert decision.chosen == COMPILED and row(decision, COMPILED).job_s == pytest.approx(1000 / 20 + 1)
    assert row(decision, COMPILED).loss_gap == pytest.approx(0.01) and row(decision, COMPILED).rejected is None


@pytest.mark.parametrize("job_steps, chosen", [(100, BF16), (100_000, BF16_COMPILED)])
def test_compile_time_is_part_of_the_job_estimate(job_steps, chosen):
    probe = FakeProbe({REFERENCE: (10.0, 0.0, 2.0), BF16: (12.0, 0.0, 2.0), BF16_COMPILED: (40.0, 30.0, 2.0)})
    decision = decide([REFERENCE, BF16, BF16_COMPILED], probe, job_steps=job_steps, policy=ALL)
    assert row(decision, BF16_COMPILED).job_s == pytest.approx(job_steps / 40 + 30)
    assert decision.chosen == chosen   # 100 steps: 8.3 s eager against 32.5 s compiled


def test_a_gain_within_the_margin_keeps_fp32_eager():
    probe = FakeProbe({REFERENCE: (10.0, 0.0, 2.0), BF16: (10.3, 0.0, 2.0)})
    decision = decide([REFERENCE, BF16], probe, job_steps=1000, policy=ALL)
    assert decision.chosen == REFERENCE
    assert "the fastest other setup, bf16 eager, saves under 5%" in decision.reason


def test_a_job_too_short_for_the_probe_budget_runs_fp32_eager_and_says_why():
    probe = FakeProbe({REFERENCE: (100.0, 0.0, 2.0), BF16: (1000.0, 0.0, 2.0), BF16_COMPILED: (1e4, 5.0, 2.0)},
                      probe_s=0.05)
    decision = decide([REFERENCE, BF16, BF16_COMPILED], probe, job_steps=50)   # a 0.5 s job
    assert probe.calls == [REFERENCE]
    assert decision.chosen == REFERENCE and "too short to probe other setups within 8% of it" in decision.reason
    assert row(decision, BF16).rejected.startswith("not probed: ~0.05 s more probing would exceed 8% of the ~0.5 s job")
    assert decision.probe_s == pytest.approx(0.05)


def test_the_budget_follows_the_fastest_setup_found():
    # fp32 eager's 100 s job allows 8 s of probing; bf16 eager's 10 s job then leaves no room to compile
    probe = FakeProbe({REFERENCE: (10.0, 0.0, 2.0), BF16: (100.0, 0.0, 2.0), BF16_COMPILED: (400.0, 2.0, 2.0)},
                      probe_s=0.3)
    decision = decide([REFERENCE, BF16, BF16_COMPILED], probe, job_steps=1000)
    assert probe.calls == [REFERENCE, BF16] and decision.chosen == BF16
    assert row(decision, BF16_COMPILED).rejected.startswith("not probed: ~30 s more probing would exceed 8%")


def test_no_candidate_passing_falls_back_to_fp32_eager_with_the_reason():
    probe = FakeProbe({REFERENCE: (10.0, 0.0, math.nan), BF16: (50.0, 0.0, 2.0)})
    decision = decide([REFERENCE, BF16], probe, job_steps=1000, policy=ALL)
    assert decision.chosen == REFERENCE
    assert decision.reason.startswith("no candidate passed, fp32 eager: fp32 eager: loss nan is not finite")
    # a pinned precision whose loss disagrees: fp32 eager all the same
    probe = FakeProbe({REFERENCE: (10.0, 0.0, 2.0), BF16: (50.0, 0.0, 9.0)})
    decision = decide([BF16], probe, job_steps=1000, policy=ALL)
    assert decision.chosen == REFERENCE and "bf16 eager: loss 9 vs fp32 eager 2" in decision.reason


def test_candidates_follow_the_model_the_device_and_the_pinned_keys():
    cpu = torch.device("cpu")
    mlp = build_model(ModelSpec(64, (8,), 10, 0.0))
    cnn = build_model(ModelSpec(64, (), 10, 0.0, "cnn", (1, 8, 8), {"channels": [4, 4]}))
    assert not any(c.memory_format == "channels_last" for c in candidates(mlp, cpu, {}))
    formats = {c.memory_format for c in candidates(cnn, cpu, {})}
    assert formats == {"contiguous", "channels_last"}
    assert {c.compile for c in candidates(cnn, cpu, {})} == {"off", "default"}
    assert not any(c.precision == "fp16" for c in candidates(cnn, cpu, {}))
    pinned = candidates(cnn, cpu, {"precision": "fp32", "compile": "off", "memory_format": None})
    assert pinned == [REFERENCE, Candidate(memory_format="channels_last")]


def test_the_one_line_of_the_default_choice(capsys):
    decision = Decision(chosen=REFERENCE, reason="est. job 1.2 s, too short to probe other setups within 8% of it",
                        rows=(Row(candidate=REFERENCE, steps_per_s=500.0, compile_s=0.0, job_s=1.2, loss=2.0,
                                  loss_gap=0.0, probe_s=0.05),
                              Row(candidate=BF16, rejected="not probed")), job_steps=600, probe_s=0.05)

    class Tags(NullTracker):
        def __init__(self):
            self.tags, self.texts = {}, {}

        def set_tags(self, tags):
            self.tags.update(tags)

        def log_text(self, text, artifact_file):
            self.texts[artifact_file] = json.loads(text)

    tracker = Tags()
    record_decision(tracker, decision)
    assert capsys.readouterr().out.splitlines() == [
        "train: optimize auto: fp32 eager, batches from memory (est. job 1.2 s, too short to probe other setups "
        "within 8% of it)"]
    assert tracker.tags["autotune.choice"] == "fp32 eager" and tracker.tags["autotune.probed"] == "1"
    table = tracker.texts["autotune/decision.json"]
    assert table["columns"][:4] == ["candidate", "steps_per_s", "compile_s", "est_job_s"]
    assert table["data"][1][0] == "bf16 eager" and table["data"][1][-1] == "not probed"


# --- the cache -----------------------------------------------------------------------------------

def small_model():
    torch.manual_seed(0)
    return build_model(ModelSpec(8, (16,), 3, 0.1))


def tune_with(probe, tmp_path, **kwargs):
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    options = dict(batch_size=16, accumulate_steps=1, job_steps=10_000, device=torch.device("cpu"),
                   pinned={"compile": "off"}, cache_dir=tmp_path, policy=ALL, measure=probe)
    return tune(small_model(), torch.optim.AdamW, (x, y), **{**options, **kwargs})


def fake():
    return FakeProbe({REFERENCE: (10.0, 0.0, 2.0), BF16: (40.0, 0.0, 2.01)})


def test_the_choice_is_cached_next_to_the_checkpoints_and_reused(tmp_path):
    probe = fake()
    first = tune_with(probe, tmp_path)
    assert first.chosen == BF16 and not first.cached and len(probe.calls) == 2
    again = tune_with(probe, tmp_path)
    assert len(probe.calls) == 2 and again.cached and again.chosen == BF16 and again.rows == first.rows
    tune_with(probe, tmp_path, batch_size=32)   # another key: measured, kept beside the first
    assert len(probe.calls) == 4 and len(json.loads((tmp_path / CACHE_FILE).read_text())["entries"]) == 2
    assert not tune_with(probe, tmp_path, retune=True).cached and len(probe.calls) == 6


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "someone-else/3", "entries": {}}),
                                     json.dumps([1, 2])], ids=["corrupt", "foreign", "not-an-object"])
def test_a_corrupt_or_foreign_cache_is_ignored_with_one_warning_and_rewritten(tmp_path, capsys, content):
    (tmp_path / CACHE_FILE).write_text(content)
    probe = fake()
    decision = tune_with(probe, tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"autotune: ignoring {tmp_path / CACHE_FILE} (")
    assert err[0].endswith("; measuring again") and "validation error" not in err[0]
    assert not decision.cached and len(probe.calls) == 2
    assert tune_with(probe, tmp_path).cached and capsys.readouterr().err == ""


def test_a_cache_entry_under_another_keys_digest_is_refused(tmp_path, capsys):
    probe = fake()
    tune_with(probe, tmp_path)
    cache = json.loads((tmp_path / CACHE_FILE).read_text())
    entry = next(iter(cache["entries"].values()))
    entry["key"]["batch_size"] = 999   # edited by hand: the digest no longer names this key
    (tmp_path / CACHE_FILE).write_text(json.dumps(cache))
    assert not tune_with(probe, tmp_path).cached and len(probe.calls) == 4
    assert "does not match its key); measuring again" in capsys.readouterr().err


# --- the real probe ------------------------------------------------------------------------------

def rng_states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def test_probing_leaves_the_model_the_optimizer_and_every_rng_state_alone():
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(96, 8), torch.randint(0, 3, (96,))
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    before = rng_states()
    decision = tune(model, torch.optim.AdamW, (x, y), batch_size=32, accumulate_steps=2, job_steps=10_000,
                    device=torch.device("cpu"), pinned={"compile": "off"}, policy=ALL)
    assert sum(r.steps_per_s is not None for r in decision.rows) == len(decision.rows) >= 2
    after = rng_states()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert not optimizer.state and all(p.grad is None for p in model.parameters())


def test_the_real_probe_times_steps_and_checks_the_loss():
    model = small_model()
    x, y = torch.randn(96, 8), torch.randint(0, 3, (96,))
    steps = probe_batches(x, y, 32, 1)
    measure = measurer(model, lambda p: torch.optim.AdamW(p, lr=0.01), steps, steps[0], torch.device("cpu"),
                       Policy(min_steps=4, max_steps=4))
    first, second = measure(REFERENCE), measure(REFERENCE)
    assert first.steps_per_s > 0 and first.compile_s == 0.0 and first.probe_s > 0
    assert first.loss == second.loss and math.isfinite(first.loss)   # seeded: the same trajectory
    with torch.no_grad():
        assert first.loss < float(torch.nn.functional.cross_entropy(model.eval()(x), y))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    project = tmp_path_factory.mktemp("autotune")
    params = load_params(write_params(project, small_params()))
    data = params.data.model_copy(update={k: str(project / k) for k in ("raw_dir", "processed_dir")})
    prepare(data, load_contract(REPO / params.contract.path))
    return project, params, data.processed_dir


def test_an_auto_run_is_bit_identical_to_its_choice_written_by_hand(digits):
    project, params, processed = digits
    base = {**params.train.model_dump(), "epochs": 2, "compile": "off"}
    auto = TrainConfig.model_validate({**base, "optimize": "auto", "model_dir": str(project / "auto"),
                                       "metrics_file": str(project / "auto.json")})
    tags = {}

    class Tags(NullTracker):
        def set_tags(self, t):
            tags.update(t)

    probed = train(auto, processed, Tags(), autotune_policy=ALL)
    assert tags["autotune.probed"] == "2"   # fp32 and bf16 eager, each trained a few steps on a copy
    chosen = probed.speed
    hand = TrainConfig.model_validate({**base, "optimize": "off", "precision": chosen.precision,
                                       "memory_format": chosen.memory_format, "model_dir": str(project / "hand"),
                                       "metrics_file": str(project / "hand.json")})
    by_hand = train(hand, processed)
    assert by_hand.speed == chosen
    for key, value in probed.model.state_dict().items():
        assert torch.equal(value, by_hand.model.state_dict()[key]), key
    assert probed.state.history == by_hand.state.history


def test_the_fingerprint_holds_the_chosen_setup(digits, tmp_path):
    _, params, processed = digits
    cfg = TrainConfig.model_validate({**params.train.model_dump(), "optimize": "auto", "compile": "off"})
    speed, decision = tune_speed(cfg, processed, cache_dir=tmp_path)
    assert decision is not None and speed.precision == decision.chosen.precision
    assert (tmp_path / CACHE_FILE).is_file() and tune_speed(cfg, processed, cache_dir=tmp_path)[1].cached
    fingerprints = {config_fingerprint(cfg, "md5", SpeedSettings(precision=p)) for p in ("fp32", "bf16")}
    assert len(fingerprints) == 2 and config_fingerprint(cfg, "md5", speed) in fingerprints
    with pytest.raises(ValueError, match="train.optimize auto needs the tuned speed settings"):
        config_fingerprint(cfg, "md5")


def test_a_split_that_does_not_fit_memory_times_the_dataloaders_workers_under_the_chosen_setup(capsys):
    loader_rows = {BF16.model_copy(update={"workers": w}): (sps, 0.0, None) for w, sps in ((0, 20.0), (2, 35.0))}
    probe = FakeProbe({REFERENCE: (10.0, 0.0, 2.0), BF16: (40.0, 0.0, 2.01), **loader_rows})
    decision = decide([REFERENCE, BF16], probe, job_steps=1000, policy=ALL, loaders=(0, 2))
    assert probe.calls[-2:] == list(loader_rows)   # eager, bf16: the setup chosen from memory batches
    assert decision.chosen == BF16.model_copy(update={"workers": 2}) and decision.loader == "dataloader"
    assert decision.settings(SpeedSettings()).precision == "bf16"
    assert row(decision, BF16.model_copy(update={"workers": 2})).job_s == pytest.approx(1000 / 35)
    assert decision.summary_line().startswith("train: optimize auto: bf16 eager, dataloader 2 workers, batches "
                                              "from the dataloader (")
    assert decision.reason.endswith("; dataloader: 2 workers fastest")


def test_the_real_probe_takes_a_dataloaders_batches_and_only_times_them():
    model = small_model()
    x, y = torch.randn(96, 8), torch.randint(0, 3, (96,))
    steps = probe_batches(x, y, 32, 1)
    served = []

    def dataloader(workers):
        served.append(workers)
        return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]

    measure = measurer(model, lambda p: torch.optim.AdamW(p, lr=0.01), steps, steps[0], torch.device("cpu"),
                       Policy(min_steps=4, max_steps=4), dataloader=dataloader)
    timed = measure(Candidate(workers=2))
    assert served and set(served) == {2} and timed.steps_per_s > 0 and timed.loss is None


@pytest.mark.slow
def test_an_auto_run_through_the_dataloader_takes_the_workers_it_timed(digits):
    project, params, processed = digits
    base = {**params.train.model_dump(), "epochs": 1, "compile": "off", "loader": "dataloader", "num_workers": 0}
    auto = TrainConfig.model_validate({**base, "optimize": "auto", "model_dir": str(project / "auto-dl"),
                                       "metrics_file": str(project / "auto-dl.json")})
    tags = {}

    class Tags(NullTracker):
        def set_tags(self, t):
            tags.update(t)

    probed = train(auto, processed, Tags(), autotune_policy=ALL)
    workers = int(tags["autotune.choice"].split("dataloader ")[1].split(" workers")[0])
    assert workers in (0, 2) and int(tags["autotune.probed"]) == 4   # fp32, bf16 eager; 0 and 2 workers
    assert tags["loader"] == "dataloader"
    # by hand: optimize off (an auto run with the precision pinned could still fall back to fp32 eager
    # when its probe budget leaves the pinned setup unmeasured)
    hand = TrainConfig.model_validate({**base, "optimize": "off", "num_workers": workers,
                                       "precision": probed.speed.precision, "memory_format": probed.speed.memory_format,
                                       "model_dir": str(project / "hand-dl"),
                                       "metrics_file": str(project / "hand-dl.json")})
    by_hand = train(hand, processed)
    assert by_hand.speed == probed.speed
    for key, value in probed.model.state_dict().items():
        assert torch.equal(value, by_hand.model.state_dict()[key]), key


def test_the_vit_gets_no_channels_last_candidate():
    vit = build_model(ModelSpec(64, (), 10, 0.0, "vit", (1, 8, 8), {"patch_size": 2, "dim": 16, "depth": 1,
                                                                     "heads": 2}))
    assert {c.memory_format for c in candidates(vit, torch.device("cpu"), {})} == {"contiguous"}
