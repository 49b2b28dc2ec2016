"""Any causal LM a user brings (issue 19): architectures, the baseline sanity check, the BOS rule, bad input.

Architectures: random-init tiny models (hidden 64, 2 layers, the default model's tokenizer) of Llama, Qwen2, Qwen3,
Gemma2 (sliding window, logit soft-capping, tied embeddings), Gemma3, Mistral (sliding window) and Phi3 (fused
qkv/gate_up projections) each go through the spec, one method of every family, evaluation and reload. A method
that cannot take an architecture must fail in `validate_strategy`, not inside a library.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from acf.core.errors import ModelNotFound, StrategyError
from acf.methods import StepContext
from acf.methods.run_steps import run_strategy
from acf.models.loading import load_model, load_tokenizer, resolve_model
from acf.models.spec import infer_spec, load_spec
from acf.methods.strategy import validate_strategy
from acf.tasks import get_task

HIDDEN, LAYERS, WINDOW = 64, 2, 16


# --- tiny models of each architecture --------------------------------------------------------------------------------

def _configs(tok) -> dict:
    import transformers as T

    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    c = dict(hidden_size=HIDDEN, intermediate_size=HIDDEN * 2, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, **ids)
    gemma = dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16, tie_word_embeddings=True)
    return {
        "llama": lambda: T.LlamaConfig(**c, tie_word_embeddings=True),
        "qwen2": lambda: T.Qwen2Config(**c, tie_word_embeddings=False),                  # q/k/v with bias
        "qwen3": lambda: T.Qwen3Config(**c, head_dim=16, tie_word_embeddings=True),       # q/k norms
        "gemma2": lambda: T.Gemma2Config(**c, **gemma, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
        "gemma3": lambda: T.Gemma3TextConfig(**c, **gemma),
        "mistral": lambda: T.MistralConfig(**c, sliding_window=WINDOW, tie_word_embeddings=False),
        "phi3": lambda: T.Phi3Config(**c, tie_word_embeddings=False),                     # fused qkv_proj, gate_up_proj
    }


ARCHS = ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "mistral", "phi3"]
TIED = {"llama": True, "qwen2": False, "qwen3": True, "gemma2": True, "gemma3": True, "mistral": False, "phi3": False}


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, smol_dir) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    root = tmp_path_factory.mktemp("archs")
    out = {}
    for name, make in _configs(tok).items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(make()).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def arch_specs(arch_dirs) -> dict:
    return {a: infer_spec(d) for a, d in arch_dirs.items()}


@pytest.fixture(scope="module")
def gsm8k(data_root):
    return get_task("gsm8k")


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_from_real_shapes(arch, arch_dirs, arch_specs):
    from transformers import AutoModelForCausalLM

    s = arch_specs[arch]
    model = AutoModelForCausalLM.from_pretrained(str(arch_dirs[arch]))
    real = {n: m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {l.name: l.in_features for l in s.linears} == real
    assert s.params == sum(p.numel() for p in model.parameters())      # parameters() counts a tied head once
    # group sizes follow the real widths (64 in, 128 into down_proj): 16/32/64 divide all, 128 does not
    assert s.valid_group_sizes == [16, 32, 64] and 128 in s.invalid_group_sizes
    assert s.num_layers == LAYERS and s.hidden_size == HIDDEN and s.tied_embeddings is TIED[arch]
    assert s.adds_bos is False and s.chat_template is True and s.tokenizer_vocab_size == s.vocab_size
    if arch == "phi3":
        assert any(l.name.endswith("qkv_proj") for l in s.linears)
    if arch == "qwen2":
        assert any(l.bias for l in s.linears if l.name.endswith("q_proj"))


FAMILIES = {
    "quantize": [{"method": "rtn", "params": {"bits": 4, "group_size": 32}}],
    "prune": [{"method": "magnitude", "params": {"sparsity": 0.5}}],
    "depth": [{"method": "drop_layers", "params": {"count": 1, "by": "first"}}],
    "lora": [{"method": "lora", "params": {"steps": 2, "batch_size": 2, "seq_len": 64, "samples": 8}}],
    "distill": [{"method": "distill", "params": {"steps": 2, "batch_size": 2, "seq_len": 64, "samples": 8}}],
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("arch", ARCHS)
def test_family_on_architecture(arch, family, arch_dirs, arch_specs, gsm8k, tmp_path):
    from acf.evaluation import evaluate

    src = arch_dirs[arch]
    strat = validate_strategy({"steps": FAMILIES[family]}, arch_specs[arch])
    out = tmp_path / "out"
    recs = run_strategy(strat, src, out, StepContext(task=gsm8k, teacher_dir=src))
    assert [r.status for r in recs] == ["ok"], [r.reason for r in recs]
    rec = recs[0]
    cfg = json.loads((out / "config.json").read_text())
    if family == "quantize":
        assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    elif family == "prune":
        assert rec.extra["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
    elif family == "depth":
        assert cfg["num_hidden_layers"] == LAYERS - 1 and rec.extra["dropped_layers"] == [0]
        if cfg.get("layer_types") is not None:   # per-layer lists (sliding/full attention) follow the kept blocks
            assert len(cfg["layer_types"]) == LAYERS - 1
    else:   # lora, distill: two real optimizer steps with finite losses
        assert len(rec.extra["loss_curve"]) == 2 and all(torch.isfinite(torch.tensor(rec.extra["loss_curve"])))
        if family == "lora":
            assert rec.extra["targets"]   # Phi3: o_proj and down_proj (its q/k/v and gate/up are fused)
    res = evaluate(out, gsm8k, ["answer_nll", "size", "params"], limit=2, show_progress=False)
    assert res.metrics["answer_nll"].value > 0 and res.metrics["size"].value > 0 and res.metrics["params"].value > 0
    model, tok = load_model(out)
    # a prompt longer than the sliding window, generated with the KV cache (stale layer indices would break it)
    ids = torch.tensor([list(range(100, 100 + WINDOW + 4))])
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 3


# --- what validation must catch before a library does --------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_folded_gqa_generation_matches_sdpa(arch, arch_dirs, monkeypatch):
    """Padded generation with grouped-query attention folded (the default) gives the text transformers' own path
    gives, on every architecture family (q/k norms, biases, sliding windows, soft-capping, fused projections), and
    leaves the model's attention implementation as it was."""
    from test_gqa_attention import generate_without_and_with_fold

    model, tok = load_model(arch_dirs[arch], "cpu", dtype="float32")
    impl = model.config._attn_implementation
    (want, _), (got, how) = generate_without_and_with_fold(model, tok, monkeypatch, new=8)
    assert got == want
    assert ("folded" in how) == (impl == "sdpa") and model.config._attn_implementation == impl


def _qlora(**lp) -> dict:
    return {"steps": [{"method": "bnb_nf4"}, {"method": "lora", "params": {"qlora": True, "steps": 2, "batch_size": 2,
                                                                          "seq_len": 64, "samples": 8, **lp}}]}


def test_qlora_on_cpu_accepts_biased_linears(arch_specs):
    # bitsandbytes < 0.50.2 added a 4-bit layer's bias in place on the CPU, which autograd rejected, so acf refused
    # QLoRA on CPU for biased models; 0.50.2 (pinned) trains them (next test), and the refusal is gone
    for arch, device in (("qwen2", "cpu"), ("qwen2", "cuda"), ("llama", "cpu")):
        validate_strategy(_qlora(), arch_specs[arch], device)


def test_qlora_on_cpu_with_bias_trains_in_bitsandbytes(arch_dirs, gsm8k, tmp_path):
    """A Qwen2 model (biased q/k/v) trains QLoRA on the CPU with bitsandbytes >= 0.50.2."""
    strat = validate_strategy(_qlora(), None, "cpu")
    recs = run_strategy(strat, arch_dirs["qwen2"], tmp_path / "out", StepContext(task=gsm8k))
    assert recs[-1].status == "ok", recs[-1].reason


def test_lora_targets_must_exist(arch_specs):
    with pytest.raises(StrategyError, match=r"none of the LoRA targets \['c_attn'\].*named .*qkv_proj"):
        validate_strategy({"steps": [{"method": "lora", "params": {"targets": ["c_attn"]}}]}, arch_specs["phi3"])
    # Phi3's fused projections: the default targets still meet o_proj and down_proj, so LoRA runs (above)
    validate_strategy({"steps": [{"method": "lora"}]}, arch_specs["phi3"])


# --- baseline sanity check -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(smol_dir):
    model, tok = load_model(smol_dir)
    return model, tok


@pytest.fixture(scope="module")
def sanity_items(gsm8k):
    return gsm8k.load("test", limit=8, seed=0)


def test_sanity_passes_the_default_model(smol, gsm8k, sanity_items):
    from acf.evaluation.sanity import SanityReport, check_baseline, format_report

    model, tok = smol
    rep = check_baseline(model, tok, gsm8k, sanity_items, "cpu", model_name="smollm2-135m")
    assert rep.ok, format_report(rep)
    assert 0.5 < rep.text_nll < 3.0 and 2.5 < rep.chars_per_token < 4.5
    assert rep.repeat_share is not None and rep.repeat_share < 0.5 and "Paris" in rep.continuation
    assert SanityReport.model_validate_json(rep.model_dump_json()) == rep      # persisted as JSON by the pipeline
    assert "ok" in format_report(rep).splitlines()[0]


def test_sanity_stops_shuffled_embeddings(smol, gsm8k, sanity_items):
    from acf.evaluation.sanity import MAX_NLL, check_baseline, format_report

    model, tok = smol
    broken = copy.deepcopy(model)
    with torch.no_grad():
        emb = broken.get_input_embeddings().weight   # tied: the output head is shuffled with it
        emb.copy_(emb[torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(0))])
    rep = check_baseline(broken, tok, gsm8k, sanity_items, "cpu")
    del broken
    assert not rep.ok and rep.text_nll > MAX_NLL
    msg = rep.problems[0]
    assert "NLL" in msg and f"{rep.text_nll:.2f}" in msg and f"at most {MAX_NLL:g}" in msg and "--skip-sanity" in msg
    assert "problem:" in format_report(rep) and "FAILED" in format_report(rep)


def test_sanity_stops_degenerate_repetition_and_char_level_tokenizer(smol, smol_dir, gsm8k, sanity_items):
    """A random-init model loops on one token; a BPE without its merges splits text into single bytes."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoConfig, PreTrainedTokenizerFast

    from acf.evaluation.sanity import check_baseline

    model, tok = smol
    spec = json.loads((smol_dir / "tokenizer.json").read_text())
    spec["model"]["merges"] = []
    chars = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=tok.bos_token,
                                    eos_token=tok.eos_token, pad_token=tok.pad_token)
    rep = check_baseline(model, chars, gsm8k, sanity_items[:4], "cpu")
    assert rep.chars_per_token is not None and rep.chars_per_token <= 1.05
    assert any("characters per token" in p and "--skip-sanity" in p for p in rep.problems), rep.problems

    cfg = AutoConfig.from_pretrained(str(smol_dir))
    cfg.num_hidden_layers = 2
    torch.manual_seed(0)
    rnd = AutoModelForCausalLM.from_config(cfg).eval()
    rep = check_baseline(rnd, tok, gsm8k, sanity_items[:4], "cpu")
    assert any("degenerate" in p for p in rep.problems), rep.problems
    assert rep.repeat_share > 0.6


@pytest.mark.parametrize("ids,share,unit", [
    ([5] * 24, 1.0, (5,)),
    ([1, 2] * 12, 1.0, (1, 2)),
    ([7, 8, 9] * 8, 1.0, (7, 8, 9)),
    (list(range(24)), 1 / 24, (0,)),
    ([1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 2 / 12, (2,)),    # an isolated "22" is no loop
    ([], 0.0, ()),
])
def test_repetition_measure(ids, share, unit):
    from acf.evaluation.sanity import repetition

    got, u = repetition(ids)
    assert got == pytest.approx(share) and u == unit


# --- the BOS rule across evaluation, calibration and training ------------------------------------------------------

BOS = "<|endoftext|>"     # a special token of the default tokenizer that its chat template does not use


def _bos_tokenizer(smol_dir, template: str | None = None):
    """The default tokenizer made BOS-requiring (a tokenizers post-processor: `tok("a")` starts with BOS), without
    a chat template unless one is given, as a Llama-3 / Gemma / Mistral base tokenizer behaves."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    base = load_tokenizer(smol_dir)
    bk = copy.deepcopy(base.backend_tokenizer)
    bid = base.convert_tokens_to_ids(BOS)
    bk.post_processor = TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bid)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bk, bos_token=BOS, eos_token="<|im_end|>", pad_token="<|im_end|>")
    if template is not None:
        tok.chat_template = template
    assert tok("a")["input_ids"][0] == bid
    return tok


def _starts_with_one_bos(ids, bos: int) -> bool:
    return len(ids) > 1 and ids[0] == bos and ids[1] != bos and bos not in ids[1:]


@pytest.mark.parametrize("fewshot", [0, 2])
def test_bos_once_in_evaluated_sequences(smol_dir, gsm8k, fewshot):
    from acf.evaluation.sequences import task_sequences
    from acf.models.tokenization import adds_bos

    tok = _bos_tokenizer(smol_dir)
    assert adds_bos(tok) and not tok.chat_template
    seqs = task_sequences(gsm8k, tok, gsm8k.load("test", limit=4), fewshot=fewshot)
    assert all(_starts_with_one_bos(list(s.prompt + s.target), tok.bos_token_id) for s in seqs)


def test_bos_once_in_calibration_and_training(smol_dir, gsm8k):
    from acf.methods.calibration import calibration_ids, training_examples

    tok = _bos_tokenizer(smol_dir)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids = calibration_ids(tok, gsm8k, 4, 128).flatten().tolist()
    assert ids[0] == bos
    # packed texts: every text starts with BOS exactly once, right after the previous text's EOS
    at = [i for i, t in enumerate(ids) if t == bos]
    assert len(at) >= 2 and all(i == 0 or (ids[i - 1] == eos and ids[i + 1] != bos) for i in at if i + 1 < len(ids))
    for ex in training_examples(tok, gsm8k, 6, 512):
        assert _starts_with_one_bos(ex.input_ids, bos) and ex.labels[0] == -100


def test_chat_template_that_writes_bos_gets_no_second(smol_dir, gsm8k):
    from acf.evaluation.sequences import task_sequences
    from acf.models.tokenization import encode_prompt, prompt_text
    from acf.methods.calibration import training_examples

    tmpl = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = _bos_tokenizer(smol_dir, tmpl)
    bos = tok.bos_token_id
    items = gsm8k.load("test", limit=3)
    assert gsm8k.chat_prompt(items[0], tok).startswith(BOS)
    for s in task_sequences(gsm8k, tok, items):
        assert _starts_with_one_bos(list(s.prompt + s.target), bos)
    for ex in training_examples(tok, gsm8k, 3, 512):
        assert _starts_with_one_bos(ex.input_ids, bos)
    assert prompt_text(tok, BOS + "x") == BOS + "x" and encode_prompt(tok, BOS + "x").count(bos) == 1


def test_bos_survives_truncation(smol_dir, gsm8k):
    from acf.evaluation.sequences import task_sequences
    from acf.methods.calibration import training_examples

    tok = _bos_tokenizer(smol_dir)
    bos = tok.bos_token_id
    seqs = task_sequences(gsm8k, tok, gsm8k.load("test", limit=3), max_len=64)
    exs = training_examples(tok, gsm8k, 3, 64)
    assert all(s.prompt[0] == bos and s.prompt.count(bos) == 1 and s.length <= 64 for s in seqs)
    assert all(e.input_ids[0] == bos and e.input_ids.count(bos) == 1 and len(e.input_ids) <= 64 for e in exs)


def test_spec_records_bos_tokenizer(smol_dir, arch_dirs, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(arch_dirs["llama"], d)
    for f in d.glob("tokenizer*"):
        f.unlink()
    (d / "chat_template.jinja").unlink(missing_ok=True)
    _bos_tokenizer(smol_dir).save_pretrained(d)
    s = infer_spec(d)
    assert s.adds_bos is True and s.bos_token == BOS and s.chat_template is False
    # a model_spec.json from before these fields still loads
    old = json.loads(s.model_dump_json())
    for k in ("adds_bos", "bos_token", "eos_token", "chat_template", "tokenizer_vocab_size"):
        old.pop(k)
    for l in old["linears"]:
        l.pop("bias")
    (tmp_path / "model_spec.json").write_text(json.dumps(old))
    back = load_spec(tmp_path / "model_spec.json")
    assert back.adds_bos is None and back.params == s.params


# --- bad input: a model directory transformers cannot read ---------------------------------------------------------

@pytest.fixture()
def bad_dirs(tiny_model_dir, tmp_path) -> dict[str, Path]:
    def mk(name: str, config: str | None = None, tokenizer: bool = True, tokenizer_json: str | None = None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(config if config is not None else (tiny_model_dir / "config.json").read_text())
        for f in tiny_model_dir.iterdir():
            if f.suffix == ".safetensors" or (tokenizer and f.name.startswith(("tokenizer", "chat_template"))):
                shutil.copy(f, d / f.name)
        if tokenizer_json is not None:
            (d / "tokenizer.json").write_text(tokenizer_json)
        return d

    return {"no_tokenizer": mk("no_tokenizer", tokenizer=False), "empty_config": mk("empty_config", config="{}"),
            "bad_config": mk("bad_config", config='{"model_type": "llama",'),
            "bad_tokenizer": mk("bad_tokenizer", tokenizer_json='{"version": "1.0", "trunc')}


@pytest.mark.parametrize("case,named", [
    ("no_tokenizer", "has no tokenizer files"),
    ("empty_config", r"config.json is empty \(\{\}\)"),
    ("bad_config", "config.json is not valid JSON"),
])
def test_bad_model_dir_is_model_not_found(case, named, bad_dirs):
    d = bad_dirs[case]
    for call in (lambda: resolve_model(str(d)), lambda: load_model(d), lambda: infer_spec(d)):
        with pytest.raises(ModelNotFound, match=named):
            call()
    if case == "no_tokenizer":
        with pytest.raises(ModelNotFound, match=named):
            load_tokenizer(d)


def test_unreadable_tokenizer_is_named(bad_dirs):
    d = bad_dirs["bad_tokenizer"]
    resolve_model(str(d))      # present files pass the cheap check; parsing them is load_tokenizer's
    for call in (lambda: load_tokenizer(d), lambda: load_model(d), lambda: infer_spec(d)):
        with pytest.raises(ModelNotFound, match=r"tokenizer.json cannot be read \(JSONDecodeError"):
            call()


from cli_run import run_cli as _acf  # noqa: E402  (exit code, stdout, stderr)


@pytest.mark.parametrize("case,named", [
    ("no_tokenizer", "has no tokenizer files"),
    ("empty_config", "config.json is empty"),
    ("bad_config", "config.json is not valid JSON"),
    ("bad_tokenizer", "tokenizer.json cannot be read"),
])
@pytest.mark.parametrize("command", ["spec", "eval"])
def test_cli_bad_model_dir_one_line_exit_2(command, case, named, bad_dirs, capsys, data_root):
    code, _, err = _acf(capsys, command, "--model", str(bad_dirs[case]))
    assert code == 2, err
    assert err.startswith("error:") and named in err and err.strip().count("\n") == 0, err


def test_cli_spec_shows_tokenizer_facts(tiny_model_dir, capsys):
    code, out, _ = _acf(capsys, "spec", "--model", str(tiny_model_dir), "--json")
    assert code == 0
    d = json.loads(out)
    assert d["adds_bos"] is False and d["chat_template"] is True and d["tokenizer_vocab_size"] == 49152
    assert d["tied_embeddings"] is True
    code, out, _ = _acf(capsys, "spec", "--model", str(tiny_model_dir))
    assert code == 0 and "tokenizer (as acf uses it)" in out and "adds BOS" in out and "chat template" in out



# --- the sanity check wired into `acf run` and `acf eval` ---------------------------------------------------------

RUN_FAST = ["--objectives", "answer_nll,size", "--limit", "4", "--proxy-limit", "2", "--calib-samples", "4",
            "--seq-len", "64", "--min-retention", "0.01", "--quant-methods", "none,rtn", "--prune-methods", "none",
            "--episodes", "1", "--device", "cpu", "--no-controls", "--recipes", "none"]


def test_run_stops_on_a_broken_baseline_then_skip_sanity_goes_on(tiny_model_dir, data_root, tmp_path, capsys):
    """A random-init model (broken by design: NLL ~ ln(vocab), a 1-token loop) stops `acf run` at exit 2 before any
    episode; a resume without the override stops again from the record; `--resume --skip-sanity` runs the search
    and the report shows the measured values and the override."""
    from acf.evaluation.sanity import MAX_NLL, SanityReport
    from acf.coordinator.state import load_frontier_file

    run = tmp_path / "run"
    code, _, err = _acf(capsys, "run", "--model", str(tiny_model_dir), "--run-dir", str(run), *RUN_FAST)
    assert code == 2, err
    assert err.startswith("error:") and err.strip().count("\n") == 0, err
    assert "NLL" in err and f"at most {MAX_NLL:g}" in err and "--skip-sanity" in err and str(run) in err
    rec = SanityReport.model_validate_json((run / "sanity.json").read_text())
    assert not rec.ok and rec.text_nll > MAX_NLL and rec.thresholds["max_nll"] == MAX_NLL
    assert not (run / "episodes").exists() and not (run / "artifacts").exists()      # no search spent
    assert load_frontier_file(run / "frontier.json").baseline is None

    before = (run / "sanity.json").stat().st_mtime_ns
    code, _, err = _acf(capsys, "run", "--resume", str(run))
    assert code == 2 and "--skip-sanity" in err, err
    assert (run / "sanity.json").stat().st_mtime_ns == before                       # judged from the record

    code, out, err = _acf(capsys, "run", "--resume", str(run), "--skip-sanity")
    assert code == 0, err
    assert "going on despite it (--skip-sanity)" in out
    assert (run / "sanity.json").stat().st_mtime_ns == before                       # not measured again
    ff = load_frontier_file(run / "frontier.json")
    assert ff.baseline is not None and len(ff.candidates) == 1
    assert json.loads((run / "run_config.json").read_text())["skip_sanity"] is True
    report = (run / "report.md").read_text()
    assert "## Baseline sanity check" in report and "overridden with `--skip-sanity`" in report
    assert f"{rec.text_nll:.3f}" in report and f"<= {MAX_NLL:g}" in report


def test_run_records_a_passing_check(smol, data_root, tmp_path):
    """The default model passes the check as the pipeline runs it: recorded in sanity.json, said in one line, no
    stop; report.md shows it. (The full baseline evaluation after it is the pipeline tests' business.)"""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from acf.coordinator.run_context import RunConfig, RunContext
    from acf.coordinator.baseline import judge_sanity, measure_sanity, recorded_sanity
    from acf.reports.report import _sanity_section

    model, tok = smol
    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig(model="smollm2-135m", run_dir=str(run), limit=8)
    buf = io.StringIO()
    ctx = RunContext(cfg, Console(file=buf, width=200))
    rep = measure_sanity(ctx, SimpleNamespace(model=model, tokenizer=tok))
    judge_sanity(ctx, rep)
    assert rep.ok and rep.nll_items >= 1 and recorded_sanity(ctx) == rep and "sanity check ok" in buf.getvalue()
    md = "\n".join(_sanity_section(run))
    assert "Verdict: **ok**" in md and f"{rep.text_nll:.3f}" in md


def test_eval_warns_about_a_broken_model(tiny_model_dir, data_root, capsys):
    code, _, err = _acf(capsys, "eval", "--model", str(tiny_model_dir), "--limit", "2", "--metrics", "size")
    assert code == 0, err
    assert "warning:" in err and "NLL" in err and "--skip-sanity" in err
    code, _, err = _acf(capsys, "eval", "--model", str(tiny_model_dir), "--limit", "2", "--metrics", "size",
                        "--skip-sanity")
    assert code == 0 and "warning" not in err, err


# --- bounded memory for large vocabularies -------------------------------------------------------------------------

def _large_vocab_llama(seed: int, vocab: int = 256_000):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)    # peaked distributions (random init is near uniform): a kld to measure
    return model


def test_teacher_forced_metrics_chunked_for_a_256k_vocabulary():
    """answer NLL, kld and top1 from chunks of at most 7 positions equal those from whole logits (and a direct
    computation), and the output head never sees more than the chunk bound of positions."""
    from acf.evaluation import logits as L
    from acf.evaluation.fidelity import build_reference, teacher_forced
    from acf.evaluation.multiple_choice import _position_budget
    from acf.evaluation.sequences import Scored

    V = 256_000
    base, cand = _large_vocab_llama(0, V), _large_vocab_llama(1, V)
    g = torch.Generator().manual_seed(2)
    seqs = [Scored(id=f"s{i}", prompt=tuple(torch.randint(3, V, (p,), generator=g).tolist()),
                   target=tuple(torch.randint(3, V, (t,), generator=g).tolist()))
            for i, (p, t) in enumerate([(3, 40), (5, 17), (1, 64)])]
    tok = type("Tok", (), {"pad_token_id": 0})()
    small, whole = 7 * V, 10**12          # 7 positions per chunk; one chunk per sequence

    # a direct computation from the model's own full logits, for the truth
    nll = tokens = 0.0
    for s in seqs:
        with torch.no_grad():
            lp = torch.log_softmax(cand(torch.tensor([s.prompt + s.target])).logits[0].float(), -1)
        p = len(s.prompt)
        nll -= float(lp[p - 1:p - 1 + len(s.target)].gather(-1, torch.tensor(s.target)[:, None]).sum())
        tokens += len(s.target)

    assert L.chunked_head(base) is not None and L.chunked_head(cand) is not None   # checked against the forward
    seen: list[int] = []
    hook = cand.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, 16).shape[0]))
    try:
        got = {}
        for name, el in (("chunked", small), ("whole", whole)):
            ref = build_reference(base, tok, seqs, k=32, chunk_elements=el)
            got[name] = (ref, teacher_forced(cand, tok, seqs, ["answer_nll", "kld", "top1"], reference=ref,
                                             chunk_elements=el))
            if name == "chunked":
                assert seen and max(seen) <= 7 and len(seen) == sum(-(-len(s.target) // 7) for s in seqs)
                seen.clear()
    finally:
        hook.remove()
    (rc, mc), (rw, mw) = got["chunked"], got["whole"]
    assert torch.allclose(rc.topk_logp, rw.topk_logp, atol=1e-5) and torch.equal(rc.topk_idx, rw.topk_idx)
    for m in ("answer_nll", "kld", "top1"):
        assert mc[m].value == pytest.approx(mw[m].value, abs=1e-5), m
    assert mc["answer_nll"].value == pytest.approx(nll / tokens, abs=1e-5)
    assert mc["kld"].value > 0.01          # two different models: a real divergence, measured equally both ways
    assert L.chunk_positions(V) == 65 and _position_budget(cand) == 65     # 2^24 float32 values per chunk
