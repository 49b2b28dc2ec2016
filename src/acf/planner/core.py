"""The Planner: when it takes an episode, how it asks the chat model, checks the answer and registers it with Optuna."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import optuna

from acf.core.errors import AcfError, StrategyError
from acf.search.space import trial_for
from acf.coordinator.state import episodes_recorded, now
from acf.methods.strategy import METHODS, Strategy, validate_strategy
from acf.planner.answer import Proposal, Rejected, message_text, parse_proposal_text, proposal_from_obj
from acf.planner.chat import PROVIDER_PACKAGES, call_with_timeout, implements_tools, local_hf_chat
from acf.planner.log import LOG_NAME, append_log, read_log, scrub
from acf.planner.prompt import PLACEHOLDERS, build_messages, planner_tools
from acf.planner.space import params_for, with_run_defaults

log = logging.getLogger(__name__)

MAX_REJECTIONS_IN_A_ROW = 3
MAX_TOOL_ROUNDS = 2
DEFAULT_TIMEOUT_S = 120.0   # --planner-timeout: wall-clock seconds one chat-model call may take
DEFAULT_RETRIES = 1         # --planner-retries: extra attempts after a failed or timed-out call
READ_ONLY_TOOLS = ("validate_strategy", "estimate_cost")


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
        native = implements_tools(chat_model)
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
            chat = local_hf_chat(model, timeout)
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
        for rec in read_log(path):
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
               "seconds": round(time.time() - t0, 2), "time": now()}
        self.accepted.append(rec)
        append_log(ctx.dir, rec)
        ctx.say(f"  [dim]planner rationale: {rationale[:300]}[/]")
        return {"trial": trial, "strategy": strategy.model_dump(), "proposed_by": self.label, "rationale": rationale}

    def _reject(self, ctx, episode: int, kind: str, reason: str, raw: str, tool_calls: list, secs: float) -> None:
        self.rejections_in_a_row += 1
        rec = {"episode": episode, "status": "rejected", "planner": self.name, "kind": kind,
               "reason": scrub(reason)[:2000], "raw": scrub(raw)[:4000], "tool_calls": tool_calls,
               "seconds": round(secs, 2), "time": now()}
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
                return call_with_timeout(lambda: runnable.invoke(messages), self.timeout)
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
                    text = message_text(ai)
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
                raw = message_text(raw_msg) if raw_msg is not None else ""
                parsed = out.get("parsed") if isinstance(out, dict) else out
                if isinstance(parsed, Proposal):
                    return parsed, raw or parsed.model_dump_json()
                if isinstance(parsed, dict):
                    return proposal_from_obj(parsed, raw), raw
                return parse_proposal_text(raw), raw   # the model answered in text rather than through the schema
        ai = self._invoke(self.model, msgs)
        if not isinstance(ai, AIMessage) and not hasattr(ai, "content"):
            raise Rejected("malformed", f"the chat model returned {type(ai).__name__}, not a message")
        text = message_text(ai)
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
