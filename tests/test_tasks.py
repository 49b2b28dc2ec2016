"""Tasks beyond GSM8K: scoring on hand-made items, loading from ACF_DATA_DIR, tiny-model evaluation, bad inputs,
and the code sandbox against hostile programs (each must end as a failed sample while this process survives)."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
from pathlib import Path

import pytest

from acf.core.errors import AcfError, DataError
from acf.evaluation.multiple_choice import ChoiceScore, mc_measurements, score_choices
from acf.evaluation.runner import check_metrics
from acf.tasks import get_task
from acf.tasks.bbh import BBH_TASKS, answer_matches, extract_answer
from acf.tasks.truthfulqa import mc2_mass


# --- scoring on hand-made items ------------------------------------------------------------------------------
def _cs(lp: float, chars: int, tokens: int = 1) -> ChoiceScore:
    return ChoiceScore(logprob=lp, tokens=tokens, chars=chars, greedy=False)


def test_mc_scoring_sum_vs_char_normalised():
    # item 0: sum prefers the short wrong answer (0), per-char prefers the long right one (1)
    # item 1: both pick the right answer (2)
    scores = [[_cs(-2.0, 2), _cs(-3.0, 30, 3)], [_cs(-9.0, 5), _cs(-8.0, 5), _cs(-1.0, 5, 2)]]
    m, preds = mc_measurements(scores, [1, 2], device="cpu", seconds=0.0, batch_size=2, prompt_desc="test")
    assert m["accuracy"].value == 0.5 and m["accuracy_norm"].value == 1.0
    assert preds[0]["pred"] == 0 and preds[0]["pred_norm"] == 1
    assert m["answer_nll"].value == pytest.approx((3.0 + 1.0) / (3 + 2))
    lo, hi = m["accuracy"].ci95
    assert lo < 0.5 < hi and m["accuracy"].n == 2 and m["accuracy"].method


def test_mc2_mass():
    assert mc2_mass([math.log(0.6)], [math.log(0.2), math.log(0.2)]) == pytest.approx(0.6)
    assert mc2_mass([-1000.0, -1000.0], [-1000.0, -1000.0]) == pytest.approx(0.5)   # no underflow


def test_bbh_answer_extraction():
    assert extract_answer("blah. So the answer is (B).") == "(B)"
    assert extract_answer("So the answer is False.\nQ: next") == "False"
    assert extract_answer("I think it is B") is None
    assert answer_matches("(B)", "(B)") and answer_matches("B", "(B)") and answer_matches("(B) 12/25/1937", "(B)")
    assert not answer_matches("(C)", "(B)") and not answer_matches("Bob", "(B)")
    assert answer_matches("yes", "Yes") and answer_matches("24", "24") and not answer_matches("2", "24")
    assert not answer_matches(None, "True")


def test_humaneval_pass_and_fail_in_sandbox(data_root):
    from acf.evaluation.sandbox import check_program
    from acf.tasks.humaneval import build_program, truncate_completion

    task = get_task("humaneval")
    item = task.load("test", limit=1, seed=None)[0]
    good = check_program(build_program(item, item.reference), allow_code_execution=True)
    assert good.passed, good.stderr
    bad = check_program(build_program(item, "    return None\n"), allow_code_execution=True)
    assert not bad.passed and bad.status == "failed"
    assert truncate_completion("    return 1\n\ndef other():\n    pass") == "    return 1\n"


def _he_item(prompt: str = 'from typing import List\n\n\ndef f(xs: List[int]) -> int:\n    """Sum."""\n'):
    from acf.tasks.base import Item

    test = "def check(candidate):\n    assert candidate([1, 2]) == 3\n"
    return Item(id="t/0", prompt=prompt, reference="    return sum(xs)\n", meta={"test": test, "entry_point": "f"})


def _he_run(item, completion, head=None):
    from acf.evaluation.sandbox import check_program
    from acf.tasks.humaneval import build_program

    return check_program(build_program(item, completion, head), allow_code_execution=True)


def test_humaneval_plain_prompt_drops_trailing_newline_and_cuts_after_body():
    from acf.tasks.humaneval import HumanEval, truncate_completion

    item = _he_item()
    task = HumanEval(allow_code_execution=True, prompt_style="plain")
    assert task.done_pattern is None and "\n```" in task.stop_strings()
    assert task.plain_prompt(item) == item.prompt[:-1] == task.chat_prompt(item, tokenizer=None)
    # the model's text continues the docstring line: it starts with the newline the prompt no longer has
    gen = "\n    return sum(xs)\n\n# Test\nprint(f([1, 2]))\n```\nprose"
    head, comp = task.assemble(item, gen)
    assert head == item.prompt.rstrip() and comp == "\n    return sum(xs)\n"
    assert _he_run(item, comp, head).passed
    for tail in ("\n```\n\nThis function", "\n@decorator\ndef g(): pass", "\nif __name__ == '__main__':"):
        assert truncate_completion("\n    return 1" + tail) == "\n    return 1"
    assert task.score(gen, item)[0] and not task.score("\n    return 0\n", item)[0]


def test_humaneval_chat_code_extraction():
    from acf.tasks.humaneval import extract_code

    assert extract_code("Sure!\n```python\ndef f():\n    return 1\n```\nMore:\n```python\nx\n```") == \
        "def f():\n    return 1\n"
    assert extract_code("```py\n    return 1\n```") == "    return 1\n"
    assert extract_code("```\nreturn 1```") == "return 1"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"   # never closed
    assert extract_code("    return 1\n") == "    return 1\n"                                 # no fence: raw


def test_humaneval_chat_assembly():
    from acf.tasks.humaneval import chat_completion, top_level_definitions

    item = _he_item()
    # a re-stated def (without the prompt's import) follows the prompt's stub and replaces it; the model's
    # example calls and prints are dropped, its helpers, imports, decorators and constants kept
    answer = ("Here you go:\n```python\ndef f(xs: List[int]) -> int:\n    return total(xs) + ZERO\n\n"
              "ZERO = 0\nimport functools\n@functools.lru_cache\ndef g():\n    return 1\n\n"
              "def total(v):\n    return sum(v)\n\nprint(f([1, 2]))\nresult = f([0])\nf(None)\n```\nThis adds.")
    comp = chat_completion("f", answer)
    assert comp.startswith("\ndef f(") and "print(" not in comp and "result" not in comp and "f(None)" not in comp
    assert "ZERO = 0" in comp and "@functools.lru_cache\ndef g()" in comp and "def total(v)" in comp
    assert _he_run(item, comp).passed
    # an indented re-stated def is dedented
    assert _he_run(item, chat_completion("f", "```python\n    def f(xs):\n        return sum(xs)\n```")).passed
    # a body, indented or not, goes after the prompt
    assert _he_run(item, chat_completion("f", "```python\n    return sum(xs)\n```")).passed
    assert chat_completion("f", "```python\nreturn sum(xs)\n```") == "    return sum(xs)\n"
    assert _he_run(item, chat_completion("f", "```python\ns = 0\nfor x in xs:\n    s += x\nreturn s\n```")).passed
    # a def of another name is a body, not a replacement: the model's error, scored as a failure
    assert not _he_run(item, chat_completion("f", "```python\ndef ff(xs):\n    return sum(xs)\n```")).passed
    # code that does not parse is run as written and fails with the model's SyntaxError
    assert top_level_definitions("def f(:\n") == "def f(:\n"
    bad = _he_run(item, chat_completion("f", "```python\ndef f(xs):\n    return sum(xs\n```"))
    assert not bad.passed and "SyntaxError" in bad.stderr


def test_humaneval_chat_prompt_style(smol_dir):
    from transformers import AutoTokenizer

    from acf.tasks.humaneval import CHAT_DONE, HumanEval

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    item = _he_item()
    task = HumanEval()
    assert task.prompt_style == "chat" and task.style(tok) == "chat"
    text = task.chat_prompt(item, tok)
    assert "```python\nfrom typing import List" in text and text.endswith("assistant\n")
    assert task.stop_strings() == [] and task.done_pattern == CHAT_DONE
    assert task.assemble(item, "```python\n    return sum(xs)\n```")[0] == item.prompt
    with pytest.raises(AcfError, match="prompt_style"):
        HumanEval(prompt_style="fim")
    tok.chat_template = None                 # no template (a base model): the plain style is used
    assert task.style(tok) == "plain" and task.chat_prompt(item, tok) == item.prompt.rstrip()
    # and a plain continuation scored as a chat answer is still assembled as a body
    assert _he_run(item, *reversed(task.assemble(item, "\n    return sum(xs)\n"))).passed


# --- the batched scorer agrees with itself unbatched ----------------------------------------------------------
def test_shared_and_flat_scoring_agree(tiny_model_dir):
    from acf.models.loading import load_model

    model, tok = load_model(tiny_model_dir)
    reqs = [("Question: What colour is the sky?\nAnswer:", [" blue", " green", " a large red apple"]),
            ("Q: 2+2?\nA:", [" 4", " five"]), ("Short", [" x", " y z"])]
    shared = score_choices(model, tok, reqs, batch_size=3, mode="shared")
    flat = score_choices(model, tok, reqs, batch_size=3, mode="flat")
    single = score_choices(model, tok, reqs, batch_size=1, mode="flat")
    for a, b, c in zip(shared, flat, single):
        for x, y, z in zip(a, b, c):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-3) == pytest.approx(z.logprob, abs=1e-3)
            assert x.tokens == y.tokens and x.chars == y.chars


# --- each task loads from ACF_DATA_DIR and evaluates a few items on the tiny model -------------------------------
@pytest.mark.parametrize("name,metrics", [
    ("commonsenseqa", ["accuracy", "accuracy_norm", "answer_nll"]),
    ("truthfulqa", ["mc1", "mc2", "answer_nll"]),
])
def test_mc_tasks_evaluate_on_tiny(tiny_model_dir, data_root, name, metrics):
    from acf.evaluation import evaluate

    task = get_task(name)
    assert task.metrics == tuple(metrics)
    test, train = task.load("test"), task.load("train")
    assert not {i.id for i in test} & {i.id for i in train}, "calibration items must be disjoint from evaluation"
    assert task.train_texts(3) and all(isinstance(t, str) for t in task.train_texts(3))
    res = evaluate(tiny_model_dir, task, metrics, limit=3, show_progress=False)
    for m in metrics:
        meas = res.metrics[m]
        assert meas.value is not None and meas.n == 3 and meas.method and meas.device
    assert 0.0 <= res.value(metrics[0]) <= 1.0 and len(res.predictions) == 3


def test_bbh_one_task_and_all_on_tiny(tiny_model_dir, data_root):
    from acf.models.loading import load_model

    model, tok = load_model(tiny_model_dir)
    task = get_task("bbh:boolean_expressions")
    task.max_new_tokens = 8
    items = task.load("test", limit=2)
    assert len(items) == 2 and "So the answer is" in task.plain_prompt(items[0])
    out, preds = task.evaluate_metrics(["accuracy", "answer_nll"], model, tok, items, batch_size=2)
    assert 0.0 <= out["accuracy"].value <= 1.0 and out["accuracy"].n == 2 and len(preds) == 2
    assert out["answer_nll"].value > 0
    everything = get_task("bbh")
    assert len(everything.load("test", limit=1)) == len(BBH_TASKS) == 27
    assert not {i.id for i in everything.load("test")} & {i.id for i in everything.load("train")}


def test_humaneval_on_tiny_needs_consent(tiny_model_dir, data_root):
    from acf.models.loading import load_model

    model, tok = load_model(tiny_model_dir)
    task = get_task("humaneval")
    items = task.load("test", limit=2)
    with pytest.raises(AcfError, match="allow-code-execution"):
        task.evaluate_metric("pass@1", model, tok, items, batch_size=2)
    task = get_task("humaneval", allow_code_execution=True)
    task.max_new_tokens = 8
    m, rows = task.evaluate_metric("pass@1", model, tok, items, batch_size=2)
    assert m.value == 0.0 and m.n == 2 and "sandbox" in m.method     # random weights write no working code
    assert all(not r["correct"] for r in rows)
    assert m.extra["prompt_style"] == "chat" and "chat template" in m.method
    assert all(r["prompt_style"] == "chat" and "generated" in r for r in rows)
    task.prompt_style = "plain"
    m, rows = task.evaluate_metric("pass@1", model, tok, items, batch_size=2)
    assert m.value == 0.0 and m.extra["prompt_style"] == "plain" and "plain prompt" in m.method


# --- bad inputs -------------------------------------------------------------------------------------------------
def test_unknown_task_and_subtask():
    with pytest.raises(DataError, match="unknown task 'nope'.*commonsenseqa"):
        get_task("nope")
    with pytest.raises(DataError, match="unknown BBH task 'nope'.*date_understanding"):
        get_task("bbh:nope")
    with pytest.raises(DataError, match="no subtasks"):
        get_task("commonsenseqa:x")


def test_task_metrics_accepted_and_checked():
    tq = get_task("truthfulqa")
    assert check_metrics(["mc1", "mc2", "latency"], tq) == ["mc1", "mc2", "latency"]
    with pytest.raises(AcfError):
        check_metrics(["accuracy"], tq)
    assert check_metrics(["pass@1"], get_task("humaneval")) == ["pass@1"]


def test_missing_column_names_file_and_line(tmp_path):
    d = tmp_path / "csqa"
    d.mkdir()
    good = {"id": "a", "question": "q?", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "A"}
    (d / "dev_rand_split.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"id": "b", "question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"dev_rand_split.jsonl:2: missing field\(s\) choices, answerKey"):
        get_task("commonsenseqa", data_dir=str(d)).load()
    t = tmp_path / "tqa"
    t.mkdir()
    (t / "TruthfulQA.csv").write_text("Type,Question,Best Answer,Incorrect Answers\nA,q,b,c\n")
    with pytest.raises(DataError, match=r"TruthfulQA.csv:1: missing column\(s\) Correct Answers"):
        get_task("truthfulqa", data_dir=str(t)).load()
    (t / "TruthfulQA.csv").write_text("Question,Best Answer,Correct Answers,Incorrect Answers\nq,b,b,c\nq2,,x,y\n")
    with pytest.raises(DataError, match=r"TruthfulQA.csv:3: empty field\(s\) Best Answer"):
        get_task("truthfulqa", data_dir=str(t)).load()
    with pytest.raises(DataError, match="no such directory"):
        get_task("bbh", data_dir=str(tmp_path / "nowhere")).load()


# --- the sandbox against hostile programs -------------------------------------------------------------------------
def _run(src: str, **kw):
    from acf.evaluation.sandbox import check_program

    return check_program(src, allow_code_execution=True, **kw)


def test_sandbox_requires_consent():
    from acf.evaluation.sandbox import run_program

    with pytest.raises(AcfError, match="allow-code-execution"):
        run_program("print(1)")


def test_sandbox_infinite_loop_times_out():
    r = _run("while True:\n    pass", timeout=2)
    assert not r.passed and r.status == "timeout" and r.seconds < 10


def test_sandbox_fork_bomb():
    r = _run("import os\nwhile True:\n    os.fork()", timeout=5)
    assert not r.passed
    # os.fork is disabled by the preamble; posix.fork bypasses it and must hit RLIMIT_NPROC / the timeout
    r = _run("import posix\nwhile True:\n    posix.fork()", timeout=5)
    assert not r.passed


def test_sandbox_unbounded_allocation():
    r = _run("x = []\nwhile True:\n    x.append(bytearray(32 * 2**20))", timeout=20, memory_mb=256)
    assert not r.passed and ("MemoryError" in r.stderr or r.status in ("killed", "timeout"))


def test_sandbox_cannot_write_outside(tmp_path):
    target = tmp_path / "escaped.txt"
    r = _run(f"open({str(target)!r}, 'w').write('x')")
    assert not r.passed and not target.exists()
    r = _run(f"import _io\n_io.FileIO({str(target)!r}, 'w').write(b'x')")     # bypasses the open() guard
    assert not r.passed and not target.exists()
    assert _run("open('inside.txt', 'w').write('ok')\nassert open('inside.txt').read() == 'ok'").passed


def test_sandbox_env_secrets_not_inherited(monkeypatch):
    monkeypatch.setenv("ACF_TEST_API_KEY", "s3cret-value")
    r = _run("import os\nassert os.environ.get('ACF_TEST_API_KEY') == 's3cret-value', sorted(os.environ)")
    assert not r.passed and "s3cret-value" not in r.stdout + r.stderr


def test_sandbox_no_network():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    got = []

    def accept():
        try:
            got.append(srv.accept())
        except OSError:
            pass

    th = threading.Thread(target=accept)
    th.start()
    try:
        r1 = _run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        r2 = _run(f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))")
    finally:
        th.join()
        srv.close()
    assert not r1.passed and not r2.passed and not got


def test_sandbox_program_killing_itself_or_exiting_early_fails():
    assert not _run("import posix, signal\nposix.kill(posix.getpid(), signal.SIGKILL)").passed
    assert not _run("import os\nos._exit(0)").passed            # exits 0 before the end: not a pass
    assert not _run("import sys\nsys.exit(0)").passed
    assert os.getpid() > 0                                       # and we are still here
