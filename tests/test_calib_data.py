"""Calibration text apart from the evaluation data (`--calib-data FILE`, acf.tasks.calib_text): the file's texts
(.txt paragraphs, .jsonl text or chat/prompt-response rows, .csv) replace the task's train split in calibration,
prefix-stable and deterministic per seed; a bad line is refused at FILE:LINE before any model loads; `acf compress`
calibrates GPTQ on it and its record names the file; the file is bound to a run (digest recorded, a changed file
refused on resume) and keys the yardstick's recipe cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from acf.core.errors import DataError
from acf.tasks.calib_text import CalibTextTask, read_calib_data, with_calib_data

from cli_run import run_cli as acf  # (exit code, stdout, stderr)

L = 32


def paragraphs(n: int) -> list[str]:
    return [f"Paragraph {i} of the user's own calibration text.\nIt talks about invoices, number {i * 7}, and the "
            f"ledger they belong to." for i in range(n)]


def write_txt(path: Path, paras: list[str]) -> Path:
    path.write_text("\n\n\n".join(paras) + "\n")
    return path


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from acf.models.loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


# --- reading and the wrapper -----------------------------------------------------------------------------------------

def test_txt_paragraphs_are_the_train_texts_prefix_stable_and_seeded(tmp_path):
    paras = paragraphs(30)
    f = write_txt(tmp_path / "notes.txt", paras)
    data = read_calib_data(f)
    assert data.texts == paras and data.lines[:2] == [1, 5]
    assert data.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    task = SimpleNamespace(name="gsm8k", metrics=("accuracy",), train_texts=lambda n, seed=0: ["task text"],
                           train_pairs=lambda n, seed=0: [])
    w = CalibTextTask(task, data)
    assert w.name == "gsm8k" and w.metrics == ("accuracy",)        # everything but the text is the task's
    assert not hasattr(w, "train_pairs")                           # the file's texts are packed as plain text
    got = w.train_texts(10, seed=3)
    assert got == w.train_texts(10, seed=3) and set(got) <= set(paras) and len(set(got)) == 10
    assert w.train_texts(4, seed=3) == got[:4]                     # prefix-stable in n
    assert w.train_texts(10, seed=4) != got
    assert sorted(w.train_texts(100, seed=0)) == sorted(paras)     # asking for more gives the whole file
    assert w.calib_source == f"--calib-data notes.txt (sha256 {data.sha256[:12]})"
    assert with_calib_data(task, None) is task


def test_jsonl_and_csv_rows_render_as_one_text_each(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join([
        json.dumps({"text": "A plain calibration paragraph."}), "",
        json.dumps({"prompt": "What is 2+2?", "response": "It is 4."}),
        json.dumps({"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello."}]})]) + "\n")
    d = read_calib_data(f)
    assert d.lines == [1, 3, 4]
    assert d.texts == ["A plain calibration paragraph.", "User: What is 2+2?\n\nAssistant: It is 4.",
                       "System: Be terse.\n\nUser: Hi\n\nAssistant: Hello."]
    c = tmp_path / "c.csv"
    c.write_text('prompt,response,extra\n"Q one","A one",x\nQ two,A two,y\n')
    assert read_calib_data(c).texts == ["User: Q one\n\nAssistant: A one", "User: Q two\n\nAssistant: A two"]


@pytest.mark.parametrize("name,content,where,msg", [
    ("bad.jsonl", '{"text": "ok"}\n\n{"text": "ok", \n', ":3:", "not valid JSON"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": 5}\n', ":2:", "text must be a string"),
    ("bad.jsonl", '{"text": "ok"}\n{"body": "x"}\n', ":2:", "expected a 'text' field"),
    ("bad.jsonl", '{"text": "ok"}\n{"prompt": "x"}\n', ":2:", "missing field 'response'"),
    ("bad.csv", "prompt,response\na,b\nc,\n", ":3:", "response is empty"),
    ("empty.txt", "\n\n  \n", "", "holds no text"),
    ("notes.md", "text\n", "", "unknown extension '.md'"),
])
@pytest.mark.parametrize("command", ["run", "compress"])
def test_a_bad_file_is_refused_with_its_line_before_any_model_loads(command, name, content, where, msg, tmp_path,
                                                                      capsys):
    f = tmp_path / name
    f.write_text(content)
    # the model does not exist: had it been touched first, the error would name it, not the file
    model = str(tmp_path / "no-such-model")
    args = (["run", "--run-dir", str(tmp_path / "r")] if command == "run"
            else ["compress", "--out", str(tmp_path / "out"), "--strategy", '{"steps": []}'])
    code, _, err = acf(capsys, *args, "--model", model, "--calib-data", str(f))
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"{f}{where}" in err.replace("\n", "") and msg in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "out").exists()


def test_too_little_text_is_refused_with_the_file_named(tok, tmp_path):
    from acf.methods.calibration import check_supply

    w = CalibTextTask(SimpleNamespace(name="gsm8k"), read_calib_data(write_txt(tmp_path / "tiny.txt", ["Too short."])))
    with pytest.raises(DataError, match=r"--calib-data tiny.txt \(sha256 [0-9a-f]{12}\) has only \d+ "
                                        r"tokens.*add text to the --calib-data file"):
        check_supply(tok, w, 8, 64, 0.0)


def test_windows_come_from_the_file(tok, tmp_path):
    from acf.methods.calibration import calibration_facts, calibration_ids, calibration_name, training_examples

    paras = paragraphs(40)
    w = CalibTextTask(SimpleNamespace(name="gsm8k"), read_calib_data(write_txt(tmp_path / "notes.txt", paras)))
    ids = calibration_ids(tok, w, 4, L, seed=0)
    assert ids.shape == (4, L)
    assert tok.decode(ids[0]).lstrip().startswith(w.train_texts(1, seed=0)[0][:20])
    facts = calibration_facts(w, 4, 0.0, task_note=" (evaluation's prompt format)")
    assert facts["source"] == w.calib_source and facts["calib_data"]["sha256"] == w.calib.sha256
    assert calibration_name(w) != "gsm8k" and calibration_name(SimpleNamespace(name="gsm8k")) == "gsm8k"
    # kd_tune / LoRA / distill: each text is one example, its whole text the target
    ex = training_examples(tok, w, 3, 64, seed=0)
    assert len(ex) == 3 and all(e.labels == e.input_ids for e in ex)
    assert tok.decode(ex[0].input_ids).lstrip().startswith(w.train_texts(1, seed=0)[0][:20])


# --- acf compress ---------------------------------------------------------------------------------------------------

def test_compress_calibrates_gptq_on_the_file_and_its_record_names_it(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import acf.methods.run_steps as runner

    seen = {}
    real = runner.run_strategy

    def spy(strategy, model_dir, out_dir, ctx, **kw):
        seen["task"] = ctx.task
        seen["records"] = real(strategy, model_dir, out_dir, ctx, **kw)
        return seen["records"]

    monkeypatch.setattr(runner, "run_strategy", spy)
    f = write_txt(tmp_path / "ledger notes.txt", paragraphs(60))
    strategy = {"steps": [{"method": "gptq", "params": {"bits": 4, "group_size": 32, "calib_samples": 4,
                                                       "seq_len": L}}]}
    code, out, err = acf(capsys, "compress", "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"),
                         "--strategy", json.dumps(strategy), "--calib-data", str(f), "--calib-mix", "0",
                         "--device", "cpu")
    assert code == 0, err
    assert isinstance(seen["task"], CalibTextTask)
    cal = seen["records"][-1].extra["calibration"]
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    assert cal["source"] == f"--calib-data ledger notes.txt (sha256 {digest[:12]})"
    assert cal["calib_data"] == {"file": "ledger notes.txt", "sha256": digest} and cal["general_samples"] == 0


# --- a run: the file bound to it -------------------------------------------------------------------------------------

def test_a_run_records_the_digest_keys_recipes_on_it_and_refuses_a_changed_file(tiny_model_dir, data_root, tmp_path,
                                                                                 capsys):
    from rich.console import Console

    from acf.coordinator.run_context import RunConfig
    from acf.coordinator.single_process import Pipeline
    from acf.coordinator.yardstick import cache_key

    f = write_txt(tmp_path / "notes.txt", paragraphs(60))
    run = tmp_path / "run"
    cfg = RunConfig(model=str(tiny_model_dir), run_dir=str(run), calib_data=str(f.resolve()), calib_samples=4,
                    seq_len=L, limit=4, proxy_limit=None, device="cpu", recipes=["none"], skip_sanity=True)
    pipe = Pipeline(cfg, Console(quiet=True))
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    written = json.loads((run / "run_config.json").read_text())
    assert written["calib_data"] == str(f.resolve()) and written["calib_data_sha256"] == digest
    assert isinstance(pipe.ctx.calib_task, CalibTextTask) and pipe.ctx.task.name == "gsm8k"
    key, parts = cache_key(pipe.ctx, str(tiny_model_dir))
    assert parts["calibration"]["text_sha256"] == digest
    pipe.ctx.cfg.calib_data_sha256 = None
    assert cache_key(pipe.ctx, str(tiny_model_dir))[0] != key       # recipes calibrated on other text: other key
    pipe.conn.close()
    # the dry run names the file; a --config file gives it as any option
    (tmp_path / "run.yaml").write_text(f"model: {tiny_model_dir}\ncalib-data: {f}\nrun-dir: {tmp_path / 'dry'}\n"
                                       f"device: cpu\nrecipes: none\n")
    code, out, err = acf(capsys, "run", "--config", str(tmp_path / "run.yaml"), "--dry-run")
    assert code == 0, err
    assert f"calibration: 64 samples of 512 tokens from --calib-data {f.resolve()} (sha256 {digest[:16]}" in out
    # a changed file is refused on resume, before anything loads
    with open(f, "a") as fh:
        fh.write("\nOne more paragraph.\n")
    code, _, err = acf(capsys, "run", "--resume", str(run), "--episodes", "2")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "--calib-data" in err and "changed since this run started" in err, err
    # and --calib-data cannot change on resume
    other = write_txt(tmp_path / "other.txt", paragraphs(60))
    code, _, err = acf(capsys, "run", "--resume", str(run), "--calib-data", str(other))
    assert code == 2 and "that run was started with --calib-data" in err, err
