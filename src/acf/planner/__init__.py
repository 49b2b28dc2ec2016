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

The package: `core` (Planner, its settings), `prompt` (system rules, the run as a prompt, read-only tools),
`answer` (Proposal, Rejected, parsing text answers), `space` (params_for: a strategy onto the Optuna space),
`chat` (providers, the wall-clock bound, the local transformers planner), `log` (planner_log.jsonl, scrub).
Every public name stays importable from `acf.planner`.
"""

from __future__ import annotations

from acf.planner.answer import Proposal, ProposedStep, ProposedStrategy, Rejected, parse_proposal_text
from acf.planner.chat import PROVIDER_PACKAGES
from acf.planner.core import (DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, MAX_REJECTIONS_IN_A_ROW, MAX_TOOL_ROUNDS,
                              READ_ONLY_TOOLS, Planner, check_settings)
from acf.planner.log import LOG_NAME, append_log, read_planner_log, scrub
from acf.planner.prompt import EXAMPLE_RATIONALE, PLACEHOLDERS, SYSTEM, build_messages, build_prompt, planner_tools
from acf.planner.space import params_for, with_run_defaults

__all__ = [
    "Proposal", "ProposedStep", "ProposedStrategy", "Rejected", "parse_proposal_text", "PROVIDER_PACKAGES",
    "DEFAULT_RETRIES", "DEFAULT_TIMEOUT_S", "MAX_REJECTIONS_IN_A_ROW", "MAX_TOOL_ROUNDS", "READ_ONLY_TOOLS", "Planner",
    "check_settings", "LOG_NAME", "append_log", "read_planner_log", "scrub", "EXAMPLE_RATIONALE", "PLACEHOLDERS",
    "SYSTEM", "build_messages", "build_prompt", "planner_tools", "params_for", "with_run_defaults",
]
