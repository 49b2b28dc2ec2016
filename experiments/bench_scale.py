#!/usr/bin/env python3
"""Scale benchmark at Llama-3.1-8B shape on a GPU (prints its figures; not a test).

Weights are RANDOMLY INITIALISED from the Llama-3.1-8B configuration: speed, memory and size do not depend on
weight values, so these are real timings for an 8B-shaped model (not quality figures). Calibration inputs are
random token ids for the same reason.

Measures: RTN W4 g128 and GPTQ W4 g128 (llm-compressor, the same recipes acf uses) wall time and peak GPU memory
with N calibration samples of L tokens; decode ms/token and time to first token at batch 1, and throughput at
batch B for bf16, bnb nf4 and bnb int8; size on disk of each; and the physical floor of batch-1 decode
(weight bytes / memory bandwidth) next to each measured latency.

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
        return LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=layers or 2,
                           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers or 32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
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
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


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
    ap.add_argument("--tokenizer", default=None, help="any tokenizer dir (only used by llm-compressor's data path)")
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU: checks the script, measures nothing useful")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    dev = "cpu" if a.tiny else "cuda"
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer, BitsAndBytesConfig, LlamaForCausalLM

    import transformers

    from acf.models import resolve_model

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
    full_cfg = llama31_8b_config(tiny=a.tiny)
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
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "tiny-cpu" if a.tiny else "gpu"
    (out / f"scale-{tag}.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
