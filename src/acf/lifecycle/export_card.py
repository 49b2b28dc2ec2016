"""The model card (README.md) and Ollama Modelfile of an exported candidate: pure text from a run's FrontierFile.

Why a card at all: a compressed model handed on without its figures is a claim nobody can check. The card carries
every figure the run measured for this model with how it was obtained (value, n, 95% interval, device, runtime,
method), the search-item figures apart from the held-out ones (the search chose the model on the former), and the
best fixed recipe at no larger size as the comparison, so a reader sees what the compression bought against what
any user could have run instead. Where acf did not check something (vLLM loading, Ollama), the card says so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from acf.coordinator.state import Candidate, FrontierFile
from acf.core.provenance import Measurement
from acf.core.stats import paired_ratio
from acf.models.loading import ALIASES
from acf.reports.markdown import table

#: the figures the card always states, in this order (others measured follow them)
FIGURES = ("kld", "top1", "kld_general", "size", "latency")
#: what each figure means, in one phrase
MEANING = {
    "kld": "mean per-token KL divergence from the uncompressed model's next-token distributions (lower is better)",
    "top1": "share of positions where this model's most likely next token is the uncompressed model's",
    "kld_general": "kld on general text no recipe trains on (other tasks' test items)",
    "size": "bytes on disk of the model's files",
    "latency": "batch-1 decode time per token",
}
#: the projections vLLM fuses into one layer (Llama-like models): every member must share one quantization format
FUSED_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))
#: Ollama's own ChatML template (its templates/chatml.gotmpl): used for models whose Jinja template is ChatML
CHATML_GO = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
             "<|im_start|>assistant\n")


def cell(text: Any) -> str:
    """One markdown table cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def num(v: Optional[float]) -> str:
    """Six significant digits: enough to read a figure back and compare it with frontier.json."""
    return "–" if v is None else f"{v:.6g}"


def runtime_label(runtime: str) -> str:
    """transformers' runtime strings start with the Python version; say the runtime's name first."""
    if not runtime:
        return "–"
    if runtime.startswith("python") and "transformers" in runtime:
        return f"transformers ({runtime})"
    return runtime


def value_text(metric: str, m: Measurement) -> str:
    if m.value is None:
        return "not measured"
    if metric == "size" or m.unit == "bytes":
        return f"{m.value / 2 ** 20:.2f} MiB ({int(m.value):,} bytes)"
    return num(m.value)


def figure_rows(metrics: dict[str, Measurement]) -> list[list[str]]:
    """One row per measured figure: the card's five first, then any other the run measured."""
    names = [k for k in FIGURES if k in metrics] + sorted(k for k in metrics if k not in FIGURES)
    rows = []
    for k in names:
        m = metrics[k]
        ci = "–" if m.ci95 is None else f"[{num(m.ci95[0])}, {num(m.ci95[1])}]"
        rows.append([k, value_text(k, m), cell(m.unit or "–"), "–" if m.n is None else str(m.n), ci,
                     cell(m.device or "–"), cell(runtime_label(m.runtime)), cell(f"{m.how}: {m.method}".strip(": "))])
    return rows


FIGURE_HEADER = ("metric", "value", "unit", "n", "95% interval", "device", "runtime", "how")


def latency_note(m: Optional[Measurement], fmt: str) -> str:
    """Latency is only a deployment figure when measured in the runtime the format deploys in: say which it was."""
    if m is None or m.value is None:
        return "Latency: not measured for this model."
    fig = f"Latency ({num(m.value)} {m.unit}) was measured"
    where = f"runtime {runtime_label(m.runtime)}, device {m.device or 'not recorded'}"
    if m.runtime.startswith("llama.cpp"):
        return f"{fig} in llama.cpp, the runtime this file deploys in ({where})."
    if fmt == "compressed-tensors":
        return (f"{fig} in transformers' dequantized path ({where}): transformers decompresses the "
                f"compressed-tensors weights to 16 bits for every forward, so this is not a deployment figure; an "
                f"inference server with integer kernels (vLLM) was not measured.")
    if fmt == "bitsandbytes":
        return f"{fig} in transformers with bitsandbytes' kernels ({where})."
    return f"{fig} in transformers ({where})."


def layer_formats_of(c: Candidate) -> Optional[dict[str, str]]:
    """The per-layer allocation of the candidate's quantization step: replayed `layer_formats`, or the one the
    step chose (its record's `extra.mixed_precision.allocation.layer_formats`); None for a uniform step."""
    for st, rec in zip(c.strategy.steps, c.steps + [None] * len(c.strategy.steps)):
        lf = st.params.get("layer_formats")
        if lf:
            return dict(lf)
        if st.params.get("avg_bits") is not None and st.method != "gguf":
            alloc = ((rec.extra if rec is not None else {}).get("mixed_precision") or {}).get("allocation") or {}
            return dict(alloc.get("layer_formats") or {}) or None
    return None


def is_allocated(c: Candidate) -> bool:
    """Does a compressed-tensors quantization step of this candidate allocate formats per layer?"""
    return any((st.params.get("avg_bits") is not None or st.params.get("layer_formats")) and st.method != "gguf"
               for st in c.strategy.steps)


def fused_mixes(layer_formats: dict[str, str]) -> tuple[list[str], int]:
    """(the fused groups whose members were given different formats, as 'prefix: a=fmt, b=fmt', and the number of
    fused groups seen). vLLM loads q/k/v and gate/up of a block as one layer with one scheme."""
    groups: dict[str, dict[str, str]] = {}
    for name, fmt in layer_formats.items():
        for parent, members in FUSED_GROUPS:
            m = re.match(rf"^(.*\.{parent})\.({'|'.join(members)})$", name)
            if m:
                groups.setdefault(m.group(1), {})[m.group(2)] = fmt
    mixed = [f"{p}: " + ", ".join(f"{k}={v}" for k, v in sorted(g.items()))
             for p, g in groups.items() if len(set(g.values())) > 1]
    return mixed, len(groups)


def params_text(params: dict[str, Any]) -> str:
    """A step's params as JSON; a per-layer allocation is summarised by format counts (export.json has it all)."""
    shown = dict(params)
    lf = shown.get("layer_formats")
    if isinstance(lf, dict) and len(lf) > 8:
        counts: dict[str, int] = {}
        for f in lf.values():
            counts[f] = counts.get(f, 0) + 1
        shown["layer_formats"] = f"{len(lf)} layers: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    return cell(json.dumps(shown, sort_keys=True, default=str))


def strategy_section(c: Candidate) -> list[str]:
    rows = []
    for i, st in enumerate(c.strategy.steps):
        rec = c.steps[i] if i < len(c.steps) else None
        rows.append([str(i + 1), st.method, params_text(st.params),
                     "–" if rec is None else f"{rec.wall_seconds:.1f}", cell(rec.device if rec else "–") or "–"])
    md = ["## How it was made", "", f"Strategy: `{c.strategy.describe()}`", ""]
    if rows:
        md += [table(("step", "method", "params", "wall s", "device"), rows), ""]
    alloc = layer_formats_of(c)
    if alloc:
        counts: dict[str, int] = {}
        for f in alloc.values():
            counts[f] = counts.get(f, 0) + 1
        md += [f"Per-layer allocation: {len(alloc)} layers, " + ", ".join(f"{k} x{v}" for k, v in
                                                                          sorted(counts.items()))
               + " (every layer's format is in export.json).", ""]
    who = c.proposed_by + (f" — {c.rationale}" if c.rationale else "")
    md += [f"Proposed by: {cell(who)}; episode {c.episode}.", ""]
    return md


def base_model_line(ff: FrontierFile) -> str:
    """The base model as the run named it; an alias is spelled out with where its weights came from."""
    r = ff.run
    alias = ALIASES.get(r.model.lower())
    if alias is not None:
        return (f"`{r.model}`: acf's alias for {alias.hub_id}, whose weights acf imports from the GGUF "
                f"`{alias.gguf}` in the `{alias.package}` package (dequantized to a 16-bit checkpoint); every figure "
                f"below compares with that checkpoint (`{r.model_path}`).")
    return f"`{r.model}` (`{r.model_path}`)."


def hub_id(model: str) -> Optional[str]:
    """The hub id of the run's model, for the card's `base_model` field; None for a local folder."""
    if model.lower() in ALIASES:
        return ALIASES[model.lower()].hub_id
    if re.match(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$", model) and not model.startswith((".", "/", "~")):
        return model
    return None


def figures_section(ff: FrontierFile, c: Candidate, fmt: str) -> list[str]:
    sets = ff.run.item_sets or {}
    search, report = sets.get("search") or {}, sets.get("report") or {}
    md = ["## Measured figures", "",
          "Every figure is against the uncompressed base model, measured by acf with the same evaluator, items and "
          "baseline reference as every other model of the run. " + " ".join(f"`{k}`: {v}." for k, v in
                                                                               MEANING.items()), ""]
    where = f" (test items {search.get('offset', 0)}..{search.get('offset', 0) + search['count'] - 1} of the " \
            f"permuted test split)" if search.get("count") else ""
    md += [f"### Search items{where}", "",
           "The search ranked and chose models on these items, so a figure here is selected on the items it is "
           "measured on.", "", table(FIGURE_HEADER, figure_rows(c.metrics)), ""]
    if c.final_metrics:
        where = f" (test items {report.get('offset')}..{report.get('offset') + report['count'] - 1})" \
            if report.get("count") and report.get("offset") is not None else ""
        md += [f"### Held-out items{where}", "", "Items the search never evaluated (`--final-limit`).", "",
               table(FIGURE_HEADER, figure_rows(c.final_metrics)), ""]
    else:
        md += ["No held-out figures: the run had no `--final-limit`, or this model was not among those it measured "
               "held out.", ""]
    md += [latency_note(c.metrics.get("latency"), fmt), ""]
    return md


def _ratio_text(a: Optional[Measurement], b: Optional[Measurement]) -> str:
    if a is None or b is None or a.value is None or not b.value:
        return "–"
    pr = paired_ratio(a.extra.get("per_item"), b.extra.get("per_item"))
    if pr is None:
        return f"{a.value / b.value:.3f}x"
    return f"{pr[0]:.3f}x [{pr[1][0]:.3f}, {pr[1][1]:.3f}] (paired bootstrap over items)"


def yardstick_section(ff: FrontierFile, c: Candidate) -> list[str]:
    """The baseline's size and the best fixed recipe at no larger size (FrontierFile.best_recipe_at)."""
    md = ["## Against the uncompressed model and the best fixed recipe", ""]
    size = c.metrics.get("size")
    bsize = ff.baseline.metrics.get("size") if ff.baseline is not None else None
    if bsize is not None and bsize.value:
        md += [f"Uncompressed base model: {value_text('size', bsize)}"
               + (f"; this model is {size.value / bsize.value:.3f}x its size." if size and size.value else "."), ""]
    if size is None or size.value is None:
        return md + ["This model's size was not measured: no recipe comparison.", ""]
    if not ff.measured_recipes():
        return md + ["The run measured no fixed recipe (`--recipes none`, or a run made before the yardstick): "
                     "no comparison with what a user could run instead.", ""]
    r = ff.best_recipe_at(size.value)
    if r is None:
        smallest = min(ff.measured_recipes(), key=lambda x: x.metrics["size"].value)
        return md + [f"No fixed recipe of this run is as small as this model; the smallest measured is "
                     f"`{smallest.strategy.describe()}` at {value_text('size', smallest.metrics['size'])}.", ""]
    self_note = " (this model is that recipe)" if r.id == c.id else ""
    md += [f"Best fixed recipe at no larger size{self_note}: `{r.id}`, `{r.strategy.describe()}`, "
           f"{value_text('size', r.metrics['size'])}. Measured in the same run on the same items.", ""]
    rows = []
    for label, where in (("search items", "metrics"), ("held out", "final_metrics")):
        for k in ("kld", "kld_general"):
            a, b = getattr(c, where).get(k), getattr(r, where).get(k)
            if a is None and b is None:
                continue
            rows.append([f"{k}, {label}", num(a.value) if a else "–", num(b.value) if b else "–", _ratio_text(a, b)])
    md += [table(("figure", "this model", f"`{r.id}`", "ratio (this / recipe)"), rows), ""]
    return md


def provenance_section(ff: FrontierFile, c: Candidate, exporter: tuple[str, Optional[str]]) -> list[str]:
    r = ff.run
    return ["## Provenance", "",
            f"- Run `{r.run_id}` (task `{r.dataset}`, device {cell(r.device_name or r.device)}, runtime {r.runtime}), "
            f"made with acf {r.acf_version} at commit {r.git_commit or 'unknown (not a git checkout)'}; "
            f"candidate `{c.id}`, finished {c.finished_at or 'unknown'}.",
            f"- Exported with acf {exporter[0]} at commit {exporter[1] or 'unknown (not a git checkout)'}.",
            "- `export.json` holds the candidate's full record (strategy, step records, every Measurement) and the "
            "source run's path.", ""]


def load_section(fmt: str, folder: str, weights: Optional[str], c: Candidate, *, vllm_installed: bool = False,
                 llama_cpp_python: str = "") -> list[str]:
    """How to load and serve the model, with what acf checked and what it did not."""
    md = ["## How to load it", ""]
    if fmt == "gguf":
        md += ["```bash",
               f"llama-server -m ./{folder}/{weights} --port 8080     # llama.cpp's OpenAI-compatible server",
               f"llama-cli -m ./{folder}/{weights} -p \"Hello\"",
               f"cd {folder} && ollama create {folder.lower()} -f Modelfile && ollama run {folder.lower()}",
               "```", "",
               "```python",
               "from llama_cpp import Llama",
               f"llm = Llama(model_path=\"./{folder}/{weights}\")",
               "```", "",
               f"acf measured this file in llama.cpp through llama-cpp-python {llama_cpp_python or '(version not recorded)'}"
               f" (the figures above). llama-server and Ollama were not run by acf.", ""]
        return md
    extra = {"compressed-tensors": "  # needs the compressed-tensors package",
             "bitsandbytes": "  # needs the bitsandbytes package"}.get(fmt, "")
    md += ["```python",
           "from transformers import AutoModelForCausalLM, AutoTokenizer",
           "",
           f"model = AutoModelForCausalLM.from_pretrained(\"./{folder}\"){extra}",
           f"tok = AutoTokenizer.from_pretrained(\"./{folder}\")",
           "```", "",
           "acf's figures above come from this folder loaded with transformers' `from_pretrained`.", ""]
    if fmt == "compressed-tensors":
        why = ("vLLM is installed here, but acf did not try to load this model with it" if vllm_installed
               else "vLLM not installed here")
        md += ["Serving with vLLM:", "", "```bash", f"vllm serve ./{folder}", "```", "",
               f"**Loadability in vLLM not checked by acf ({why}).**"]
        if is_allocated(c):
            md[-1] += (" This model's quantization allocates formats per layer: vLLM loads q/k/v and gate/up of a "
                       "block as one fused layer with one scheme and refuses a fused group whose members have "
                       "different formats (acf issue #30).")
            lf = layer_formats_of(c)
            if lf:
                mixed, n = fused_mixes(lf)
                md[-1] += (f" In this allocation {len(mixed)} of {n} fused groups mix formats"
                           + (f" (e.g. {cell(mixed[0])}): by that rule vLLM refuses it (not tried)." if mixed
                              else "; other reasons vLLM might refuse it were not checked."))
            else:
                md[-1] += " The allocation is not in the record: check `config.json`'s `config_groups`."
        md.append("")
    return md


def card_text(ff: FrontierFile, cid: str, *, fmt: str, folder: str = "model", weights: Optional[str] = None,
              exporter: tuple[str, Optional[str]] = ("unknown", None), vllm_installed: bool = False,
              llama_cpp_python: str = "", gguf_type: str = "") -> str:
    """The model card of candidate `cid` of a run. `fmt`: gguf, compressed-tensors, bitsandbytes or safetensors;
    `folder`: the export folder's name (for the loading snippets); `weights`, `gguf_type`, `llama_cpp_python`: the
    GGUF file's name, its type as its manifest states it, and the llama-cpp-python that wrote and measured it."""
    c = ff.candidate(cid)
    r = ff.run
    base = hub_id(r.model)
    front = ["---", f"library_name: {'gguf' if fmt == 'gguf' else 'transformers'}",
             "tags:", "- acf", f"- {fmt}"] + ([f"base_model: {base}"] if base else []) + ["---", ""]
    size = c.metrics.get("size")
    name = Path(r.model).name if r.model.startswith((".", "/", "~")) else r.model
    md = front + [f"# {name}, compressed by acf: candidate `{c.id}` of run `{r.run_id}`", "",
                  f"Format: **{fmt}**" + (f" (`{weights}`" + (f", llama.cpp type {gguf_type}" if gguf_type else "")
                                          + ")" if weights else "")
                  + (f", {value_text('size', size)}" if size is not None and size.value is not None else "") + ".",
                  "", f"Base model: {base_model_line(ff)}", ""]
    if ff.recommended is not None and ff.recommended.id == c.id:
        md += [f"The run's recommended pick ({ff.recommended.preset} preset): {cell(ff.recommended.why)}.", ""]
    md += strategy_section(c)
    md += figures_section(ff, c, fmt)
    md += yardstick_section(ff, c)
    md += load_section(fmt, folder, weights, c, vllm_installed=vllm_installed, llama_cpp_python=llama_cpp_python)
    md += provenance_section(ff, c, exporter)
    return "\n".join(md).rstrip() + "\n"


def is_chatml(template: Optional[str]) -> bool:
    return bool(template) and "<|im_start|>" in template and "<|im_end|>" in template


def modelfile_text(weights: str, template: Optional[str]) -> str:
    """An Ollama Modelfile for the GGUF `weights`. A ChatML Jinja template (SmolLM2, Qwen) gets Ollama's own
    ChatML template and stop token; any other is left to the GGUF, which carries the model's Jinja template."""
    lines = ["# Ollama Modelfile written by `acf export`; not run by acf (Ollama is not part of acf's checks).",
             f"FROM ./{weights}"]
    if is_chatml(template):
        lines += ["# The model's chat template is ChatML; this is Ollama's ChatML template (a default system message",
                  "# the model's Jinja template may add is not reproduced).",
                  f'TEMPLATE """{CHATML_GO}"""', 'PARAMETER stop "<|im_end|>"']
    elif template:
        lines += ["# No TEMPLATE: the GGUF carries the model's Jinja chat template (tokenizer.chat_template); check",
                  "# what Ollama made of it with `ollama show --template`."]
    else:
        lines += ["# The model has no chat template: prompts go to it as plain text."]
    return "\n".join(lines) + "\n"
