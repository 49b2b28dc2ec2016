"""Does the GGUF allocator's sensitivity estimate rank tensors like their damage measured in llama.cpp?

    .venv/bin/python experiments/bench_gguf_sensitivity.py                      # CPU, ~10 min on 2 cores

The estimate is the one `gguf` with `avg_bits` allocates by (`acf.methods.gguf_mixed.gguf_sensitivity`): the
diagonal Fisher of the HF model times llama.cpp's own quantization error of each tensor (the F16 file quantized by
`llama_model_quantize` with the step's importance matrix, read back dequantized), 16 x 512 GSM8K train tokens.
The direct measurement quantizes *only* that tensor (every other tensor stays F16, the file type is Q8_0 with an
override per tensor) with the same importance matrix and measures the KL divergence to the F16 file's full
next-token distributions in llama.cpp, on other windows (seed 1, 4 x 256 tokens). Spearman's rank correlation of
the two over every matrix of every `--block-stride`-th block (and the last) plus the token embedding, per type.
Writes experiments/results/gguf-sensitivity-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def kl_to(ref_logp, path: Path, windows) -> float:
    """Mean per-token KL(F16 || this file) over the windows, full vocabulary, in llama.cpp."""
    import torch

    from acf.evaluation.llamacpp import LlamaCppLM

    lm = LlamaCppLM(path, n_ctx=windows.shape[1])
    try:
        tot, n = 0.0, 0
        for i in range(windows.shape[0]):
            lq = torch.log_softmax(lm(windows[i: i + 1]).logits[0].double(), -1)
            lp = ref_logp[i]
            tot += float((lp.exp() * (lp - lq)).sum())
            n += lp.shape[0]
        return tot / n
    finally:
        lm.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default="Q4_0,Q5_1", help="types of the direct pass (comma list)")
    ap.add_argument("--samples", type=int, default=16, help="estimate and importance matrix windows (x 512)")
    ap.add_argument("--windows", type=int, default=4, help="direct pass windows (x --window-len), seed 1")
    ap.add_argument("--window-len", type=int, default=256)
    ap.add_argument("--block-stride", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args()

    import torch

    from acf.methods import gguf as G
    from acf.models import gguf_file as F
    from acf.methods import gguf_quantize as GQ
    from acf.methods.model_io import load_dense
    from acf.methods.calibration import calibration_ids
    from acf.methods.gguf_mixed import allocatable, gguf_sensitivity
    from acf.models.loading import resolve_model
    from acf.core.provenance import device_string
    from acf.tasks import get_task
    from bench_mixed import spearman

    torch.manual_seed(0)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    model_dir = resolve_model(args.model)
    task = get_task("gsm8k")
    model, tok = load_dense(model_dir, "cpu", "bench", dtype=torch.float32)
    res: dict = {"device": device_string("cpu"), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                 "model": str(model_dir), "date": time.strftime("%Y-%m-%d %H:%M"), "types": types,
                 "estimate": {"samples": args.samples, "seq_len": 512},
                 "direct": {"windows": args.windows, "seq_len": args.window_len, "seed": 1}, "by_type": {}}
    with tempfile.TemporaryDirectory(prefix="acf-gguf-sens-") as td:
        work = Path(td)
        f16 = work / "model-f16.gguf"
        G.convert_hf(Path(model_dir), f16, "f16")
        info = F.read_gguf(f16)
        ids = calibration_ids(tok, task, args.samples, 512, 0, "gguf")
        imat, _ = GQ.compute_imatrix(model, ids, info.architecture, model.config.num_hidden_layers, set(info.widths))
        t = time.perf_counter()
        est = gguf_sensitivity(model, ids, f16, types, imat, work)
        res["estimate"]["seconds"] = round(time.perf_counter() - t, 1)
        del model
        shapes = allocatable(f16)
        n_blocks = 1 + max(int(s.name.split(".")[1]) for s in shapes if s.name.startswith("blk."))
        blocks = sorted(set(range(0, n_blocks, args.block_stride)) | {n_blocks - 1})
        names = [s.name for s in shapes if not s.name.startswith("blk.") or int(s.name.split(".")[1]) in blocks]
        res["direct"]["blocks"] = blocks
        windows = calibration_ids(tok, task, args.windows, args.window_len, 1, "gguf")
        from acf.evaluation.llamacpp import LlamaCppLM

        ref = LlamaCppLM(f16, n_ctx=args.window_len)
        ref_logp = [torch.log_softmax(ref(windows[i: i + 1]).logits[0].double(), -1) for i in range(len(windows))]
        ref.close()
        for tname in types:
            t0, direct = time.perf_counter(), {}
            todo = [n for n in names if tname in est.get(n, {})]
            for i, g in enumerate(todo):
                q = work / "one.gguf"
                ov = {f"^{re.escape(s.name)}$": (tname if s.name == g else "F16") for s in shapes}
                GQ.quantize(f16, q, "Q8_0", imat, ov, nthread=0)
                direct[g] = kl_to(ref_logp, q, windows)
                q.unlink()
                print(f"[{tname} {i + 1}/{len(todo)}] {g}: direct {direct[g]:.3e}  estimate {est[g][tname]:.3e}",
                      flush=True)
            rho = spearman([est[g][tname] for g in todo], [direct[g] for g in todo])
            res["by_type"][tname] = {"spearman": round(rho, 4), "tensors": len(todo),
                                     "direct_seconds": round(time.perf_counter() - t0, 1),
                                     "all": {g: {"direct": direct[g], "estimate": est[g][tname]} for g in todo}}
            print(f"{tname}: Spearman {rho:.3f} over {len(todo)} tensors", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf-sensitivity-cpu.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "gguf-sensitivity-cpu.md").write_text(markdown(res))
    return 0


def markdown(res: dict) -> str:
    L = ["# GGUF sensitivity estimate vs directly measured damage (llama.cpp)", "",
         f"{res['date']} · {res['device']} · model {Path(res['model']).name} · estimate: Fisher (16 x 512 GSM8K "
         f"train tokens) x llama.cpp's quantization error with the importance matrix ({res['estimate']['seconds']} s "
         f"for {len(res['types'])} types, every allocatable tensor) · direct: only that tensor quantized (rest F16), "
         f"KL to the F16 file's full distributions in llama.cpp on {res['direct']['windows']} x "
         f"{res['direct']['seq_len']} other tokens (seed 1), blocks {res['direct']['blocks']} + token_embd", "",
         "| type | tensors | Spearman | direct pass (s) |", "|---|---:|---:|---:|"]
    for t, r in res["by_type"].items():
        L.append(f"| {t} | {r['tensors']} | {r['spearman']:.3f} | {r['direct_seconds']} |")
    for t, r in res["by_type"].items():
        top = sorted(r["all"].items(), key=lambda kv: -kv[1]["direct"])[:8]
        L += ["", f"Most damaging tensors at {t} (direct KL, estimate):", ""]
        L += [f"- {g}: {v['direct']:.2e}, {v['estimate']:.2e}" for g, v in top]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
