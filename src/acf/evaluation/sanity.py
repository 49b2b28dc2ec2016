"""Baseline sanity check: is the uncompressed model a working LM on this task, before a search spends anything?

Why: a search measures every candidate against the baseline. If the baseline is broken (weights that do not fit
the config, a tokenizer from another model, a chat-only model fed the wrong BOS), every kld and retention figure
is measured against noise, and the run spends hours producing a frontier of nothing. Three cheap measurements
catch most such inputs, in seconds:

(a) the baseline's per-token NLL on the task's own text (questions and reference answers, packed into windows of
    a few hundred tokens, BOS by acf's one rule), (b) a short greedy continuation of a fixed prompt, checked for
    degenerate repetition, and (c) the tokenizer's characters per token on the task's text.

Why (a) scores the task's whole text and not only the reference answers (evaluation's answer NLL): measured with
SmolLM2-135M-Instruct (16 test items, CPU fp32), answer NLL is ~1.4 on GSM8K, TruthfulQA and HumanEval, but 6.5 on
CommonsenseQA and 7.6 on BBH date_understanding, whose references are a word or "(B)": a working model is unsure
which answer is right, and no fixed threshold separates that from a broken model. On the packed task text the
same model gives 1.3-3.7 nats/token on all five tasks (and BBH multistep_arithmetic_two), and a broken one
(shuffled embedding rows, or random weights) 8.9-12.4.

`check_baseline` measures and judges; it neither prints nor raises, so the pipeline, `acf eval` and tests decide
what to do with `SanityReport.problems`. Each problem says what looks wrong, the value, the plausible range and
how to go on anyway (`--skip-sanity`).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import BaseModel, Field, computed_field

from acf.core.atomic import write_text
from acf.core.errors import AcfError
from acf.evaluation.sequences import Scored
from acf.models.tokenization import adds_bos, prompt_text

# --- thresholds ----------------------------------------------------------------------------------------------------

#: NLL on the task's text above this (nats per token) is not what a working LM gives. A model that knows only
#: token frequencies (a unigram model) sits around 6-7 nats on English text; a random-init model at ~ln(vocab),
#: 10-12. Measured (16 test items, 2 x 256 tokens): SmolLM2-135M-Instruct 1.3 (BBH date_understanding), 1.5
#: (HumanEval), 1.9 (GSM8K), 2.1 (BBH multistep_arithmetic_two), 2.5 (TruthfulQA), 3.7 (CommonsenseQA: short
#: questions, little context); the same model with its embedding rows shuffled 8.9-12.4, random weights 10.8-11.0.
#: 6 lies between the worst working (3.7) and the best broken (8.9) value, ~1.5x from each, so a weaker or
#: off-domain model passes and a broken one does not.
MAX_NLL = 6.0
#: tokens per scored window of the task's text, and windows scored (cost: one forward of 2 x 256 tokens)
NLL_WINDOW = 256
NLL_WINDOWS = 2

#: Characters per token below this means the tokenizer barely merges anything. English BPE/SentencePiece
#: tokenizers give ~3-4.5 on English prose; a tokenizer that falls back to single characters or bytes (e.g. a
#: BPE without its merges) gives <= 1.0 on ASCII text. Digit-heavy task text is much lower even with a good
#: tokenizer, since many split numbers into single digits: measured with SmolLM2's tokenizer on 16 items, 3.2
#: (GSM8K), 3.1 (HumanEval), 4.2-4.7 (CommonsenseQA, TruthfulQA), but 1.58 on BBH date_understanding and 1.51 on
#: BBH multistep_arithmetic_two (pure arithmetic). 1.25 sits between 1.0 and the lowest working value (1.51).
MIN_CHARS_PER_TOKEN = 1.25

#: The greedy continuation is degenerate when one token, or a cycle of 1-3 tokens, makes up more than this share
#: of it. A working LM's 24-token continuation of "The capital of France is" is sentence-like; even when it
#: repeats itself ("Paris. The capital of France is Paris.") the cycle is a sentence long, not 1-3 tokens. A
#: broken model's greedy output falls into a fixed point (",,,,,", "the the the") or a 2-3 token loop. Measured:
#: SmolLM2-135M-Instruct 17% (" Paris.\n\nThe answer is: 2018-01-22 12:1": the digit "2"), a random-init model
#: 96% ("attempt attempt ... planners planners planners ..."). 0.6 tolerates a short legitimate run (a few
#: newlines, "1. 2. 3.") inside otherwise varied text.
MAX_REPEAT_SHARE = 0.6
#: Cycles of at most this many tokens count as degenerate repetition.
MAX_CYCLE = 3
#: Continuations shorter than this (the model ended with EOS early) are not judged for repetition.
MIN_JUDGED_TOKENS = 8

#: test items whose text the check scores (the first of the run's search items): 2 x 256 tokens need ~8-16
SANITY_ITEMS = 16
#: where a run records the check (next to frontier.json); a resumed run reads it instead of measuring again
SANITY_FILE = "sanity.json"

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_NEW_TOKENS = 24
SKIP_HINT = "if this model is what you mean to compress, rerun with --skip-sanity"


class SanityFailed(AcfError):
    """The baseline looks broken: the run stops before the search spends anything (exit 2, like other bad input)."""


class SanityReport(BaseModel):
    """What the baseline sanity check measured, the ranges it judged against, and what looked wrong."""

    model: str = ""
    device: str = ""
    text_nll: Optional[float] = Field(None, description="mean NLL per token (nats) of the task's text (questions "
                                      "and references, packed into windows), token-weighted")
    nll_items: int = Field(0, description="task items whose text the windows hold (at least in part)")
    nll_tokens: int = Field(0, description="scored tokens")
    chars_per_token: Optional[float] = Field(None, description="characters / tokens of the task's prompt+reference")
    prompt: str = DEFAULT_PROMPT
    continuation: str = ""
    continuation_tokens: int = 0
    repeat_share: Optional[float] = Field(None, description="largest share of the continuation taken by one token "
                                          "or a 1-3 token cycle")
    repeat_unit: Optional[str] = Field(None, description="the repeated token(s), decoded")
    thresholds: dict[str, float] = Field(default_factory=lambda: {
        "max_nll": MAX_NLL, "min_chars_per_token": MIN_CHARS_PER_TOKEN, "max_repeat_share": MAX_REPEAT_SHARE})
    problems: list[str] = Field(default_factory=list)
    seconds: float = 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        """No problem found (written into the JSON too, so a run's record says so at a glance)."""
        return not self.problems


# --- measurements (pure helpers) -----------------------------------------------------------------------------------

def repetition(ids: Sequence[int], max_cycle: int = MAX_CYCLE) -> tuple[float, tuple[int, ...]]:
    """(share, unit): the largest share of `ids` covered by one token, or by loops of a 1..max_cycle-token unit.

    A loop of period p is a run of consecutive positions with ids[i] == ids[i - p] that shows the unit at least
    twice more after its first appearance (run length >= max(p, 2)); it covers the run and the unit before it, so
    a pure loop scores 1.0. Isolated matches ("22" inside a date, "\n\n") are not loops. The most frequent token's
    share counts too ("a , a . a , a" is degenerate though no short loop spans it)."""
    n = len(ids)
    if n == 0:
        return 0.0, ()
    tok, cnt = Counter(ids).most_common(1)[0]
    best, unit = cnt / n, (tok,)
    for p in range(1, max_cycle + 1):
        covered = [False] * n
        first_unit: Optional[tuple[int, ...]] = None
        i = p
        while i < n:
            if ids[i] != ids[i - p]:
                i += 1
                continue
            j = i
            while j < n and ids[j] == ids[j - p]:
                j += 1
            if j - i >= max(p, 2):
                for k in range(i - p, j):
                    covered[k] = True
                first_unit = first_unit or tuple(ids[i - p:i])
            i = j
        share = sum(covered) / n
        if first_unit is not None and share > best + 1e-9:
            best, unit = share, first_unit
    return best, unit


def chars_per_token(tokenizer, texts: Sequence[str]) -> Optional[float]:
    """Characters per token over `texts`, tokenized without special tokens (they would inflate the ratio)."""
    chars = toks = 0
    for t in texts:
        if not t:
            continue
        chars += len(t)
        toks += len(tokenizer(t, add_special_tokens=False)["input_ids"])
    return chars / toks if toks else None


def _task_texts(items: Sequence[Any]) -> list[str]:
    """The task's own words (question + reference), without any template: what the tokenizer must handle well."""
    return [f"{getattr(it, 'prompt', '')}\n{getattr(it, 'reference', '')}".strip() for it in items]


def _items_covered(tokenizer, texts: Sequence[str], tokens: int) -> int:
    """How many of `texts` the first `tokens` tokens of the packed stream reach into (for the record)."""
    n = used = 0
    for t in texts:
        if used >= tokens:
            break
        used += len(tokenizer(t + "\n\n", add_special_tokens=False)["input_ids"])
        n += 1
    return n


def text_windows(tokenizer, texts: Sequence[str], window: int = NLL_WINDOW, windows: int = NLL_WINDOWS):
    """The texts joined into one stream and cut into up to `windows` windows of `window` tokens, each scored on
    every token after its first. Packing gives short items (a CommonsenseQA question) the context of the items
    before them, as a document would; BOS by acf's rule (`encode_prompt`) starts every window."""
    stream = list(tokenizer("\n\n".join(t for t in texts if t), add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    out = []
    for w in range(windows):
        ids = bos + stream[w * window:(w + 1) * window]
        if len(ids) < 2 + len(bos):
            break
        out.append(Scored(id=f"window-{w}", prompt=tuple(ids[:1]), target=tuple(ids[1:])))
    return out


def greedy_continuation(model, tokenizer, prompt: str, new_tokens: int, device: str) -> list[int]:
    """Greedy new token ids after `prompt` (BOS by acf's one rule), stopping at EOS."""
    import torch

    enc = tokenizer(prompt_text(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
    enc = {k: v.to(device) for k, v in enc.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=pad)
    ids = out[0, enc["input_ids"].shape[1]:].tolist()
    eos: set[int] = set()
    for x in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(x, int):
            eos.add(x)
        elif isinstance(x, (list, tuple)):
            eos.update(x)
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


# --- the check -----------------------------------------------------------------------------------------------------

def check_baseline(model, tokenizer, task, items: Sequence[Any], device: str = "cpu", *, prompt: str = DEFAULT_PROMPT,
                   new_tokens: int = DEFAULT_NEW_TOKENS, batch_size: Optional[int] = 8,
                   model_name: str = "") -> SanityReport:
    """Measure (a) NLL on the task's text, (b) a greedy continuation's repetition, (c) characters per token, and
    list every value outside its plausible range in `problems`. `items`: a few task items (8-16 suffice).

    The model is used as it is (already on `device`, in eval mode); nothing is printed or raised for a problem."""
    from acf.evaluation.fidelity import teacher_forced

    t0 = time.perf_counter()
    rep = SanityReport(model=model_name, device=str(device), prompt=prompt)
    problems: list[str] = []
    name = getattr(task, "name", "") or "the task"
    texts = _task_texts(items)

    # (a) NLL on the task's own text, packed into windows
    seqs = text_windows(tokenizer, texts)
    if seqs:
        m = teacher_forced(model, tokenizer, seqs, ["answer_nll"], batch_size=batch_size)["answer_nll"]
        nll = float(m.value) if m.value is not None else float("inf")
        rep.text_nll = round(nll, 4) if math.isfinite(nll) else None
        rep.nll_tokens = sum(len(s.target) for s in seqs)
        rep.nll_items = _items_covered(tokenizer, texts, rep.nll_tokens + len(seqs))
        if not math.isfinite(nll) or nll > MAX_NLL:
            shown = "not finite" if not math.isfinite(nll) else f"{nll:.2f} nats/token"
            problems.append(
                f"the baseline's NLL on {name}'s text is {shown} ({rep.nll_tokens} tokens); a working LM gives at "
                f"most {MAX_NLL:g} (SmolLM2-135M: 1.3-3.7), one that guesses at random ~ln(vocab) = "
                f"{math.log(max(len(tokenizer), 2)):.1f}. The weights may not match the config, or the tokenizer may "
                f"belong to another model; {SKIP_HINT}")

    # (b) greedy continuation of a fixed prompt
    ids = greedy_continuation(model, tokenizer, prompt, new_tokens, str(device))
    rep.continuation = tokenizer.decode(ids, skip_special_tokens=False)
    rep.continuation_tokens = len(ids)
    if len(ids) >= MIN_JUDGED_TOKENS:
        share, unit = repetition(ids)
        rep.repeat_share = round(share, 4)
        rep.repeat_unit = tokenizer.decode(list(unit), skip_special_tokens=False)
        if share > MAX_REPEAT_SHARE:
            problems.append(
                f"the baseline's greedy continuation of {prompt!r} is degenerate: {rep.repeat_unit!r} repeated makes "
                f"up {share:.0%} of its {len(ids)} tokens ({rep.continuation[:80]!r}); a working LM stays under "
                f"{MAX_REPEAT_SHARE:.0%} (a 1-3 token loop means broken weights or a mismatched tokenizer); "
                f"{SKIP_HINT}")

    # (c) tokenizer granularity on the task's text
    rep.chars_per_token = chars_per_token(tokenizer, texts)
    if rep.chars_per_token is not None:
        rep.chars_per_token = round(rep.chars_per_token, 3)
        if rep.chars_per_token < MIN_CHARS_PER_TOKEN:
            problems.append(
                f"the tokenizer splits {name}'s text into {rep.chars_per_token:.2f} characters per token; "
                f"BPE/SentencePiece tokenizers give ~3-4 on English and at least {MIN_CHARS_PER_TOKEN:g} even on "
                f"digit-heavy text, ~1 means single characters or bytes (a missing merges/vocab file or the wrong "
                f"tokenizer); {SKIP_HINT}")

    rep.problems = problems
    rep.seconds = round(time.perf_counter() - t0, 3)
    return rep


def format_report(report: SanityReport) -> str:
    """A few lines for the terminal: each measurement with its range, then the problems (or 'ok')."""
    th = report.thresholds
    lines = [f"baseline sanity check{f' of {report.model}' if report.model else ''} "
             f"({report.seconds:.1f}s, {report.device}): {'ok' if report.ok else 'FAILED'}"]
    nll = "-" if report.text_nll is None else f"{report.text_nll:.3f}"
    lines.append(f"  text NLL         {nll} nats/token over {report.nll_tokens} tokens of {report.nll_items} items "
                 f"(plausible: <= {th['max_nll']:g})")
    if report.repeat_share is None:
        lines.append(f"  continuation     {report.continuation!r} ({report.continuation_tokens} tokens: too short "
                     f"to judge)")
    else:
        lines.append(f"  continuation     {report.continuation!r}")
        lines.append(f"  repetition       {report.repeat_share:.0%} by {report.repeat_unit!r} "
                     f"(plausible: <= {th['max_repeat_share']:.0%})")
    cpt = "-" if report.chars_per_token is None else f"{report.chars_per_token:.2f}"
    lines.append(f"  chars per token  {cpt} (plausible: >= {th['min_chars_per_token']:g})")
    for p in report.problems:
        lines.append(f"  problem: {p}")
    return "\n".join(lines)


# --- recording and telling -----------------------------------------------------------------------------------------

def save_report(report: SanityReport, path: Path) -> None:
    """Written atomically: a resumed run trusts what it finds here instead of measuring again."""
    write_text(Path(path), report.model_dump_json(indent=2) + "\n")


def load_report(path: Path) -> Optional[SanityReport]:
    """The recorded check, or None when there is none. A file that does not parse raises AcfError naming it (the
    caller decides whether to measure again); it is never read as a pass."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return SanityReport.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AcfError(f"{path}: unreadable sanity check record ({type(e).__name__})") from None


def summary(report: SanityReport) -> str:
    """One line: each measured value against its plausible range, and the verdict."""
    th = report.thresholds
    parts = []
    if report.text_nll is not None:
        parts.append(f"text NLL {report.text_nll:.2f} (<= {th['max_nll']:g})")
    if report.repeat_share is not None:
        parts.append(f"repetition {report.repeat_share:.0%} (<= {th['max_repeat_share']:.0%})")
    if report.chars_per_token is not None:
        parts.append(f"{report.chars_per_token:.2f} chars/token (>= {th['min_chars_per_token']:g})")
    return f"sanity check {'ok' if report.ok else 'FAILED'}: " + ", ".join(parts)


def _without_hint(problem: str) -> str:
    return problem[:-len("; " + SKIP_HINT)] if problem.endswith("; " + SKIP_HINT) else problem


def failure_message(report: SanityReport, how_to_skip: str) -> str:
    """The one-line stop message: every problem (what looks wrong, the value, the range), where the values are
    recorded is up to the caller, and `how_to_skip` (the exact command line that goes on anyway)."""
    return ("the baseline looks broken, so the search was not started: " + ". Also, ".join(
        _without_hint(p) for p in report.problems) + f". If this model is what you mean to compress: {how_to_skip}")


def markdown(report: Optional[SanityReport], skipped: bool) -> list[str]:
    """The report.md section: what was measured, the plausible ranges, the verdict (and an override, if any)."""
    md = ["## Baseline sanity check", ""]
    if report is None:
        return md + ["Not run (`--skip-sanity`)." if skipped else "Not recorded (a run started before acf measured "
                     "it).", ""]
    th = report.thresholds
    judged = report.repeat_share is not None
    rows = [["NLL on the task's text (nats/token)", "-" if report.text_nll is None else f"{report.text_nll:.3f}",
             f"<= {th['max_nll']:g}", f"{report.nll_tokens} tokens of {report.nll_items} items"],
            ["repetition in a greedy continuation", f"{report.repeat_share:.0%}" if judged else "-",
             f"<= {th['max_repeat_share']:.0%}", f"{report.continuation_tokens} tokens after {report.prompt!r}: "
             f"{report.continuation[:60]!r}" + ("" if judged else " (too short to judge)")],
            ["characters per token", "-" if report.chars_per_token is None else f"{report.chars_per_token:.2f}",
             f">= {th['min_chars_per_token']:g}", "task text without special tokens"]]
    md += ["| measure | value | plausible | on |", "|---|---|---|---|"]
    md += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", "\\n") for c in r) + " |" for r in rows]
    verdict = "ok" if report.ok else ("FAILED, overridden with `--skip-sanity`" if skipped else "FAILED")
    md += ["", f"Verdict: **{verdict}** ({report.seconds:.1f} s on {report.device}).", ""]
    md += [f"- {p}" for p in report.problems] + ([""] if report.problems else [])
    return md
