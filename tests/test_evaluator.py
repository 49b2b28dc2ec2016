"""One evaluator over back ends (acf.evaluation.runner.evaluate): a GGUF candidate measured in llama.cpp and a
transformers candidate of the same multiple-choice task get the same metric set with the same meaning.

Before, the GGUF path dispatched metric names its own way: CommonsenseQA's accuracy went to generation scoring
(which multiple-choice tasks do not implement), TruthfulQA got no mc1/mc2, and its answer_nll was the teacher-forced
NLL of the reference after the chat prompt where transformers' was the gold choice's log-likelihood."""

from __future__ import annotations

from pathlib import Path

import pytest

MC_METRICS = ["accuracy", "accuracy_norm", "answer_nll", "kld", "top1", "size"]
N = 6


SRC = Path(__file__).resolve().parents[1] / "src" / "acf"


def test_each_metric_is_one_table_row():
    """A metric is declared once, as a row of acf.core.metrics; objectives, the evaluator's lists and the run's
    lists are read from it."""
    import re

    from acf.core.metrics import METRICS, TABLE
    from acf.core.objectives import DIRECTIONS, FIDELITY, QUALITY
    from acf.coordinator.run_context import CHEAP_METRICS, FIDELITY_MEASURED, RUNTIME_METRICS
    from acf.evaluation.runner import ALL_METRICS, DEFAULT_METRICS, FIDELITY_METRICS, QUALITY_METRICS

    assert len(TABLE) == len(METRICS)
    text = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    for name in TABLE:
        assert len(re.findall(rf'Metric\("{re.escape(name)}"', text)) == 1, name
    assert list(DIRECTIONS) == [m.name for m in METRICS if m.direction]        # sparsity is no objective
    assert FIDELITY == set(FIDELITY_METRICS) == set(FIDELITY_MEASURED) == {"kld", "kld_general", "top1"}
    assert QUALITY == {"accuracy", "accuracy_norm", "mc1", "mc2", "pass@1", "answer_nll"} | FIDELITY
    assert QUALITY_METRICS == ("accuracy", "answer_nll")
    assert DEFAULT_METRICS == ("accuracy", "answer_nll", "latency", "memory", "size", "params", "sparsity",
                               "bits_per_weight")
    assert set(ALL_METRICS) == set(TABLE) - {"accuracy_norm", "mc1", "mc2", "pass@1"}
    assert set(CHEAP_METRICS) == {"size", "params", "bits_per_weight", "sparsity"}
    assert RUNTIME_METRICS == ("latency", "ttft", "throughput", "memory")


def test_table_keeps_display_and_reward_rules():
    from acf.coordinator.records import fmt_value
    from acf.reports.report import FIDELITY_COLS, fmt
    from acf.search.reward import normalised_score

    assert fmt_value("size", 2**21) == "2.0 MiB" and fmt_value("memory", 2**20) == "1.0 MiB"
    assert fmt_value("latency", 3.14159) == "3.1 ms" and fmt_value("ttft", 2) == "2.0 ms"
    assert fmt_value("kld", 0.123456) == "0.1235" and fmt_value("top1", 0.98765) == "0.988"
    assert fmt_value("mc2", 0.5) == "0.500" and fmt_value("params", 134_515_008) == "134.5M"
    assert fmt_value("throughput", 12.5) == "12.5000" and fmt_value("unknown", 1) == "1.0000"
    assert fmt(2**20, "memory") == "1.0 MiB" and fmt(2e6, "params") == "2.00 M" and fmt(0.123456, "kld") == "0.1235"
    assert FIDELITY_COLS == ("kld", "top1", "kld_general", "answer_nll", "accuracy")
    assert normalised_score("answer_nll", 1.5, 1.0) == pytest.approx(2.718281828 ** -0.5)
    assert normalised_score("kld", 0.1, 0.0) == pytest.approx(2.718281828 ** -0.1)
    assert normalised_score("accuracy", 0.3, 0.4) == pytest.approx(0.75)
    assert normalised_score("top1", 0.9, 1.0) == pytest.approx(0.9)
    assert normalised_score("throughput", 20, 10) == pytest.approx(1.0)
    assert normalised_score("size", 25, 100) == pytest.approx(0.75)


@pytest.fixture(scope="module")
def csqa(data_root):
    from acf.tasks import get_task

    if not (data_root / "commonsenseqa" / "dev_rand_split.jsonl").is_file():
        pytest.skip("no CommonsenseQA data under ACF_DATA_DIR")
    return get_task("commonsenseqa", str(data_root / "commonsenseqa"))


@pytest.fixture(scope="module")
def smol_gguf(smol_dir, csqa, tmp_path_factory) -> Path:
    """The default model exported to a Q8_0 GGUF (no imatrix: no calibration pass)."""
    from acf.methods import StepContext, run_strategy
    from acf.methods.strategy import validate_strategy
    from acf.models.spec import infer_spec

    out = tmp_path_factory.mktemp("smol-gguf") / "q8"
    strat = validate_strategy({"steps": [{"method": "gguf", "params": {"type": "Q8_0", "imatrix": False}}]},
                              infer_spec(smol_dir))
    recs = run_strategy(strat, smol_dir, out, StepContext(task=csqa))
    assert recs[-1].status == "ok", recs[-1].reason
    return out


def _both(task, smol_dir, gguf, metrics, limit):
    from acf.evaluation.runner import Loaded, build_fidelity, eval_items, evaluate

    base = Loaded.load(smol_dir, "cpu")
    fid = build_fidelity(base.model, base.tokenizer, task, eval_items(task, limit, 0), general=False)
    hf = evaluate(smol_dir, task, metrics, limit=limit, fidelity=fid, loaded=base, show_progress=False)
    base.free()
    gg = evaluate(gguf, task, metrics, limit=limit, fidelity=fid, show_progress=False)
    return hf, gg


def test_gguf_and_transformers_mc_candidates_report_the_same_metrics(csqa, smol_dir, smol_gguf):
    hf, gg = _both(csqa, smol_dir, smol_gguf, MC_METRICS, N)
    assert set(hf.metrics) == set(gg.metrics) == set(MC_METRICS)
    for k in MC_METRICS:
        a, b = hf.metrics[k], gg.metrics[k]
        assert a.value is not None and b.value is not None, k
        assert a.unit == b.unit, (k, a.unit, b.unit)
    for k in ("accuracy", "accuracy_norm", "answer_nll", "kld", "top1"):
        assert gg.metrics[k].runtime.startswith("llama.cpp"), (k, gg.metrics[k].runtime)
        assert gg.metrics[k].n == hf.metrics[k].n == N, k
    # the same measurement: log-likelihood multiple choice, the gold choice's NLL, on the same items
    for k in ("accuracy", "accuracy_norm", "answer_nll"):
        assert "log-likelihood multiple choice" in gg.metrics[k].method, gg.metrics[k].method
    assert "correct choice" in gg.metrics["answer_nll"].method
    assert abs(gg.metrics["accuracy"].value - hf.metrics["accuracy"].value) <= 1 / N + 1e-9
    assert abs(gg.metrics["accuracy_norm"].value - hf.metrics["accuracy_norm"].value) <= 1 / N + 1e-9
    assert gg.metrics["answer_nll"].value == pytest.approx(hf.metrics["answer_nll"].value, rel=0.05)
    assert gg.metrics["answer_nll"].extra["tokens"] == hf.metrics["answer_nll"].extra["tokens"]
    # Q8_0 stays close to its model; transformers against its own reference is (near) exact
    assert hf.metrics["kld"].value < 1e-3 and gg.metrics["kld"].value < 0.05
    assert gg.metrics["top1"].value > 0.9
    # per-item choice log-probs agree (the same token ids scored in both runtimes)
    same = sum(p["pred"] == q["pred"] for p, q in zip(hf.predictions, gg.predictions))
    assert len(gg.predictions) == N and same >= N - 1


def test_gguf_truthfulqa_gets_mc1_mc2(data_root, smol_dir, smol_gguf):
    from acf.tasks import get_task

    if not (data_root / "truthfulqa").is_dir():
        pytest.skip("no TruthfulQA data under ACF_DATA_DIR")
    tqa = get_task("truthfulqa", str(data_root / "truthfulqa"))
    hf, gg = _both(tqa, smol_dir, smol_gguf, ["mc1", "mc2", "answer_nll"], 2)
    assert set(gg.metrics) == set(hf.metrics) == {"mc1", "mc2", "answer_nll"}
    assert gg.metrics["mc2"].value == pytest.approx(hf.metrics["mc2"].value, abs=0.05)
    assert gg.metrics["answer_nll"].value == pytest.approx(hf.metrics["answer_nll"].value, rel=0.05)
