"""The `gguf` method: the previous steps' HF model -> llama.cpp GGUF of a chosen type (see acf.methods.gguf for the chain).

The output directory holds `model.gguf` (what a user deploys and what the llama.cpp runtime measures), `gguf.json`
(type, imatrix facts, overrides, the tensor types llama.cpp chose) and the input's config.json and tokenizer files:
evaluation scores the GGUF with the same tokenizer as every other candidate, so sequences and references match.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from acf.core.atomic import sha256_file, write_text
from acf.core.errors import MethodFailed
from acf.methods import gguf as G
from acf.methods import gguf_quantize as GQ
from acf.methods.base import StepContext
from acf.models import gguf_file as F
from acf.models.loading import free

#: small files copied from the input (tokenizer, config); the weights are in model.gguf
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")



def gguf(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    from acf.methods.model_io import load_dense, quant_method, save_model, versions

    t_name = params["type"]
    if t_name not in F.GGUF_TYPES:
        raise MethodFailed("gguf", "config", f"unknown GGUF type {t_name!r}; known: {', '.join(F.GGUF_TYPES)}")
    try:
        v = G.require_llama_cpp()
        G.require_converter()
    except F.GGUFError as e:
        raise MethodFailed("gguf", "unavailable", str(e)) from None
    extra: dict = {"libraries": versions("llama_cpp_python", "gguf", "transformers", "torch")}
    work = out_dir / ".work"
    work.mkdir(parents=True, exist_ok=True)
    src = in_dir
    try:
        qm = quant_method(in_dir)
        mixed = params.get("avg_bits") is not None
        need_model = params["imatrix"] or qm is not None or mixed
        model = tok = None
        if need_model:
            # load_dense refuses a quantized input and decompresses a sparse (pruned) compressed-tensors one
            model, tok = load_dense(in_dir, "cpu", "gguf", trust_remote_code=ctx.trust_remote_code)
            if qm is not None:
                src = work / "dense"
                save_model(model, tok, src)
        t0 = time.perf_counter()
        f16 = work / "model-f16.gguf"
        try:
            G.convert_hf(src, f16, "f16")
        except F.GGUFError as e:
            raise MethodFailed("gguf", "library", str(e)) from None
        extra["convert_seconds"] = round(time.perf_counter() - t0, 3)
        info16 = F.read_gguf(f16)
        imat = None
        if params["imatrix"]:
            from acf.methods.calibration import calibration_facts, calibration_ids

            n, L = params["calib_samples"], params["seq_len"]
            ids = calibration_ids(tok, ctx.task, n, L, ctx.seed, "gguf", ctx.calib_mix)
            t0 = time.perf_counter()
            n_layers = getattr(model.config, "num_hidden_layers", 0)
            imat, facts = GQ.compute_imatrix(model, ids, info16.architecture, n_layers, set(info16.widths))
            if not imat:
                raise MethodFailed("gguf", "library", "the importance matrix maps to no GGUF tensor of this model")
            facts.update(samples=n, seq_len=L, seed=ctx.seed, seconds=round(time.perf_counter() - t0, 3),
                         **calibration_facts(ctx.task, n, ctx.calib_mix, "gguf", ", evaluation's prompt format"))
            extra["imatrix"] = facts
        overrides, alloc = dict(params["overrides"]), None
        if mixed:
            from acf.methods.gguf_mixed import allocation_for

            alloc, extra["mixed_precision"] = allocation_for(model, tok, params, in_dir, f16, imat, ctx, work)
            overrides = alloc.overrides()
        if model is not None:
            free(model)
            model = None
        t0 = time.perf_counter()
        dst = out_dir / F.GGUF_NAME
        try:
            # an allocation overrides every matrix; llama.cpp applies overrides only under a quantized file type
            GQ.quantize(f16, dst, "Q8_0" if alloc is not None else t_name, imat, overrides, nthread=0)
        except F.GGUFError as e:
            raise MethodFailed("gguf", "library", str(e)) from None
        extra["quantize_seconds"] = round(time.perf_counter() - t0, 3)
        if alloc is not None:
            from acf.methods.gguf_mixed import check_written

            check_written(extra["mixed_precision"], alloc, dst)
        info = F.read_gguf(dst)
        main = F.GGUF_TYPES[t_name]
        fallbacks = {} if alloc is not None else _fallbacks(dst, main)   # an allocation types every tensor
        extra.update(gguf_size_bytes=info.size_bytes, tensor_types=info.tensor_types,
                     fallback_tensors=len(fallbacks))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name in _COPY:
        if (in_dir / name).is_file():
            shutil.copy2(in_dir / name, out_dir / name)
    label = t_name if alloc is None else f"mixed {alloc.effective_bits:.2f} bpw"
    man = F.GGUFManifest(type=label, source=str(in_dir), imatrix=extra.get("imatrix"),
                         overrides=overrides, fallbacks=fallbacks, info=info,
                         llama_cpp_python=v, sha256=sha256_file(dst))
    man.info.path = F.GGUF_NAME
    write_text(out_dir / F.MANIFEST_NAME, man.model_dump_json(indent=2) + "\n")
    return extra


def _fallbacks(path: Path, main) -> dict[str, str]:
    """2-D weight tensors whose row width the type's block does not divide, with the type llama.cpp stored them in
    instead (its documented fallback): reported so that a figure is read for the file it really is."""
    from gguf import GGUFReader

    if main.block <= 1:
        return {}
    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors
            if len(t.shape) == 2 and int(t.shape[0]) % main.block}
