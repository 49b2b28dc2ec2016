"""Optional LLM planner: a chat model proposes some episodes' strategies, with a rationale.

Why it is shaped this way:
- acf must work fully offline, so the planner is optional. Remote providers come through langchain's
  `init_chat_model` (only when `langchain` and the provider package are installed); `hf:<alias or dir>` is a
  local planner built on transformers through `langchain-huggingface`, which needs no network.
- A planner's output is untrusted text. Every proposal is validated exactly like a user's strategy and must lie
  inside the run's search space; anything else (bad JSON, unknown method, invalid group size, prose, timeout,
  exception) is rejected with its reason, written to `run_dir/planner_log.jsonl`, and Optuna proposes that
  episode instead. Three rejections in a row, or `max_calls` turns, switch the planner off.
- Every chat-model call is bounded by `--planner-timeout` seconds of wall clock (the call runs in a worker thread
  that is abandoned when the time is up) and retried `--planner-retries` times, so a hung provider or local model
  cannot stall the run.
- API keys are read by the provider packages from the environment only. The planner object lives in
  `RunContext`, never in the LangGraph state, and every text acf writes from it (rationale, rejection reasons,
  raw output) is scrubbed of secret-looking environment values first.
- A valid proposal that maps onto the SearchSpace parameters becomes an Optuna trial (same params as the sampler
  would use), so the sampler learns from the planner's results; one that does not map runs without a trial.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from pydantic import BaseModel, Field, ValidationError

from .errors import AcfError, StrategyError
from .methods.registry import SLOTS, get as get_method
from .search import SearchSpace, trial_for
from .state import episodes_recorded
from .strategy import METHODS, Step, Strategy, method_table, validate_strategy

log = logging.getLogger(__name__)

LOG_NAME = "planner_log.jsonl"
MAX_REJECTIONS_IN_A_ROW = 3
MAX_TOOL_ROUNDS = 2
DEFAULT_TIMEOUT_S = 120.0   # --planner-timeout: wall-clock seconds one chat-model call may take
DEFAULT_RETRIES = 1         # --planner-retries: extra attempts after a failed or timed-out call
READ_ONLY_TOOLS = ("validate_strategy", "estimate_cost")

# provider (as init_chat_model names it) -> pip package that implements it
PROVIDER_PACKAGES = {
    "openai": "langchain-openai", "azure_openai": "langchain-openai", "anthropic": "langchain-anthropic",
    "google_genai": "langchain-google-genai", "google_vertexai": "langchain-google-vertexai",
    "bedrock": "langchain-aws", "bedrock_converse": "langchain-aws", "ollama": "langchain-ollama",
    "mistralai": "langchain-mistralai", "groq": "langchain-groq", "fireworks": "langchain-fireworks",
    "together": "langchain-together", "deepseek": "langchain-deepseek", "xai": "langchain-xai",
    "huggingface": "langchain-huggingface", "cohere": "langchain-cohere", "nvidia": "langchain-nvidia-ai-endpoints",
    "perplexity": "langchain-perplexity", "ibm": "langchain-ibm",
}


# ---- the structured answer ------------------------------------------------------------------------------------

class ProposedStep(BaseModel):
    method: str = Field(description="one of the allowed methods")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters; omitted ones take defaults")


class ProposedStrategy(BaseModel):
    steps: list[ProposedStep] = Field(description="ordered steps: prune -> distill/lora -> quantize")


class Proposal(BaseModel):
    """What the planner must answer: a strategy, why, and which objective it targets."""

    strategy: ProposedStrategy
    rationale: str = Field(description="why this strategy, given the history and the frontier (1-3 sentences)")
    objective: str = Field("", description="the objective or trade-off this proposal aims at")


class Rejected(Exception):
    """A planner turn that produced no usable proposal; `kind` is a short machine-readable class."""

    def __init__(self, kind: str, reason: str, raw: str = ""):
        self.kind, self.reason, self.raw = kind, reason, raw
        super().__init__(f"{kind}: {reason}")


# ---- secrets ----------------------------------------------------------------------------------------------------

_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.I)
_KEY_SHAPES = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6,}|hf_[A-Za-z0-9]{10,}|AIza[0-9A-Za-z_\-]{20,}|gsk_[A-Za-z0-9]{10,}"
                         r"|xai-[A-Za-z0-9]{10,}|AKIA[0-9A-Z]{12,})")


def scrub(text: Any) -> str:
    """Remove secret-looking environment values and common API-key shapes from text acf is about to write.

    Provider errors sometimes echo (part of) the key, and a model can repeat anything in its context; nothing
    that reaches frontier.json, the checkpoint or the planner log may carry one.
    """
    s = text if isinstance(text, str) else str(text)
    for name, val in os.environ.items():
        if val and len(val) >= 8 and _SECRET_NAME.search(name) and val in s:
            s = s.replace(val, "***")
    return _KEY_SHAPES.sub("***", s)


# ---- mapping strategies onto the Optuna space --------------------------------------------------------------------

def params_for(space: SearchSpace, strategy: Strategy) -> Optional[dict[str, Any]]:
    """The SearchSpace parameters whose `suggest` yields exactly `strategy` (validated), or None if none do.

    Each step's part comes from its method's registry fragment (`SearchFragment.trial_params`); the check is by
    construction: the params are replayed through `space.suggest(FixedTrial(params))` and the result must equal
    the strategy after default-filling, so Optuna is never told a result for a strategy other than the one that ran.
    """
    slots: dict[str, Step] = {}
    for st in strategy.steps:   # at most one step per slot, in the space's order prune -> recover -> quant
        spec = get_method(st.method)
        if spec is None or spec.search is None or spec.slot in slots or any(
                SLOTS.index(s) > SLOTS.index(spec.slot) for s in slots):
            return None
        slots[spec.slot] = st
    prune, rec, q = slots.get("prune"), slots.get("recover"), slots.get("quant")
    if rec is not None and prune is None:
        return None
    p: dict[str, Any] = {"prune": prune.method if prune is not None else "none"}
    if prune is not None:
        if prune.method not in space.prune_methods:
            return None
        p["recover"] = rec.method if rec is not None else "none"
        if rec is not None and rec.method not in space.recover_methods:
            return None
    qname = q.method if q is not None else "none"
    if qname not in space.quant_methods or (prune is None and qname == "none"):
        return None
    p["quant" if prune is not None else "quant_only"] = qname
    for st in (prune, rec, q):
        if st is not None:
            part = get_method(st.method).search.trial_params(st.params, space)  # type: ignore[union-attr]
            if part is None:
                return None
            p.update(part)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # FixedTrial only warns about a value outside the choices
            replay = space.suggest(optuna.trial.FixedTrial(p))
        replay = validate_strategy(replay, space.spec, space.device)
        want = validate_strategy(strategy, space.spec, space.device)
    except (ValueError, TypeError, StrategyError, UserWarning):
        return None
    return p if replay.key() == want.key() else None


# ---- the planner ------------------------------------------------------------------------------------------------

class Planner:
    """Proposes strategies with an LLM for a deterministic share of episodes; Optuna covers the rest.

    `Planner(chat_model, name=...)` takes any langchain-core chat model (tests pass fake chat models);
    `Planner.from_spec("provider:model")` builds one from a spec string.
    """

    def __init__(self, chat_model, name: str = "custom", share: float = 0.5, max_calls: int = 50,
                 timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES, tools: Optional[bool] = None,
                 structured: Optional[bool] = None, max_history: int = 16):
        check_settings(share, max_calls, timeout, retries)
        self.model = chat_model
        self.name = name
        self.share = float(share)
        self.max_calls = int(max_calls)
        self.timeout = float(timeout)
        self.retries = int(retries)
        native = _implements_tools(chat_model)
        self.use_tools = native if tools is None else (tools and native)
        self.use_structured = native if structured is None else (structured and native)
        self.max_history = max_history
        self.calls = 0
        self.rejections_in_a_row = 0
        self.rejections: list[dict] = []
        self.accepted: list[dict] = []
        self.off_reason: Optional[str] = None
        self._warned = False
        self._restored_from: Optional[Path] = None

    def __repr__(self) -> str:   # never the chat model's repr: a client object can hold a key
        return f"Planner(name={self.name!r}, share={self.share}, max_calls={self.max_calls}, calls={self.calls})"

    @property
    def label(self) -> str:
        return f"planner:{self.name}"

    # ---- construction from a spec string ------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: str, share: float = 0.5, max_calls: int = 50, timeout: float = DEFAULT_TIMEOUT_S,
                  retries: int = DEFAULT_RETRIES) -> "Planner":
        """`provider:model` through langchain's init_chat_model, or `hf:<alias or dir>` for a local model.

        A provider that takes `timeout`/`max_retries` gets them too; acf's own wall-clock bound (`_invoke`) applies
        to every call either way, since a provider's timeout is often per HTTP request and a local model has none.
        """
        check_settings(share, max_calls, timeout, retries)   # before loading a model or reaching a provider
        if not spec or ":" not in spec or not spec.split(":", 1)[0] or not spec.split(":", 1)[1]:
            raise AcfError(f"--planner {spec!r}: expected provider:model (e.g. openai:gpt-4o-mini, "
                           f"anthropic:claude-sonnet-4-5, ollama:llama3.1, or hf:smollm2-135m for a local model)")
        provider, model = spec.split(":", 1)
        if provider == "hf":
            chat = _local_hf_chat(model, timeout)
            # a transformers pipeline cannot emit tool calls: plain text answers, parsed as JSON
            return cls(chat, name=spec, share=share, max_calls=max_calls, timeout=timeout, retries=retries,
                       tools=False, structured=False)
        package = PROVIDER_PACKAGES.get(provider, f"langchain-{provider.replace('_', '-')}")
        missing = [p for p, mod in (("langchain", "langchain"), (package, package.replace("-", "_")))
                   if importlib.util.find_spec(mod) is None]
        if missing:
            raise AcfError(f"--planner {spec}: needs {' and '.join(missing)}; install with "
                           f"`pip install {' '.join(['langchain', package])}` (or `pip install 'acf[planner]'`), "
                           f"or drop --planner to let Optuna propose offline")
        from langchain.chat_models import init_chat_model

        try:
            try:
                chat = init_chat_model(model, model_provider=provider, timeout=timeout, max_retries=retries)
            except (TypeError, ValueError):   # a provider without these settings: acf's own timeout still applies
                chat = init_chat_model(model, model_provider=provider)
        except Exception as e:   # a missing key or an unknown model: one clear line, scrubbed
            raise AcfError(f"--planner {spec}: cannot build the chat model ({type(e).__name__}: "
                           f"{scrub(e)[:300]}); API keys are read from the provider's environment variable") from None
        return cls(chat, name=spec, share=share, max_calls=max_calls, timeout=timeout, retries=retries)

    # ---- when ---------------------------------------------------------------------------------------------------
    def wants_turn(self, episode: int, ctx=None) -> bool:
        """Deterministic mix: episode k is the planner's when floor(k*share) > floor((k-1)*share).

        share 0.5 gives episodes 2, 4, 6...; 1.0 every episode. Off after max_calls turns or three rejections in
        a row. With `ctx`, the counters are first restored from the run's planner log (so --resume keeps them).
        """
        if ctx is not None:
            self._restore(ctx)
        if self.off_reason is not None:
            self._warn_off(ctx)
            return False
        if self.calls >= self.max_calls:
            self.off_reason = f"planner off: {self.max_calls} calls made (--planner-max-calls)"
            self._warn_off(ctx)
            return False
        if self.share <= 0:
            return False
        return math.floor(episode * self.share + 1e-9) > math.floor((episode - 1) * self.share + 1e-9)

    def _warn_off(self, ctx) -> None:
        if not self._warned and ctx is not None:
            ctx.say(f"  [yellow]{self.off_reason}; Optuna proposes from now on[/]")
            self._warned = True

    def _restore(self, ctx) -> None:
        path = Path(ctx.dir) / LOG_NAME
        if self._restored_from == path:
            return
        self._restored_from = path
        for rec in _read_log(path):
            self.calls += 1
            if rec.get("status") == "accepted":
                self.rejections_in_a_row = 0
            else:
                self.rejections_in_a_row += 1
        if self.rejections_in_a_row >= MAX_REJECTIONS_IN_A_ROW:
            self.off_reason = f"planner off after {MAX_REJECTIONS_IN_A_ROW} rejected proposals in a row"

    # ---- what ---------------------------------------------------------------------------------------------------
    def propose(self, ctx) -> Optional[dict]:
        """One planner turn: ask, validate, register with Optuna. None (rejection logged) lets Optuna propose."""
        self._restore(ctx)
        episode = episodes_recorded(ctx.ff) + 1
        self.calls += 1
        t0 = time.time()
        tool_calls: list[dict] = []
        raw = ""
        try:
            messages = build_messages(ctx, self.max_history, self.use_tools)
            prop, raw = self._ask(ctx, messages, tool_calls)
            strategy = self._check(ctx, prop, raw)
        except Rejected as r:
            return self._reject(ctx, episode, r.kind, r.reason, r.raw or raw, tool_calls, time.time() - t0)
        except Exception as e:   # a planner bug or a broken card must not end the run: Optuna takes the episode
            log.debug("planner turn failed", exc_info=True)
            return self._reject(ctx, episode, "error", f"{type(e).__name__}: {str(e)[:500]}", raw, tool_calls,
                                time.time() - t0)
        trial, params = self._register(ctx, strategy)
        rationale = scrub(prop.rationale.strip())[:2000]
        self.rejections_in_a_row = 0
        rec = {"episode": episode, "status": "accepted", "planner": self.name, "trial": trial,
               "strategy": strategy.model_dump(), "optuna_params": params, "rationale": rationale,
               "objective": scrub(prop.objective)[:200], "tool_calls": tool_calls,
               "seconds": round(time.time() - t0, 2), "time": _now()}
        self.accepted.append(rec)
        append_log(ctx.dir, rec)
        ctx.say(f"  [dim]planner rationale: {rationale[:300]}[/]")
        return {"trial": trial, "strategy": strategy.model_dump(), "proposed_by": self.label, "rationale": rationale}

    def _reject(self, ctx, episode: int, kind: str, reason: str, raw: str, tool_calls: list, secs: float) -> None:
        self.rejections_in_a_row += 1
        rec = {"episode": episode, "status": "rejected", "planner": self.name, "kind": kind,
               "reason": scrub(reason)[:2000], "raw": scrub(raw)[:4000], "tool_calls": tool_calls,
               "seconds": round(secs, 2), "time": _now()}
        self.rejections.append(rec)
        append_log(ctx.dir, rec)
        ctx.say(f"  [yellow]planner proposal rejected[/] ({kind}): {rec['reason'][:300]} · Optuna proposes instead")
        if self.rejections_in_a_row >= MAX_REJECTIONS_IN_A_ROW:
            self.off_reason = f"planner off after {MAX_REJECTIONS_IN_A_ROW} rejected proposals in a row"
            self._warn_off(ctx)
        return None

    # ---- asking the model -----------------------------------------------------------------------------------
    def _invoke(self, runnable, messages):
        """Invoke with the planner's wall-clock timeout; exceptions and timeouts are retried `retries` times.

        The call runs in a worker thread and is abandoned after `timeout` seconds, so a hung provider or local model
        costs at most (retries + 1) * timeout per call, whatever the chat model does with its own timeout settings.
        """
        last: Optional[Rejected] = None
        attempts = self.retries + 1
        for _ in range(attempts):
            try:
                return _call_with_timeout(lambda: runnable.invoke(messages), self.timeout)
            except TimeoutError:
                last = Rejected("timeout", f"timed out after {self.timeout:g} s"
                                + (f" (each of {attempts} attempts)" if attempts > 1 else ""))
            except Exception as e:   # provider/network/parsing errors are the planner's failure, not the run's
                last = Rejected("error", f"{type(e).__name__}: {str(e)[:500]}")
        assert last is not None
        raise last

    def _ask(self, ctx, messages: list, tool_calls: list[dict]) -> tuple[Proposal, str]:
        from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

        msgs = list(messages)
        if self.use_tools:
            tools = planner_tools(ctx)
            by_name = {t.name: t for t in tools}
            bound = self.model.bind_tools(tools)
            for _ in range(MAX_TOOL_ROUNDS):
                ai = self._invoke(bound, msgs)
                calls = getattr(ai, "tool_calls", None) or []
                if not calls:
                    text = _text(ai)
                    return parse_proposal_text(text), text
                msgs.append(ai)
                for call in calls:
                    tool = by_name.get(call.get("name"))
                    if tool is None:   # the planner can only read: anything else is refused, never run
                        out: Any = {"error": f"unknown tool {call.get('name')!r}; only {', '.join(READ_ONLY_TOOLS)}"}
                    else:
                        try:
                            out = tool.invoke(call.get("args") or {})
                        except Exception as e:
                            out = {"error": f"{type(e).__name__}: {e}"}
                    tool_calls.append({"name": str(call.get("name")), "args": scrub(json.dumps(call.get("args"),
                                                                                             default=str))[:1000],
                                       "ok": isinstance(out, dict) and out.get("ok", "error" not in out)})
                    msgs.append(ToolMessage(content=json.dumps(out, default=str)[:4000],
                                            tool_call_id=call.get("id") or call.get("name") or "call"))
            msgs.append(HumanMessage(content="Tool rounds are over. Now answer with the final proposal JSON only."))
        if self.use_structured:
            try:
                runnable = self.model.with_structured_output(Proposal, include_raw=True)
            except (NotImplementedError, ValueError, TypeError):
                self.use_structured = False
            else:
                out = self._invoke(runnable, msgs)
                raw_msg = out.get("raw") if isinstance(out, dict) else None
                raw = _text(raw_msg) if raw_msg is not None else ""
                parsed = out.get("parsed") if isinstance(out, dict) else out
                if isinstance(parsed, Proposal):
                    return parsed, raw or parsed.model_dump_json()
                if isinstance(parsed, dict):
                    return _proposal_from_obj(parsed, raw), raw
                return parse_proposal_text(raw), raw   # the model answered in text rather than through the schema
        ai = self._invoke(self.model, msgs)
        if not isinstance(ai, AIMessage) and not hasattr(ai, "content"):
            raise Rejected("malformed", f"the chat model returned {type(ai).__name__}, not a message")
        text = _text(ai)
        return parse_proposal_text(text), text

    # ---- checking and registering -------------------------------------------------------------------------------
    def _check(self, ctx, prop: Proposal, raw: str) -> Strategy:
        """Validate like a user's strategy, then require it inside the run's space and not a repeat."""
        if not prop.rationale or not prop.rationale.strip():
            raise Rejected("malformed", "the proposal has no rationale", raw)
        if prop.rationale.strip().strip("<>.").lower() in PLACEHOLDERS:
            raise Rejected("malformed", "the rationale is the prompt's placeholder: the example was copied, "
                           "not reasoned", raw)
        try:
            strategy = validate_strategy(with_run_defaults(prop.strategy.model_dump(), ctx.cfg), ctx.spec,
                                         ctx.cfg.device)
        except StrategyError as e:
            raise Rejected("invalid strategy", str(e), raw) from None
        if not strategy.steps:
            raise Rejected("invalid strategy", "an empty strategy is the baseline, already evaluated", raw)
        outside = []
        for s in strategy.steps:
            kind = METHODS[s.method].kind
            if kind == "quantize" and ctx.cfg.quant_methods and s.method not in ctx.cfg.quant_methods:
                outside.append(f"{s.method} is not among the run's quantization methods {ctx.cfg.quant_methods}")
            if kind == "prune" and ctx.cfg.prune_methods and s.method not in ctx.cfg.prune_methods:
                outside.append(f"{s.method} is not among the run's pruning methods {ctx.cfg.prune_methods}")
        if outside:
            raise Rejected("outside the space", "; ".join(outside), raw)
        for c in ctx.ff.candidates:
            if c.status in ("ok", "pruned", "failed") and c.strategy.key() == strategy.key():
                raise Rejected("duplicate", f"repeats {c.id} ({c.description}), already evaluated", raw)
        return strategy

    def _register(self, ctx, strategy: Strategy) -> tuple[Optional[int], Optional[dict]]:
        """Add the proposal to the study as a running trial with the sampler's own params (when it maps)."""
        params = params_for(ctx.space, strategy)
        if params is None:
            return None, None
        import uuid

        study = ctx.study
        token = uuid.uuid4().hex   # finds our trial even when other workers share the study
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING,
                                                  system_attrs={"fixed_params": params},
                                                  user_attrs={"proposed_by": self.label, "planner_token": token}))
        number = next(t.number for t in reversed(study.get_trials(deepcopy=False))
                      if t.user_attrs.get("planner_token") == token)
        trial = trial_for(study, number)
        replay = validate_strategy(ctx.space.suggest(trial), ctx.spec, ctx.cfg.device)   # records distributions
        if replay.key() != strategy.key():   # cannot happen when params_for is right; never tell a wrong result
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return None, None
        return number, params


def check_settings(share: float, max_calls: int, timeout: float, retries: int) -> None:
    """The planner settings' ranges, checked when a run is configured and when a Planner is built."""
    if not 0 <= share <= 1:
        raise AcfError(f"--planner-share must lie in [0, 1] (got {share})")
    if max_calls < 0:
        raise AcfError(f"--planner-max-calls must be >= 0 (got {max_calls})")
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise AcfError(f"--planner-timeout must be a positive number of seconds (got {timeout})")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise AcfError(f"--planner-retries must be a whole number >= 0 (got {retries})")


def with_run_defaults(strategy: dict, cfg) -> dict:
    """Calibration settings the planner left out take the run's --calib-samples/--seq-len, not the method defaults.

    The run's calibration budget is the user's choice (Optuna's proposals use it too); a planner that omits it
    should not silently quadruple an episode's cost, and matching settings let the proposal map onto Optuna.
    """
    steps = []
    for st in strategy.get("steps") or []:
        st = dict(st)
        info = METHODS.get(st.get("method"))
        params = dict(st.get("params") or {})
        if info is not None and info.kind != "lora" and info.kind != "distill":
            fields = info.params.model_fields
            for k, v in (("calib_samples", cfg.calib_samples), ("seq_len", cfg.seq_len)):
                if k in fields and k not in params:
                    params[k] = v
        st["params"] = params
        steps.append(st)
    return {**strategy, "steps": steps}


# ---- prompt -------------------------------------------------------------------------------------------------------

EXAMPLE_RATIONALE = "<why this strategy, given the history>"
# rationales copied from the prompt's format lines: a copied example is not a reasoned proposal
PLACEHOLDERS = {"why this strategy, given the history", "why, in 1-3 sentences", "why this strategy"}

SYSTEM = """You are the planner of acf, a tool that searches compressed versions of a language model.
Each episode you propose ONE compression strategy. It is validated, run, and measured; the results come back to you
in the history. Aim for strategies that extend the Pareto frontier of the objectives, or fill its gaps.

Rules:
- A strategy is an ordered list of steps {"method": ..., "params": {...}}; omitted params take their defaults.
- Order: prune -> (distill or lora) -> quantize. At most one quantization step.
- Omitted calibration settings take the run's values (calib_samples and seq_len below).
- Use only the allowed methods listed below; group_size must be one of the valid group sizes (or null for
  per-channel).
- Do not repeat a strategy that is already in the history.

Answer with ONE JSON object and nothing else, in this form:
{"strategy": {"steps": [{"method": "...", "params": {...}}]}, "rationale": "why, in 1-3 sentences",
 "objective": "which objective or trade-off it targets"}"""


def build_messages(ctx, max_history: int = 16, tools: bool = False) -> list:
    """System rules + one human message with the spec, the space, the history, the frontier and the reward."""
    from langchain_core.messages import HumanMessage, SystemMessage

    system = SYSTEM
    if tools:
        system += ("\n\nYou may call validate_strategy and estimate_cost (read-only) at most twice before answering; "
                   "they take the strategy as a JSON string.")
    return [SystemMessage(content=system), HumanMessage(content=build_prompt(ctx, max_history))]


def build_prompt(ctx, max_history: int = 16) -> str:
    cfg, spec, ff = ctx.cfg, ctx.spec, ctx.ff
    lines = ["## Model",
             f"{spec.family} {spec.architecture}: {spec.params / 1e6:.1f}M parameters, {spec.num_layers} layers, hidden "
             f"{spec.hidden_size}, intermediate {spec.intermediate_size}, dtype {spec.dtype}. "
             f"Valid quantization group sizes: {spec.valid_group_sizes} (others are invalid for this model). "
             f"Device: {cfg.device}. Run calibration: calib_samples {cfg.calib_samples}, seq_len {cfg.seq_len}.",
             "", "## Allowed methods (parameter: default)"]
    allowed = _allowed_methods(ctx)
    hints = _card_hints()
    for row in method_table():
        if row["method"] not in allowed:
            continue
        info = METHODS[row["method"]]
        if info.needs_cuda and not cfg.device.startswith("cuda"):
            continue
        run_vals = {"calib_samples": cfg.calib_samples, "seq_len": cfg.seq_len} if info.kind in ("quantize", "prune") \
            else {}
        ps = ", ".join(f"{k}: {json.dumps(run_vals.get(k, v.get('default')))}" + (f" {v['enum']}" if v.get("enum")
                                                                                  else "")
                       for k, v in row["params"].items())
        line = f"- {row['method']} ({row['kind']}): {row['description']}. {ps}"
        if row["method"] in hints:
            h = dict(hints[row["method"]])
            if "group_size" in h:   # the cards' generic sizes may not divide this model's widths
                h["group_size"] = list(spec.valid_group_sizes) + [None]
            line += f". Useful ranges: {json.dumps(h, separators=(',', ':'))}"
        lines.append(line)
    notes = hints.get("__notes__")
    if notes:
        lines += ["Notes: " + " ".join(notes)]
    lines += ["", "## Objectives and reward",
              "objectives: " + ", ".join(f"{o} ({ff.run.directions.get(o, '?')})" for o in cfg.objectives)
              + f"; reward preset {cfg.preset}; min retention {cfg.min_retention}."]
    if ff.baseline is not None:
        lines.append("baseline: " + _objs(ff.baseline.objectives))
    lines += ["", f"## History (last {max_history} of {len(ff.candidates)} episodes)"]
    if not ff.candidates:
        lines.append("none yet")
    for c in ff.candidates[-max_history:]:
        s = f"- {c.id} [{c.status}] {json.dumps(_compact(c.strategy), separators=(',', ':'))}"
        if c.objectives:
            s += " -> " + _objs(c.objectives)
        if c.retention is not None:
            s += f", retention {c.retention:.3f}"
        if c.reason and c.status != "ok":
            s += f" ({c.reason[:120]})"
        lines.append(s)
    lines += ["", "## Current frontier: " + (", ".join(ff.frontier) or "empty")]
    if ff.recommended:
        lines.append(f"recommended under {ff.recommended.preset}: {ff.recommended.id}")
    lines += ["", "Example of the answer format only (replace the <placeholders>; choose your own strategy):", json.dumps(_example(ctx)), "",
              "Propose the next strategy now: one JSON object."]
    return "\n".join(lines)


def _allowed_methods(ctx) -> set[str]:
    out = set()
    for name, info in METHODS.items():
        if info.kind == "quantize" and ctx.cfg.quant_methods and name not in ctx.cfg.quant_methods:
            continue
        if info.kind == "prune" and ctx.cfg.prune_methods and name not in ctx.cfg.prune_methods:
            continue
        out.add(name)
    return out


def _card_hints() -> dict[str, Any]:
    """Per-method ranges and notes from the subagent cards (agents/*.md); missing cards only lose hints."""
    try:
        from .subagents import load_cards

        cards = load_cards()
    except AcfError:
        return {}
    out: dict[str, Any] = {}
    notes = []
    for c in cards.values():
        for m, r in (c.search_space.get("methods") or {}).items():
            out[m] = r
        if c.search_space.get("notes") and c.search_space.get("methods"):
            notes.append(str(c.search_space["notes"]))
    if notes:
        out["__notes__"] = notes
    return out


def _example(ctx) -> dict:
    space = ctx.space
    g = [int(x) for x in space.group_sizes if x != "channel"]
    q = next((m for m in ("gptq", "rtn", "awq") if m in space.quant_methods), None)
    if q:
        params = {"bits": 4, "group_size": g[-1] if g else None}
        step = {"method": q, "params": params}
    else:
        step = {"method": next((m for m in space.quant_methods if m != "none"), "bnb_int8"), "params": {}}
    return {"strategy": {"steps": [step]}, "rationale": EXAMPLE_RATIONALE, "objective": "<objective>"}


def _compact(strategy: Strategy) -> list[dict]:
    """Steps with default-valued params dropped, so the history stays short."""
    out = []
    for s in strategy.steps:
        d = METHODS[s.method].params().model_dump() if s.method in METHODS else {}
        out.append({"method": s.method, "params": {k: v for k, v in s.params.items() if d.get(k, object()) != v}})
    return out


def _objs(o: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in o.items())


# ---- parsing text -------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)


def parse_proposal_text(text: str) -> Proposal:
    """The first JSON object in `text` (code fences stripped) that is a Proposal; Rejected('malformed') otherwise."""
    if not text or not text.strip():
        raise Rejected("malformed", "empty answer", text or "")
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    dec = json.JSONDecoder()
    objs: list[Any] = []
    bad_json: Optional[ValueError] = None
    for chunk in candidates:
        first = True
        for i, ch in enumerate(chunk):
            if ch != "{":
                continue
            try:
                obj, _ = dec.raw_decode(chunk[i:])
            except ValueError as e:   # an outermost object that does not parse is what the model meant
                if first and bad_json is None:
                    bad_json = e
                first = False
                continue
            objs.append(obj)
            break   # the outermost object starting here; nested ones are part of it
    last: Optional[Rejected] = None
    for obj in objs:
        try:
            return _proposal_from_obj(obj, text)
        except Rejected as r:
            last = r
    if bad_json is not None:
        raise Rejected("malformed", f"bad JSON: {getattr(bad_json, 'msg', bad_json)}", text)
    if last is not None:
        raise last
    raise Rejected("malformed", "not a proposal: the answer contains no JSON object", text)


def _proposal_from_obj(obj: Any, raw: str) -> Proposal:
    if not isinstance(obj, dict) or "strategy" not in obj:
        keys = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise Rejected("malformed", f"not a proposal: expected keys strategy, rationale, objective (got {keys})", raw)
    st = obj["strategy"]
    if isinstance(st, list):   # a bare list of steps is an unambiguous strategy
        obj = {**obj, "strategy": {"steps": st}}
    try:
        return Proposal.model_validate(obj)
    except ValidationError as e:
        er = e.errors()[0]
        loc = ".".join(str(x) for x in er.get("loc", ()))
        raise Rejected("malformed", f"not a proposal: {loc}: {er.get('msg')}", raw) from None


def _text(msg) -> str:
    c = getattr(msg, "content", msg)
    if isinstance(c, list):   # content blocks
        return "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in c)
    return c if isinstance(c, str) else str(c)


# ---- tools ----------------------------------------------------------------------------------------------------------

class _StrategyOnly(BaseModel):
    strategy_json: str = Field(description='the strategy as JSON: {"steps": [{"method": ..., "params": {...}}]}')


def planner_tools(ctx) -> list:
    """The read-only subagent helpers, bound to this run's model and device; nothing else is exposed."""
    from langchain_core.tools import StructuredTool

    from .subagents import estimate_cost_tool, validate_strategy_tool

    model_dir = str(Path(ctx.spec.path))
    device = ctx.cfg.device

    def validate(strategy_json: str) -> dict:
        """Check a strategy without running it: the filled-in strategy or every problem found."""
        return validate_strategy_tool(strategy_json, model_dir, device)

    def estimate(strategy_json: str) -> dict:
        """A rough wall-time ESTIMATE per step (not a measurement)."""
        return estimate_cost_tool(strategy_json, model_dir, device, params_count=ctx.spec.params)

    return [StructuredTool.from_function(func=validate, name="validate_strategy", args_schema=_StrategyOnly,
                                         description=validate.__doc__),
            StructuredTool.from_function(func=estimate, name="estimate_cost", args_schema=_StrategyOnly,
                                         description=estimate.__doc__)]


# ---- plumbing -------------------------------------------------------------------------------------------------------

def _implements_tools(model) -> bool:
    try:
        from langchain_core.language_models import BaseChatModel
    except ImportError:
        return False
    return isinstance(model, BaseChatModel) and type(model).bind_tools is not BaseChatModel.bind_tools


def _call_with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """Run fn in a daemon thread; a call that outlives `timeout` is abandoned (it cannot be killed) and reported."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:   # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True, name="acf-planner-call")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"timed out after {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _local_hf_chat(model: str, timeout: float, max_new_tokens: int = 320):
    """A local chat model on transformers (offline): langchain-huggingface's ChatHuggingFace over a pipeline."""
    if importlib.util.find_spec("langchain_huggingface") is None:
        raise AcfError("--planner hf:...: needs langchain-huggingface; install with `pip install langchain-huggingface`"
                       " (or `pip install 'acf[planner]'`)")
    from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from .models import resolve_model

    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(str(path))
    if getattr(tok, "chat_template", None) is None:
        raise AcfError(f"--planner hf:{model}: {path} has no chat template; use an instruct/chat model")
    lm = AutoModelForCausalLM.from_pretrained(str(path))
    lm.eval()
    gc = lm.generation_config
    gc.max_new_tokens, gc.do_sample, gc.max_length = max_new_tokens, False, None
    gc.temperature = gc.top_p = gc.top_k = None
    if gc.pad_token_id is None:
        gc.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # return_full_text=False at construction: HuggingFacePipeline does not forward its own pipeline_kwargs per call,
    # and an answer that echoes the prompt would be parsed as the prompt's example
    pipe = pipeline("text-generation", model=lm, tokenizer=tok, device=-1, return_full_text=False)
    llm = HuggingFacePipeline(pipeline=pipe, model_id=str(path), pipeline_kwargs={"return_full_text": False})
    return ChatHuggingFace(llm=llm, model_id=str(path), tokenizer=tok)


def _now() -> str:
    from .state import now

    return now()


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue   # a damaged line costs that record only
    return out


_LOG_LOCK = threading.Lock()


def append_log(run_dir: str | Path, record: dict) -> None:
    """Append one JSON line to run_dir/planner_log.jsonl atomically (rewrite + rename: never half a line)."""
    from .atomic import write_text

    path = Path(run_dir) / LOG_NAME
    line = scrub(json.dumps(record, default=str))
    with _LOG_LOCK:
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        write_text(path, old + line + "\n")


def read_planner_log(run_dir: str | Path) -> list[dict]:
    """The planner's accepted and rejected proposals of a run, oldest first."""
    return _read_log(Path(run_dir) / LOG_NAME)
