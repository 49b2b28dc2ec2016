"""The optional LLM planner with scripted fake chat models (langchain-core), on the tiny random-init Llama.

Covers: a valid proposal runs and its rationale lands in frontier.json; every kind of bad output is rejected with a
reason and Optuna proposes instead; three rejections in a row switch the planner off; tool calls are bounded and
read-only; no API key from the environment reaches any file under the run dir.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import optuna
import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage
from rich.console import Console

from acf.core.errors import AcfError
from acf.coordinator.run_store import open_run
from acf.coordinator.run_context import RunContext
from acf.planner import Planner, params_for, parse_proposal_text, read_planner_log, scrub
from acf.coordinator.single_process import Pipeline, load_run_config, run_in_terminal
from acf.search.space import SearchSpace
from acf.coordinator.state import load_frontier_file
from acf.methods.strategy import Strategy, validate_strategy
from test_pipeline import cfg_for, quiet

SECRET = "sk-test-SECRET123"


def prop(steps, rationale="8-bit RTN at g32 keeps quality and halves the size", objective="size") -> str:
    return json.dumps({"strategy": {"steps": steps}, "rationale": rationale, "objective": objective})


VALID = [{"method": "rtn", "params": {"bits": 8, "group_size": 32}}]
# inside the run's methods but not on the SearchSpace grid (sparsity 0.35): runs without an Optuna trial
OFF_GRID = [{"method": "magnitude", "params": {"sparsity": 0.35}}]


class ToolChat(GenericFakeChatModel):
    """A scripted fake that 'supports' tool calling: bind_tools returns the same scripted model."""

    bound: list = []

    def bind_tools(self, tools, **kwargs):
        self.bound.append([getattr(t, "name", t) for t in tools])
        return self


RELEASE_HUNG = threading.Event()


class HungChat(FakeListChatModel):
    """A chat model that never answers until the test sets RELEASE_HUNG (a hung local model or provider)."""

    def _call(self, *args, **kwargs):
        RELEASE_HUNG.wait(600)
        return super()._call(*args, **kwargs)


class RaisingChat(FakeListChatModel):
    def _call(self, *args, **kwargs):
        raise RuntimeError(f"401 Incorrect API key provided: {SECRET}")


@pytest.fixture(scope="module")
def key_in_env():
    old = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = SECRET
    yield SECRET
    if old is None:
        os.environ.pop("OPENAI_API_KEY", None)
    else:
        os.environ["OPENAI_API_KEY"] = old


@pytest.fixture(scope="module")
def planner_run(tiny_model_dir, data_root, tmp_path_factory, key_in_env) -> Path:
    """3 episodes, planner on every one: valid (maps onto Optuna), prose (rejected), valid off-grid (no trial)."""
    run_dir = tmp_path_factory.mktemp("planner") / "run"
    chat = FakeListChatModel(responses=[
        "Here is my proposal:\n```json\n" + prop(VALID, rationale=f"8-bit RTN g32 is near lossless (key {SECRET})")
        + "\n```",
        "I think you should try pruning a bit more aggressively next time.",
        prop(OFF_GRID, rationale="light magnitude pruning between the grid points", objective="answer_nll"),
    ])
    cfg = cfg_for(tiny_model_dir, run_dir, episodes=3, planner_share=1.0)
    pipe = Pipeline(cfg, quiet())
    pipe.ctx.planner = Planner(chat, name="fake:scripted", share=1.0)   # an already-built chat model
    try:
        assert pipe.start() is None
    finally:
        pipe.close()
    return run_dir


def test_valid_proposal_is_used_with_its_rationale(planner_run):
    ff = load_frontier_file(planner_run / "frontier.json")
    c1, c2, c3 = ff.candidates
    assert c1.proposed_by == "planner:fake:scripted" and c1.status == "ok"
    assert c1.strategy.steps[0].method == "rtn" and c1.strategy.steps[0].params["bits"] == 8
    assert c1.rationale.startswith("8-bit RTN g32 is near lossless") and SECRET not in c1.rationale
    assert c1.trial_number is not None
    st = optuna.load_study(study_name=ff.run.study_name, storage=f"sqlite:///{planner_run / 'study.db'}")
    t = st.trials[c1.trial_number]
    assert t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["proposed_by"] == "planner:fake:scripted"
    assert t.params == {"prune": "none", "quant_only": "rtn", "precision": "uniform", "bits": 8, "group_size": "32",
                        "tune": "none"}
    # episode 2: prose was rejected, Optuna proposed
    assert not c2.proposed_by.startswith("planner") and c2.rationale is None
    # episode 3: valid but off the Optuna grid: it ran, recorded without a trial
    assert c3.proposed_by.startswith("planner") and c3.trial_number is None and c3.rationale
    assert c3.strategy.steps[0].params["sparsity"] == 0.35
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in st.trials)
    log = read_planner_log(planner_run)
    assert [r["status"] for r in log] == ["accepted", "rejected", "accepted"]
    assert log[1]["kind"] == "malformed" and "no JSON object" in log[1]["reason"] and log[1]["raw"]


def _ctx_copy(run_dir: Path, dest: Path) -> RunContext:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("artifacts"))
    cfg = load_run_config(dest)
    cfg.study_name = load_frontier_file(dest / "frontier.json").run.study_name
    cfg.run_dir = str(dest)
    ctx = RunContext(cfg, Console(file=io.StringIO(), width=200))
    open_run(ctx)     # the copied study.db holds the results; frontier.json is derived from it
    return ctx


@pytest.mark.parametrize("answer,kind,needle", [
    ('{"strategy": {"steps": [{"method": "rtn", "params": {"bits": 8}}], "rationale": "x"', "malformed", "bad JSON"),
    (prop([{"method": "quantum_magic", "params": {}}]), "invalid strategy", "unknown method 'quantum_magic'"),
    (prop([{"method": "rtn", "params": {"bits": 4, "group_size": 128}}]), "invalid strategy", "group_size 128"),
    (prop([{"method": "rtn", "params": {"bits": 5}}]), "invalid strategy", "bits"),
    ("Sure! Compression is a great idea for small models.", "malformed", "no JSON object"),
    ('{"steps": [{"method": "rtn"}]}', "malformed", "expected keys strategy"),
    (prop(VALID, rationale="  "), "malformed", "no rationale"),
    (prop(VALID, rationale="<why this strategy, given the history>"), "malformed", "placeholder"),
    (prop(VALID, rationale="why, in 1-3 sentences"), "malformed", "placeholder"),
    (prop([{"method": "gptq", "params": {"bits": 4, "group_size": 32}}]), "outside the space", "gptq"),
    (prop([{"method": "rtn", "params": {"bits": 8, "group_size": 32}}]), "duplicate", "repeats c001"),
    (prop([{"method": "bnb_int8"}, {"method": "magnitude", "params": {"sparsity": 0.5}}]), "invalid strategy",
     "order must be"),
])
def test_bad_outputs_are_rejected_with_reasons(planner_run, tmp_path, answer, kind, needle):
    ctx = _ctx_copy(planner_run, tmp_path / "run")
    n_trials = len(ctx.study.trials)
    p = Planner(FakeListChatModel(responses=[answer]), name="fake:bad", share=1.0)
    assert p.propose(ctx) is None
    assert p.rejections[-1]["kind"] == kind and needle in p.rejections[-1]["reason"], p.rejections[-1]
    assert read_planner_log(ctx.dir)[-1]["reason"] == p.rejections[-1]["reason"]
    assert len(ctx.study.trials) == n_trials          # nothing was told to Optuna


def test_timeout_and_exceptions_are_rejections_and_keys_are_scrubbed(planner_run, tmp_path, key_in_env):
    ctx = _ctx_copy(planner_run, tmp_path / "run")
    slow = Planner(FakeListChatModel(responses=[prop(VALID)], sleep=3), name="fake:slow", share=1.0, timeout=0.3,
                   retries=0)
    t0 = time.time()
    assert slow.propose(ctx) is None and time.time() - t0 < 2.5
    assert slow.rejections[-1]["kind"] == "timeout" and slow.rejections[-1]["reason"] == "timed out after 0.3 s"
    boom = Planner(RaisingChat(responses=["x"]), name="fake:boom", share=1.0, retries=1)
    assert boom.propose(ctx) is None
    r = boom.rejections[-1]
    assert r["kind"] == "error" and "Incorrect API key" in r["reason"] and SECRET not in r["reason"]
    assert SECRET not in (ctx.dir / "planner_log.jsonl").read_text()


def test_planner_timeout_and_retries_flow_from_the_config_and_bound_a_hung_model(tiny_model_dir, data_root,
                                                                                 tmp_path, monkeypatch):
    """--planner-timeout/--planner-retries: RunConfig -> run_config.json -> Planner; a model that never answers is
    abandoned after each attempt's timeout (without the bound this test would hang), the turn is rejected with
    the reason, and Optuna proposes the episode."""
    seen: dict = {}

    def from_spec(cls, spec, **kw):   # the "provider" is a fake chat model that hangs
        seen.update(kw)
        return cls(HungChat(responses=[prop(VALID)]), name=spec, **kw)

    monkeypatch.setattr(Planner, "from_spec", classmethod(from_spec))
    RELEASE_HUNG.clear()
    cfg = cfg_for(tiny_model_dir, tmp_path / "run", episodes=1, planner="fake:hung", planner_share=1.0,
                  planner_timeout=0.2, planner_retries=1)
    pipe = Pipeline(cfg, quiet())
    try:
        assert pipe.ctx.planner.timeout == 0.2 and pipe.ctx.planner.retries == 1
        assert pipe.start() is None
    finally:
        RELEASE_HUNG.set()   # let the abandoned calls end
        pipe.close()
    assert seen["timeout"] == 0.2 and seen["retries"] == 1
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["planner_timeout"] == 0.2 and saved["planner_retries"] == 1
    assert load_run_config(tmp_path / "run").planner_retries == 1
    log = read_planner_log(tmp_path / "run")
    assert [(r["status"], r["kind"]) for r in log] == [("rejected", "timeout")]
    assert log[0]["reason"] == "timed out after 0.2 s (each of 2 attempts)"
    ff = load_frontier_file(tmp_path / "run" / "frontier.json")
    assert len(ff.candidates) == 1 and not ff.candidates[0].proposed_by.startswith("planner")   # Optuna proposed


def test_planner_timeout_and_retries_are_validated(tiny_model_dir, data_root, tmp_path, capsys):
    from acf.coordinator.run_context import validate_config

    chat = FakeListChatModel(responses=["x"])
    for kw, needle in [({"timeout": 0}, "--planner-timeout must be a positive"),
                       ({"timeout": -1.5}, "--planner-timeout"), ({"timeout": float("inf")}, "--planner-timeout"),
                       ({"timeout": float("nan")}, "--planner-timeout"),
                       ({"retries": -1}, "--planner-retries must be a whole number >= 0")]:
        with pytest.raises(AcfError, match=needle):
            Planner(chat, **kw)
        with pytest.raises(AcfError, match=needle):
            Planner.from_spec("openai:gpt-4o-mini", **kw)   # before any provider package is needed
    assert Planner(chat, timeout=0.01, retries=0).retries == 0
    with pytest.raises(AcfError, match="--planner-retries"):
        validate_config(cfg_for(tiny_model_dir, tmp_path / "r", planner_retries=-2), ("answer_nll",))
    # the CLI refuses a bad value with one line, before it writes a run dir
    from test_evaluation import acf_inproc

    code, err = acf_inproc(capsys, "run", "--model", str(tiny_model_dir), "--run-dir", str(tmp_path / "run"),
                           "--episodes", "1", "--planner-timeout", "0")
    assert code == 2 and "--planner-timeout must be a positive number of seconds (got 0.0)" in err
    assert not (tmp_path / "run" / "run_config.json").exists()


def test_cli_planner_defaults_match_the_run_config():
    from typer.main import get_command

    from acf.cli import main as cli
    from acf.coordinator.run_context import RunConfig

    run = get_command(cli.app).commands["run"]
    defaults = {p.name: p.default for p in run.params}
    for name in ("planner_share", "planner_max_calls", "planner_timeout", "planner_retries"):
        assert defaults[name] == RunConfig.model_fields[name].default, name


def test_tool_calls_are_bounded_and_read_only(planner_run, tmp_path):
    ctx = _ctx_copy(planner_run, tmp_path / "run")
    final = {"strategy": {"steps": [{"method": "rtn", "params": {"bits": 4, "group_size": 64}}]},
             "rationale": "validated first; 4-bit RTN g64 is the smallest untried point", "objective": "size"}
    chat = ToolChat(messages=iter([
        AIMessage(content="", tool_calls=[{"name": "validate_strategy", "id": "a",
                                           "args": {"strategy_json": json.dumps({"steps": final["strategy"]["steps"]})}},
                                          {"name": "estimate_cost", "id": "b",
                                           "args": {"strategy_json": json.dumps(final["strategy"])}}]),
        AIMessage(content="", tool_calls=[{"name": "shell", "id": "c", "args": {"cmd": "rm -rf /"}}]),
        # after two tool rounds: the structured final answer (as a tool call named after the schema)
        AIMessage(content="", tool_calls=[{"name": "Proposal", "id": "d", "args": final}]),
    ]))
    p = Planner(chat, name="fake:tools", share=1.0)
    assert p.use_tools and p.use_structured
    out = p.propose(ctx)
    assert out is not None and out["proposed_by"] == "planner:fake:tools" and out["trial"] is not None
    assert out["strategy"]["steps"][0]["params"]["group_size"] == 64
    calls = p.accepted[-1]["tool_calls"]
    assert [c["name"] for c in calls] == ["validate_strategy", "estimate_cost", "shell"]
    assert calls[0]["ok"] and calls[1]["ok"] and not calls[2]["ok"]
    assert chat.bound[0] == ["validate_strategy", "estimate_cost"]
    assert ctx.study.trials[out["trial"]].state == optuna.trial.TrialState.RUNNING


def test_three_rejections_in_a_row_switch_the_planner_off(tiny_model_dir, data_root, tmp_path, key_in_env):
    buf = io.StringIO()
    chat = FakeListChatModel(responses=["no idea", "{not json", prop([{"method": "rtn", "params": {"bits": 5}}],
                                                                     rationale=f"leak {SECRET}"), prop(VALID)])
    # every episode falls back to Optuna here: a quantization-only space keeps its 5 episodes cheap
    cfg = cfg_for(tiny_model_dir, tmp_path / "run", episodes=4, planner_share=1.0, prune_methods=["none"])
    pipe = Pipeline(cfg, Console(file=buf, width=200))
    pipe.ctx.planner = Planner(chat, name="fake:bad", share=1.0)
    try:
        assert pipe.start() is None
    finally:
        pipe.close()
    ff = load_frontier_file(tmp_path / "run" / "frontier.json")
    assert len(ff.candidates) == 4 and not any(c.proposed_by.startswith("planner") for c in ff.candidates)
    log = read_planner_log(tmp_path / "run")
    assert [r["status"] for r in log] == ["rejected"] * 3                 # the 4th episode did not ask
    assert pipe.ctx.planner.off_reason and buf.getvalue().count("planner off after 3") == 1
    # resume keeps it off (counters come back from the planner log)
    cfg2 = load_run_config(tmp_path / "run")
    cfg2.episodes = 5
    pipe2 = Pipeline(cfg2, quiet(), resume=True)
    pipe2.ctx.planner = Planner(FakeListChatModel(responses=[prop(VALID)]), name="fake:bad", share=1.0)
    try:
        assert pipe2.start() is None
    finally:
        pipe2.close()
    assert len(read_planner_log(tmp_path / "run")) == 3
    _assert_no_secret(tmp_path / "run")


def test_no_key_in_any_file_of_the_run(planner_run):
    _assert_no_secret(planner_run)


def _assert_no_secret(run_dir: Path) -> None:
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "checkpoints.db" for p in files) and any(p.name == "planner_log.jsonl" for p in files)
    leaks = [str(p) for p in files if SECRET.encode() in p.read_bytes() or b"SECRET123" in p.read_bytes()]
    assert not leaks, leaks


def test_wants_turn_is_a_deterministic_mix():
    def turns(share, n=9, **kw):
        p = Planner(FakeListChatModel(responses=["x"]), share=share, **kw)
        return [k for k in range(1, n + 1) if p.wants_turn(k)]

    assert turns(0.5) == [2, 4, 6, 8]
    assert turns(1 / 3) == [3, 6, 9]
    assert turns(1.0) == list(range(1, 10)) and turns(0.0) == []
    p = Planner(FakeListChatModel(responses=["x"]), share=1.0, max_calls=2)
    p.calls = 2
    assert not p.wants_turn(3) and "max-calls" in p.off_reason
    with pytest.raises(AcfError, match="planner-share"):
        Planner(FakeListChatModel(responses=["x"]), share=1.5)


def test_from_spec_errors_name_the_package():
    with pytest.raises(AcfError, match="provider:model"):
        Planner.from_spec("gpt-4o")
    import importlib.util

    if importlib.util.find_spec("langchain") is None or importlib.util.find_spec("langchain_openai") is None:
        with pytest.raises(AcfError, match=r"pip install langchain langchain-openai"):
            Planner.from_spec("openai:gpt-4o-mini")
    if importlib.util.find_spec("langchain_huggingface") is None:
        with pytest.raises(AcfError, match="pip install langchain-huggingface"):
            Planner.from_spec("hf:smollm2-135m")


def test_omitted_calibration_takes_the_run_settings():
    from acf.planner import with_run_defaults
    from acf.coordinator.run_context import RunConfig

    cfg = RunConfig(run_dir="unused", calib_samples=16, seq_len=128)
    out = with_run_defaults({"steps": [{"method": "gptq", "params": {"bits": 4}},
                                       {"method": "wanda", "params": {"seq_len": 256}},
                                       {"method": "lora", "params": {}}, {"method": "rtn"}]}, cfg)
    assert out["steps"][0]["params"] == {"bits": 4, "calib_samples": 16, "seq_len": 128}
    assert out["steps"][1]["params"] == {"seq_len": 256, "calib_samples": 16}     # explicit values win
    assert out["steps"][2]["params"] == {} and out["steps"][3]["params"] == {}


def test_parse_and_scrub_helpers(key_in_env):
    p = parse_proposal_text("blah ```json\n" + prop(VALID) + "\n``` more")
    assert p.strategy.steps[0].method == "rtn" and p.objective == "size"
    p = parse_proposal_text('{"strategy": [{"method": "bnb_int8"}], "rationale": "r"}')   # bare step list
    assert p.strategy.steps[0].method == "bnb_int8"
    assert scrub(f"error: key {SECRET} bad; hf_abcdefghijklmnop") == "error: key *** bad; ***"


def test_params_for_round_trips_the_search_space(tiny_model_dir):
    from acf.models.spec import infer_spec

    spec = infer_spec(tiny_model_dir)
    space = SearchSpace(spec, "cpu", 4, 64, [2], quant_methods=["none", "rtn", "gptq", "bnb_int8"],
                        prune_methods=["none", "magnitude", "wanda", "drop_layers"])
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    n = 0
    for _ in range(60):   # every strategy the sampler proposes maps back to its own params
        t = study.ask()
        s = validate_strategy(space.suggest(t), spec)
        pp = params_for(space, s)
        assert pp is not None and validate_strategy(space.suggest(optuna.trial.FixedTrial(pp)), spec).key() == s.key()
        study.tell(t, [0.0, 0.0])
        n += 1
    assert n == 60
    off = [Strategy(steps=[{"method": "rtn", "params": {"bits": 4, "group_size": 16}}]),         # g16 not in space
           Strategy(steps=[{"method": "magnitude", "params": {"sparsity": 0.35}}]),
           Strategy(steps=[{"method": "rtn", "params": {"bits": 4, "symmetric": False}}]),
           Strategy(steps=[{"method": "awq", "params": {}}])]                                     # awq not in space
    assert [params_for(space, validate_strategy(s, spec)) for s in off] == [None] * 4


def test_local_hf_planner_runs_offline(tiny_model_dir, planner_run, tmp_path):
    """`hf:<dir>` builds a transformers chat model offline; a random-init model's text is rejected, not crashed."""
    pytest.importorskip("langchain_huggingface")
    ctx = _ctx_copy(planner_run, tmp_path / "run")
    p = Planner.from_spec(f"hf:{tiny_model_dir}", share=1.0, timeout=120)
    assert not p.use_tools and not p.use_structured
    p.model.llm.pipeline.model.generation_config.max_new_tokens = 16
    assert p.propose(ctx) is None and p.rejections[-1]["kind"] == "malformed"
    assert "You are the planner" not in p.rejections[-1]["raw"]      # the answer only, never the echoed prompt
