#!/usr/bin/env python3
"""Scale benchmark at Llama-3.1-8B shape on a GPU (prints its figures; not a test).

Weights are RANDOMLY INITIALISED from the Llama-3.1-8B configuration: speed, memory and size do not depend on
weight values, so these are real timings for an 8B-shaped model (not quality figures). Calibration inputs are
random token ids for the same reason.

Measures: RTN W4 g128 and GPTQ W4 g128 (llm-compressor, the same recipes acf uses) wall time and peak GPU memory
with N calibration samples of L tokens; decode ms/token and time to first token at batch 1, and throughput at
batch B for bf16, bnb nf4 and bnb int8; size on disk of each; and the physical floor of batch-1 decode
(weight bytes / memory bandwidth) next to each measured latency.

acf's own steps and evaluation at this scale (parts lora, distill, steps_gptq, gen, tf; they need --data-dir and a
tokenizer): LoRA 50 steps and distillation 50 steps run through acf's step runner on a saved random checkpoint,
each with its measured peak (torch.cuda.max_memory_allocated increase) beside acf.methods.memory's estimate, as
preflight uses it; GSM8K generation throughput of acf's engine before (padded `generate` batches of 32 with
transformers' sdpa, cuDNN attention allowed) and after (acf's default: the batch sized from free memory, grouped-query
attention folded, cuDNN attention excluded), each called twice; other engines by --engines; the teacher-forced
kld/top1/answer_nll time over 400 GSM8K items, with the baseline reference built once. Random weights never emit
end-of-sequence, so every generation runs to its token limit: the throughput is of full-length sequences.

GPTQ on all 32 blocks takes tens of minutes (llm-compressor's guide: ~30 min on an A100), longer than one device
call allows, so by default it runs on the first --gptq-layers blocks of the same shape and the full-model time is
ESTIMATED by scaling per block (labelled as such in the output). --gptq-layers 32 measures it whole.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

# Peak memory bandwidth from the vendors' data sheets (bytes/s), for the decode floor.
BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
             "H200": 4.8e12, "A100-SXM4-80GB": 2.039e12, "A100": 1.555e12}


def bandwidth_for(name: str) -> tuple[float, str]:
    for k, v in BANDWIDTH.items():
        if k in name:
            return v, f"data-sheet peak for {k}"
    return float("nan"), "unknown GPU"


def llama31_8b_config(layers: int | None = None, tiny: bool = False):
    from transformers import LlamaConfig

    if tiny:  # CPU dry run of this script's logic
        return LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=layers or 2,
                           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers or 32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
                       eos_token_id=128001)


def llama32_1b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000,
                       eos_token_id=128001)


def build(cfg, device: str):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.eval()
    return model


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def sync(dev: str) -> None:
    if dev.startswith("cuda") and torch.cuda.is_available():   # the --tiny CPU check passes through
        torch.cuda.synchronize()


def gsm8k_test_prompts(tok, data_dir, n: int, task=None) -> list[str]:
    """The first `n` GSM8K test prompts of the seed-0 permutation, zero-shot, as acf's evaluation renders them."""
    from acf.tasks import get_task

    task = task or get_task("gsm8k", data_dir)
    return [task.chat_prompt(it, tok, 0) for it in task.load("test", limit=n, seed=0)]


def quantize(method: str, cfg, dev: str, n: int, L: int, work: Path, tok) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot

    from acf.methods.quantize import _recipe

    model = build(cfg, dev)
    # llm-compressor re-reads the config from model.config.name_or_path: give the in-memory model one on disk.
    cfg_dir = work / f"config-{cfg.num_hidden_layers}L"
    cfg.save_pretrained(cfg_dir)
    model.config._name_or_path = str(cfg_dir)
    params = {"bits": 4, "group_size": 128, "symmetric": True, "act_order": False, "dampening_frac": 0.01,
              "ignore": ["lm_head"]}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (n, L), generator=g)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    kw = {} if method == "rtn" else dict(dataset=ds, num_calibration_samples=n, max_seq_length=L,
                                          shuffle_calibration_samples=False)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(dev)
    t0 = time.perf_counter()
    oneshot(model=model, recipe=_recipe(method, params), tokenizer=tok, **kw)
    sync(dev)
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if dev.startswith("cuda") else None
    out = work / f"{method}-w4g128-{cfg.num_hidden_layers}L"
    model.save_pretrained(out, save_compressed=True)
    size = dir_size(out)
    del model
    gc.collect()
    torch.cuda.empty_cache() if dev.startswith("cuda") else None
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": round(secs, 1), "peak_gpu_bytes": peak, "size_bytes": size, "layers": cfg.num_hidden_layers,
            "calib": f"{n} x {L} random token ids" if method != "rtn" else "none (RTN needs no calibration)"}


def timed_generate(model, ids, new: int, dev: str) -> float:
    sync(dev)
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)
    sync(dev)
    return time.perf_counter() - t


def latency(model, dev: str, prompt_len: int, new: int, batch: int, vocab: int, repeats: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    ids1 = torch.randint(0, vocab, (1, prompt_len), generator=g).to(dev)
    idsb = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(dev)
    timed_generate(model, ids1, new, dev)  # warm-up
    ttft = statistics.median(timed_generate(model, ids1, 1, dev) for _ in range(repeats))
    full = statistics.median(timed_generate(model, ids1, new, dev) for _ in range(repeats))
    timed_generate(model, idsb, 8, dev)  # warm-up at batch size
    tb = timed_generate(model, idsb, new, dev)
    return {"ttft_ms": round(ttft * 1000, 2), "decode_ms_per_token": round((full - ttft) / (new - 1) * 1000, 3),
            "throughput_tokens_per_s": round(batch * new / tb, 1), "batch": batch, "prompt_tokens": prompt_len,
            "new_tokens": new, "repeats": repeats}


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def save_checkpoint(cfg, dev: str, out: Path, tokenizer_dir: Path) -> float:
    """A random bf16 checkpoint with a real tokenizer (acf's steps read both from a folder). Returns save seconds."""
    if (out / "config.json").exists():
        return 0.0
    model = build(cfg, dev)
    t = time.perf_counter()
    model.save_pretrained(out)
    secs = time.perf_counter() - t
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    del model
    gc.collect()
    torch.cuda.empty_cache() if dev == "cuda" else None
    return round(secs, 1)


def acf_step(method: str, params: dict, in_dir: Path, work: Path, task, dev: str) -> dict:
    """One acf step through its runner: wall time, measured peak, and the estimate preflight would use."""
    from acf.methods.base import StepContext
    from acf.methods.memory import Shape
    from acf.methods.registry import estimate_step_memory
    from acf.methods.run_steps import run_step
    from acf.models.spec import infer_spec

    from acf.methods.registry import get

    params = get(method).params.model_validate(params).model_dump()   # filled, as validation hands them on
    est = estimate_step_memory(method, params, Shape.of(infer_spec(in_dir)), dev)
    out = work / f"{method}-out"
    shutil.rmtree(out, ignore_errors=True)
    rec = run_step(method, params, in_dir, out, StepContext(device=dev, task=task, teacher_dir=in_dir),
                   work / f"{method}.log")
    shutil.rmtree(out, ignore_errors=True)
    ex = rec.extra or {}
    r = {"status": rec.status, "reason": rec.reason, "wall_seconds": rec.wall_seconds, "params": params,
         "measured_peak_bytes": rec.peak_memory_bytes, "peak_how": rec.peak_memory_how,
         "estimate_bytes": est.total if est else None, "estimate": est.describe() if est else None,
         "plan": ex.get("plan"), "loss_first5_mean": ex.get("loss_first5_mean"),
         "loss_last5_mean": ex.get("loss_last5_mean")}
    if est and rec.peak_memory_bytes:
        r["estimate_over_measured"] = round(est.total / rec.peak_memory_bytes, 3)
    return r


def gen_throughput(model, tok, prompts: list[str], new: int, engine: str, batch: int, fold: bool = True,
                   cudnn: bool = False) -> dict:
    """`fold`: grouped-query attention folded (acf.evaluation.gqa_attention, acf's default) or transformers' sdpa
    path with repeat_kv (what acf ran before it); `cudnn`: torch may pick cuDNN's attention (as before acf excluded
    it from generation: it builds a plan per new shape)."""
    import os

    from acf.evaluation.generate import generate_all

    os.environ["ACF_GEN_ENGINE"] = engine
    os.environ["ACF_GQA_FOLD"] = "1" if fold else "0"
    os.environ["ACF_GEN_CUDNN_SDPA"] = "1" if cudnn else "0"
    sync("cuda")
    t = time.perf_counter()
    outs, how = generate_all(model, tok, prompts, new, batch_size=batch)
    sync("cuda")
    secs = time.perf_counter() - t
    n_tok = sum(n for _, n in outs)
    return {"engine": how, "prompts": len(prompts), "max_new_tokens": new, "generated_tokens": n_tok,
            "seconds": round(secs, 2), "tokens_per_s": round(n_tok / secs, 1)}


def acf_eval_parts(parts: list[str], model_dir: Path, task, a, res: dict, save) -> None:
    """Generation before/after and teacher-forced metrics on one model loaded once, straight onto the GPU."""
    from acf.evaluation.batching import auto_batch_size
    from acf.evaluation.fidelity import build_reference, teacher_forced
    from acf.evaluation.sequences import task_sequences
    from acf.models.loading import load_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: the --tiny check of this script
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model, tok = load_model(model_dir, dev)
    res["load"] = {"seconds": round(time.perf_counter() - t, 1),
                   "peak_gpu_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
                   "how": "acf.models.loading.load_model, device_map straight onto the GPU"}
    save()
    prompts = gsm8k_test_prompts(tok, None, a.gen_items, task)
    if "gen" in parts:
        g: dict = {}
        # before: padded generate batches of 32 (the figure this benchmark measured before), on a subset
        # (first call, then the same again: cuDNN attention, where allowed, pays a plan per new shape only once)
        old = dict(fold=False, cudnn=True)
        g["padded_batch32"] = gen_throughput(model, tok, prompts[:a.batch32_prompts], a.gen_new, "padded", 32, **old)
        save_g = lambda: (res.__setitem__("generation", g), save())  # noqa: E731
        save_g()
        g["padded_batch32_second_call"] = gen_throughput(model, tok, prompts[:a.batch32_prompts], a.gen_new,
                                                         "padded", 32, **old)
        save_g()
        from acf.models.tokenization import prompt_text

        longest = max(len(tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"]) for p in prompts)
        auto = auto_batch_size(model, len(prompts), "generate", longest + a.gen_new, new_tokens=a.gen_new)
        g["auto_batch_how"] = (f"acf.evaluation.batching for the longest prompt ({longest} tokens) + {a.gen_new} new: "
                               f"{auto}")
        g["padded_auto_batch_repeat_kv"] = gen_throughput(model, tok, prompts, a.gen_new, "padded", auto, **old)
        save_g()
        g["padded_auto_batch"] = gen_throughput(model, tok, prompts, a.gen_new, "padded", auto)
        save_g()
        g["padded_auto_batch_second_call"] = gen_throughput(model, tok, prompts, a.gen_new, "padded", auto)
        best_before = max(g["padded_batch32"]["tokens_per_s"], g["padded_batch32_second_call"]["tokens_per_s"])
        for k in ("padded_auto_batch_repeat_kv", "padded_auto_batch", "padded_auto_batch_second_call"):
            g[k]["speedup_vs_batch32"] = round(g[k]["tokens_per_s"] / g["padded_batch32"]["tokens_per_s"], 2)
            g[k]["speedup_vs_faster_batch32_call"] = round(g[k]["tokens_per_s"] / best_before, 2)
        save_g()
        for eng in filter(None, a.engines.split(",")):
            if eng == "continuous":   # a short run first: the engine's warm-up (CUDA graph capture) apart
                g["continuous_16_prompts"] = gen_throughput(model, tok, prompts[:16], a.gen_new, eng, auto)
            if eng == "static":       # the first batch pays torch.compile; a second run shows the compiled speed
                g["static_first_call"] = gen_throughput(model, tok, prompts[:auto], 16, eng, auto)
            g[eng] = gen_throughput(model, tok, prompts, a.gen_new, eng, auto)
            g[eng]["speedup_vs_batch32"] = round(g[eng]["tokens_per_s"] / g["padded_batch32"]["tokens_per_s"], 2)
            save_g()
    if "tf" in parts:
        seqs = task_sequences(task, tok, task.load("test", limit=400, seed=0), 0)
        sync("cuda")
        t = time.perf_counter()
        ref = build_reference(model, tok, seqs, batch_size=None)
        sync("cuda")
        ref_s = time.perf_counter() - t
        t = time.perf_counter()
        m = teacher_forced(model, tok, seqs, ["kld", "top1", "answer_nll"], reference=ref, batch_size=None)
        sync("cuda")
        res["teacher_forced"] = {"items": len(seqs), "tokens": sum(len(s.target) for s in seqs),
                                 "reference_seconds": round(ref_s, 2),
                                 "kld_top1_answer_nll_seconds": round(time.perf_counter() - t, 2),
                                 "kld_of_model_to_itself": m["kld"].value,
                                 "how": "baseline top-k reference built once per run; a candidate's kld, top1 and "
                                        "answer_nll from one batched teacher-forced pass (batch sized from free "
                                        "memory)"}
        save()
    del model
    gc.collect()
    torch.cuda.empty_cache()


def render(files: list[str]) -> str:
    """The memory table of acf's steps from results files: measured peak beside the CURRENT estimate
    (acf.methods.memory recomputed from the recorded params, so the table follows the code), and the wall time."""
    from acf.methods.memory import GiB, Shape
    from acf.methods.registry import estimate_step_memory

    rows = ["| shape | step | settings | device | wall s | measured peak GiB | estimate GiB | estimate / measured |",
            "|---|---|---|---|---:|---:|---:|---:|"]
    for f in files:
        d = json.loads(Path(f).read_text())
        cfg = llama31_8b_config() if d.get("shape", "8b") == "8b" else llama32_1b_config()
        shape = Shape.of_config(cfg)
        for key, method in (("acf_lora", "lora"), ("acf_distill", "distill"), ("acf_steps_gptq", "gptq")):
            r = d.get(key)
            if not r or r.get("status") != "ok":
                continue
            p = r["params"]
            est = estimate_step_memory(method, p, shape, "cuda")
            settings = (f"{p['calib_samples']} x {p['seq_len']} calibration, W{p['bits']} g{p['group_size']}"
                        if method == "gptq" else f"{p['steps']} steps, batch {p['batch_size']} x {p['seq_len']}, "
                        + ", ".join(f"{k} {v}" for k, v in (r.get("plan") or {}).items()))
            rows.append(f"| {d.get('shape', '8b')} | {method} | {settings} | {d['device']} | {r['wall_seconds']:.0f} | "
                        f"{r['measured_peak_bytes'] / GiB:.2f} | {est.total / GiB:.2f} | "
                        f"{est.total / r['measured_peak_bytes']:.2f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="rtn,gptq,bf16,nf4,int8")
    ap.add_argument("--gptq-layers", type=int, default=4)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", default="/tmp/acf-scale")
    ap.add_argument("--tokenizer", default=None, help="any tokenizer dir (default: the default model's, which imports it)")
    ap.add_argument("--data-dir", default=None, help="acf data root (GSM8K) for the acf parts")
    ap.add_argument("--gen-items", type=int, default=400)
    ap.add_argument("--gen-new", type=int, default=256)
    ap.add_argument("--engines", default="", help="generation engines after the padded ones (continuous,static)")
    ap.add_argument("--batch32-prompts", type=int, default=128, help="prompts of the batch-32 'before' run")
    ap.add_argument("--steps", type=int, default=50, help="training steps of the lora/distill parts")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-seq", type=int, default=512)
    ap.add_argument("--shape", default="8b", choices=["8b", "1b"], help="Llama-3.1-8B or Llama-3.2-1B shape")
    ap.add_argument("--tag", default=None, help="results file suffix (default gpu / tiny-cpu)")
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU: checks the script, measures nothing useful")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--render", nargs="+", default=None, help="print the memory table of these results files")
    a = ap.parse_args()
    if a.render:
        print(render(a.render))
        return
    dev = "cpu" if a.tiny else "cuda"
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer, BitsAndBytesConfig, LlamaForCausalLM

    import transformers

    from acf.models.loading import resolve_model

    tok = AutoTokenizer.from_pretrained(a.tokenizer or str(resolve_model("smollm2-135m")))
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    bw, bw_how = bandwidth_for(name)
    res: dict = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                 "note": "randomly initialised Llama-3.1-8B-shaped weights: speed, memory and size do not depend on "
                         "weight values; no quality figures here", "bandwidth_bytes_per_s": bw, "bandwidth_how": bw_how}
    try:
        import llmcompressor

        res["llmcompressor"] = llmcompressor.__version__
    except Exception:
        pass
    parts = a.parts.split(",")
    full_cfg = llama31_8b_config(tiny=a.tiny) if a.shape == "8b" else llama32_1b_config()
    tag = a.tag or ("tiny-cpu" if a.tiny else "gpu")
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out_dir / f"scale-{tag}.json").write_text(json.dumps(res, indent=2))

    acf_parts = [p for p in parts if p in ("lora", "distill", "steps_gptq", "gen", "tf")]
    if acf_parts:
        from acf.tasks import get_task

        task = get_task("gsm8k", a.data_dir)
        res["shape"] = a.shape
        ck = work / f"acf-{a.shape}"
        res["checkpoint_save_seconds"] = save_checkpoint(full_cfg, dev, ck, Path(tok.name_or_path))
        step_params = {
            "lora": {"steps": a.steps, "batch_size": a.train_batch, "seq_len": a.train_seq, "samples": 256},
            "distill": {"steps": a.steps, "batch_size": a.train_batch, "seq_len": a.train_seq, "samples": 256},
            "steps_gptq": {"bits": 4, "group_size": 128, "calib_samples": a.calib_samples, "seq_len": a.seq_len},
        }
        for part in ("lora", "distill", "steps_gptq"):
            if part in parts:
                method = "gptq" if part == "steps_gptq" else part
                try:
                    r = acf_step(method, step_params[part], ck, work, task, dev)
                except Exception as e:  # noqa: BLE001 - one part failing must not lose the others' figures
                    r = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:500]}
                res[f"acf_{part}"] = r
                print(part, json.dumps(r), flush=True)
                save()
        if "gen" in parts or "tf" in parts:
            try:
                acf_eval_parts(parts, ck, task, a, res, save)
            except Exception as e:  # noqa: BLE001
                res["eval_error"] = f"{type(e).__name__}: {e}"[:500]
            print(json.dumps({k: res.get(k) for k in ("load", "generation", "teacher_forced", "eval_error")},
                             indent=1), flush=True)
            save()
        if not [p for p in parts if p not in acf_parts]:
            return
    if "rtn" in parts:
        r = quantize("rtn", full_cfg, dev, a.calib_samples, a.seq_len, work, tok)
        r["how"] = "measured on the full model"
        res["rtn_w4"] = r
        print("RTN W4 g128:", r, flush=True)
    if "gptq" in parts:
        n_l = a.gptq_layers
        r = quantize("gptq", llama31_8b_config(n_l, tiny=a.tiny), dev, a.calib_samples, a.seq_len, work, tok)
        r["how"] = f"measured on the first {n_l} of {full_cfg.num_hidden_layers} blocks"
        if n_l < full_cfg.num_hidden_layers:
            r["full_model_seconds_estimate"] = round(r["seconds"] / n_l * full_cfg.num_hidden_layers, 1)
            r["estimate_how"] = (f"estimated: measured time x {full_cfg.num_hidden_layers}/{n_l} (GPTQ cost is per "
                                 f"block; embedding/lm_head overhead ignored)")
        res["gptq_w4"] = r
        print("GPTQ W4 g128:", r, flush=True)
    # Inference: bf16 from a saved random checkpoint, then bnb nf4 / int8 loaded from it.
    bf16_dir = work / "bf16"
    if any(p in parts for p in ("bf16", "nf4", "int8")):
        model = build(full_cfg, dev)
        if not (bf16_dir / "config.json").exists():
            t = time.perf_counter()
            model.save_pretrained(bf16_dir)
            res["bf16_save_seconds"] = round(time.perf_counter() - t, 1)
        if "bf16" in parts:
            wb = weight_bytes(model)
            lat = latency(model, dev, a.prompt_len, a.new_tokens, a.batch, full_cfg.vocab_size)
            lat.update(size_bytes=dir_size(bf16_dir), weight_bytes=wb,
                       decode_floor_ms=round(wb / bw * 1000, 3) if bw == bw else None)
            res["bf16"] = lat
            print("bf16:", lat, flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache() if dev == "cuda" else None
    for kind in ("nf4", "int8"):
        if kind not in parts:
            continue
        q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
             if kind == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
        t = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained(bf16_dir, quantization_config=q, device_map={"": dev},
                                                 dtype=torch.bfloat16)
        load_s = time.perf_counter() - t
        wb = weight_bytes(model)
        lat = latency(model, dev, a.prompt_len, a.new_tokens, a.batch, full_cfg.vocab_size)
        out = work / kind
        model.save_pretrained(out)
        lat.update(size_bytes=dir_size(out), weight_bytes=wb, load_and_quantize_seconds=round(load_s, 1),
                   decode_floor_ms=round(wb / bw * 1000, 3) if bw == bw else None)
        res[kind] = lat
        print(f"bnb {kind}:", lat, flush=True)
        shutil.rmtree(out, ignore_errors=True)
        del model
        gc.collect()
        torch.cuda.empty_cache() if dev == "cuda" else None
    save()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
