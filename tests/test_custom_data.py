"""Your own data (`acf run --dataset FILE`), `acf run --config run.yaml` and `acf run --dry-run`: the file's rows
checked at FILE:LINE before any model loads, its content-hash split, prompts through the chat template, a two-episode
run measuring kld on its held-out items, the file bound to the run, a YAML config building the same RunConfig as
the flags, and a dry run that prints the seeds without loading weights or writing anything."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from acf.core.errors import AcfError, DataError
from acf.tasks import get_task
from acf.tasks.own_data import is_dataset_file, read_own_data

FAST_FLAGS = ["--objectives", "kld,size", "--limit", "4", "--proxy-limit", "4", "--calib-samples", "4",
              "--seq-len", "64", "--recover-steps", "2", "--tune-steps", "2", "--quant-methods", "none,rtn,bnb_int8",
              "--prune-methods", "none,magnitude,drop_layers", "--skip-sanity", "--recipes", "none", "--no-controls",
              "--device", "cpu"]


def chat_rows(n: int) -> list[dict]:
    """Half chat conversations with a system turn, half prompt/response pairs: both formats in one file."""
    rows = []
    for i in range(n):
        if i % 2:
            rows.append({"messages": [
                {"role": "system", "content": "You are a terse arithmetic helper."},
                {"role": "user", "content": f"What is {i} plus {i}? Answer in one sentence."},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}, because adding a number to itself "
                                                 f"doubles it."}]})
        else:
            rows.append({"prompt": f"Name the whole number that comes right after {i}.",
                         "response": f"The number after {i} is {i + 1}."})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


from cli_run import run_cli as acf  # noqa: E402  (exit code, stdout, stderr)


# --- reading, the split, prompts ----------------------------------------------------------------------------------

def test_split_is_disjoint_deterministic_and_keeps_duplicates_together(tmp_path):
    rows = chat_rows(60)
    rows += [rows[3], rows[3], rows[10]]                     # duplicates must land on one side
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    t = get_task(str(f))
    train, test = t.load("train", limit=None, seed=None), t.load("test", limit=None, seed=None)
    assert len(train) + len(test) == 63 and train and test
    assert not {it.id for it in train} & {it.id for it in test}
    key = lambda it: (json.dumps(it.meta["messages"]), it.reference)   # noqa: E731
    assert not {key(it) for it in train} & {key(it) for it in test}  # no duplicated row on both sides
    again = get_task(str(f))
    assert [it.id for it in again.load("train", None, None)] == [it.id for it in train]
    assert t.split_facts["train"] == len(train) and t.split_facts["rows"] == 63
    assert t.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    # appending rows never moves an existing row across the split
    f2 = write_jsonl(tmp_path / "d2.jsonl", rows + chat_rows(80)[60:])
    train2 = {it.meta["line"] for it in get_task(str(f2)).load("train", None, None)}
    assert {it.meta["line"] for it in train} <= train2
    # a different share moves the boundary, never the rule
    assert len(get_task(str(f), train_share=0.5).load("train", None, None)) > len(train)


def test_csv_and_names(tmp_path):
    f = tmp_path / "pairs.csv"
    f.write_text('prompt,response,extra\n"Say ""hi""",hi,x\n"two\nlines",ok,y\nthird,3,z\n')
    t = get_task(str(f))
    items = {it.meta["line"]: it for it in t.load("train", None, None) + t.load("test", None, None)}
    assert set(items) == {2, 3, 5} and items[2].prompt == 'Say "hi"' and items[3].prompt == "two\nlines"
    assert t.metrics == ("answer_nll",) and t.name == "pairs.csv"
    assert is_dataset_file("data.jsonl") and is_dataset_file("x/y") and not is_dataset_file("gsm8k")
    assert not is_dataset_file("bbh:date_understanding")


def test_prompt_uses_the_chat_template_with_the_system_turn(tiny_model_dir, tmp_path):
    from acf.evaluation.sequences import task_sequences
    from acf.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    t = get_task(str(write_jsonl(tmp_path / "d.jsonl", chat_rows(20))))
    items = t.load("test", None, None) + t.load("train", None, None)
    chat = next(it for it in items if len(it.meta["messages"]) == 2)
    text = t.chat_prompt(chat, tok)
    assert text == tok.apply_chat_template(chat.meta["messages"], tokenize=False, add_generation_prompt=True)
    assert "You are a terse arithmetic helper." in text and text.endswith("<|im_start|>assistant\n")
    seq = task_sequences(t, tok, [chat])[0]                  # answer NLL and kld score the reference (+EOS)
    assert tok.decode(list(seq.target)) == chat.reference + tok.eos_token
    # without a chat template: a plain transcript ending where the assistant answers
    assert t.plain_prompt(chat).endswith(f"User: {chat.meta['messages'][1]['content']}\n\nAssistant:")
    assert all(s.startswith("System: ") or s.startswith("User: ") for s in t.train_texts(4))


def test_scorers(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", chat_rows(10))
    t = get_task(str(f), scorer=r"regex:is (\d+)")
    assert t.metrics == ("accuracy", "answer_nll")
    it = next(i for i in t.load("test", None, None) + t.load("train", None, None) if i.meta["line"] == 5)
    assert it.target == "5" and t.score("The number is 5.", it) == (True, "5")
    assert t.score("It is five.", it) == (False, None)
    ex = get_task(str(f), scorer="exact")
    it = ex.load("test", None, None)[0]
    assert ex.score("  " + it.reference.replace(" ", "  ") + "\n", it)[0] and not ex.score("no", it)[0]
    with pytest.raises(DataError, match=r"d.jsonl:1: the reference response does not match --scorer regex:xyz"):
        get_task(str(f), scorer="regex:xyz")
    with pytest.raises(AcfError, match="not a valid regular expression"):
        get_task(str(f), scorer="regex:(")
    with pytest.raises(AcfError, match="give exact or regex:PATTERN"):
        get_task(str(f), scorer="fuzzy")
    with pytest.raises(DataError, match="--scorer apply to your own data"):
        get_task("gsm8k", scorer="exact")
    with pytest.raises(DataError, match="--train-share is the share"):
        get_task(str(f), train_share=1.0)


# --- malformed files: FILE:LINE, before any model loads -----------------------------------------------------------

GOOD = json.dumps({"prompt": "a", "response": "b"})
CHAT = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("name,lines,where,msg", [
    ("bad.jsonl", [GOOD, GOOD, '{"prompt": "a", "response": '], ":3:", "not valid JSON"),
    ("list.jsonl", [GOOD, "[1, 2]"], ":2:", "expected a JSON object"),
    ("nofields.jsonl", [GOOD, '{"question": "a"}'], ":2:", "expected 'messages' (chat) or 'prompt' and 'response'"),
    ("noresp.jsonl", ['{"prompt": "a"}', GOOD], ":1:", "missing field 'response'"),
    ("emptyresp.jsonl", [GOOD, '{"prompt": "a", "response": "  "}'], ":2:", "response is empty"),
    ("noasst.jsonl", [GOOD, json.dumps({"messages": [CHAT]})], ":2:", "no assistant message"),
    ("after.jsonl", [json.dumps({"messages": [CHAT, {"role": "assistant", "content": "x"}, CHAT]}), GOOD], ":1:",
     "message 3 (user) follows the last assistant message"),
    ("role.jsonl", [GOOD, "", json.dumps({"messages": [{"role": "tool", "content": "x"}]})], ":3:",
     "role 'tool' is not one of system, user, assistant"),
    ("nouser.jsonl", [GOOD, json.dumps({"messages": [{"role": "assistant", "content": "x"}]})], ":2:",
     "no user message before the reference"),
    ("parts.jsonl", [GOOD, json.dumps({"messages": [{"role": "user", "content": [{"type": "text"}]},
                                                    {"role": "assistant", "content": "x"}]})], ":2:",
     "message 1: content must be a string"),
    ("empty.jsonl", [], ":1:", "the file is empty"),
    ("one.jsonl", ["", GOOD], ":2:", "only one row"),
    ("cols.csv", ["prompt,answer", "a,b"], ":1:", "missing column(s) response"),
    ("cell.csv", ["prompt,response", "a,b", "c,"], ":3:", "response is empty"),
    ("data.txt", [GOOD, GOOD], "", "unknown dataset extension '.txt'"),
])
def test_malformed_file_refused_with_file_and_line(name, lines, where, msg, tmp_path, capsys):
    f = tmp_path / name
    f.write_text("".join(line + "\n" for line in lines))
    # the model does not exist: had it been touched first, the error would name it, not the file
    code, _, err = acf(capsys, "run", "--model", str(tmp_path / "no-such-model"), "--dataset", str(f),
                       "--run-dir", str(tmp_path / "r"))
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"{f}{where}" in err.replace("\n", "") and msg in err, err
    assert not (tmp_path / "r").exists()


def test_missing_file_and_data_dir_refused(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_own_data(tmp_path / "nope.jsonl")
    f = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    with pytest.raises(DataError, match="drop --data-dir"):
        get_task(str(f), data_dir=str(tmp_path))


# --- a run on your own data ---------------------------------------------------------------------------------------

def test_two_episodes_on_a_chat_file_measure_kld_on_its_held_out_items(tiny_model_dir, data_root, tmp_path, capsys):
    from acf.coordinator.state import load_frontier_file

    f = write_jsonl(tmp_path / "support.jsonl", chat_rows(80))
    run = tmp_path / "run"
    code, _, err = acf(capsys, "run", "--model", str(tiny_model_dir), "--dataset", str(f), "--run-dir", str(run),
                       "--episodes", "2", *FAST_FLAGS)
    assert code == 0, err
    rc = json.loads((run / "run_config.json").read_text())
    assert rc["dataset"] == str(f.resolve()) and rc["dataset_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert rc["train_share"] == 0.2 and rc["dataset_split"]["rows"] == 80
    task = get_task(str(f))
    test_ids = {it.id for it in task.load("test", None, None)}
    train_ids = {it.id for it in task.load("train", None, None)}
    search = [it.id for it in task.load("test", limit=4, seed=0)]
    ff = load_frontier_file(run / "frontier.json")
    assert ff.run.item_sets["dataset_split"]["train"] == len(train_ids)
    assert [c.id for c in ff.candidates] == ["c001", "c002"]
    measured = [c for c in [ff.baseline] + ff.candidates if c.status == "ok"]
    assert len(measured) >= 2
    for c in measured:
        kld = c.metrics["kld"]
        assert kld.how == "measured" and kld.n == 4 and kld.value is not None and kld.value >= 0
        assert kld.extra["items"]["first_id"] == search[0] and search[0] in test_ids and search[0] not in train_ids
        assert c.metrics["answer_nll"].n == 4 and c.metrics["top1"].value is not None
    # the file is bound to the run: a changed file is refused on resume, before anything loads
    with open(f, "a") as fh:
        fh.write(GOOD + "\n")
    code, _, err = acf(capsys, "run", "--resume", str(run), "--episodes", "3")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "the file changed since this run started" in err and "restore that file" in err.replace("\n", "")
    assert len(load_frontier_file(run / "frontier.json").candidates) == 2


# --- acf run --config run.yaml ------------------------------------------------------------------------------------

def _captured_config(monkeypatch, capsys, *args):
    """The RunConfig `acf run ARGS` hands to the runner (the runner is replaced: nothing runs)."""
    import acf.coordinator.single_process as single_process

    got = []

    def fake(cfg, console, resume=False):
        got.append(cfg)
        raise AcfError("captured")

    monkeypatch.setattr(single_process, "run_in_terminal", fake)
    code, _, err = acf(capsys, "run", *args)
    assert code == 2 and "captured" in err, err
    return got[0]


def test_yaml_config_gives_the_same_run_config_as_the_flags(tiny_model_dir, tmp_path, capsys, monkeypatch):
    f = write_jsonl(tmp_path / "d.jsonl", chat_rows(20))
    run = tmp_path / "run"
    flags = ["--model", str(tiny_model_dir), "--dataset", str(f), "--run-dir", str(run), "--episodes", "2",
             "--scorer", r"regex:is (\d+)", "--train-share", "0.3", *FAST_FLAGS, "--calib-mix", "0.5",
             "--final-limit", "3", "--final-metrics", "kld,top1"]
    yaml_text = "\n".join([
        f"model: {tiny_model_dir}", f"dataset: {f}", f"run-dir: {run}", "episodes: 2",
        "scorer: 'regex:is (\\d+)'", "train_share: 0.3", "objectives: [kld, size]", "limit: 4", "proxy_limit: 4",
        "calib-samples: 4", "seq-len: 64", "recover-steps: [2]", "tune_steps: 2", "quant-methods: [none, rtn, bnb_int8]",
        "prune-methods: none,magnitude,drop_layers", "skip-sanity: true", "recipes: none", "controls: false",
        "device: cpu", "calib-mix: 0.5", "final-limit: 3", "final_metrics: [kld, top1]", "planner: null", ""])
    (tmp_path / "run.yaml").write_text(yaml_text)
    by_flags = _captured_config(monkeypatch, capsys, *flags)
    by_yaml = _captured_config(monkeypatch, capsys, "--config", str(tmp_path / "run.yaml"))
    assert by_yaml.model_dump(exclude={"command"}) == by_flags.model_dump(exclude={"command"})
    assert by_yaml.controls is False and by_yaml.skip_sanity is True and by_yaml.objectives == ["kld", "size"]
    # the command line overrides the file
    over = _captured_config(monkeypatch, capsys, "--config", str(tmp_path / "run.yaml"), "--episodes", "5",
                            "--controls")
    assert over.episodes == 5 and over.controls is True and over.limit == 4
    # what the run writes as run_config.json is that RunConfig (its file values included)
    from acf.coordinator.single_process import Pipeline
    from rich.console import Console

    Pipeline(by_yaml, Console(quiet=True))
    written = json.loads((run / "run_config.json").read_text())
    assert written["scorer"] == r"regex:is (\d+)" and written["train_share"] == 0.3 and written["calib_mix"] == 0.5
    assert written["final_metrics"] == ["kld", "top1"] and written["dataset_sha256"]


@pytest.mark.parametrize("text,msg", [
    ("episodes: 2\nbogus-key: 1\n", "unknown option 'bogus-key'"),
    ("config: other.yaml\n", "unknown option 'config'"),
    ("limit: abc\n", "run.yaml: limit: Invalid value for '--limit'"),
    ("- episodes\n", "expected a mapping of option: value"),
    ("episodes: [1\n", "not valid YAML"),
])
def test_yaml_config_refusals(text, msg, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(text)
    code, _, err = acf(capsys, "run", "--config", str(tmp_path / "run.yaml"), "--run-dir", str(tmp_path / "r"))
    assert code == 2 and err.strip().count("\n") == 0, err
    assert msg in err.replace("\n", ""), err
    assert not (tmp_path / "r").exists()


# --- acf run --dry-run --------------------------------------------------------------------------------------------

def test_dry_run_prints_the_seeds_without_loading_weights(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import safetensors
    import safetensors.torch
    import transformers

    import acf.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("--dry-run loaded model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    f = write_jsonl(tmp_path / "d.jsonl", chat_rows(20))
    run = tmp_path / "run"
    code, out, err = acf(capsys, "run", "--model", str(tiny_model_dir), "--dataset", str(f), "--run-dir", str(run),
                         "--device", "cpu", "--recipes", "gptq_w4g64,rtn_w4g64", "--dry-run")
    assert code == 0, err
    assert not run.exists()
    from acf.coordinator.run_context import RunConfig, space_for
    from acf.methods.strategy import validate_strategy
    from acf.models.spec import infer_spec
    from acf.search.space import SearchSpace

    space = space_for(RunConfig(run_dir=str(run)), infer_spec(tiny_model_dir))
    seeds = space.seeds()
    assert seeds and f"seeds, tried first in order: {len(seeds)}" in out
    import optuna

    flat = " ".join(out.split())
    for i, p in enumerate(seeds, 1):
        strategy = validate_strategy(space.suggest(optuna.trial.FixedTrial(p)), space.spec, "cpu")
        assert f"seed {i}: {strategy.describe()}" in flat
    assert "estimated: ~" in out and "per step: " in out and "ESTIMATES" in out
    assert "quant: none, gptq" in flat and "budget:" in out and "gptq_w4g64: gptq(bits=4,group_size=64)" in flat
    assert "d.jsonl (your file, sha256" in flat and isinstance(space, SearchSpace)
