"""Chat-model plumbing: provider packages, tool support, a wall-clock bound on each call, the local transformers
planner."""

from __future__ import annotations

import importlib.util
import threading
from typing import Any, Callable

from acf.core.errors import AcfError

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

def implements_tools(model) -> bool:
    try:
        from langchain_core.language_models import BaseChatModel
    except ImportError:
        return False
    return isinstance(model, BaseChatModel) and type(model).bind_tools is not BaseChatModel.bind_tools


def call_with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
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


def local_hf_chat(model: str, timeout: float, max_new_tokens: int = 320):
    """A local chat model on transformers (offline): langchain-huggingface's ChatHuggingFace over a pipeline."""
    if importlib.util.find_spec("langchain_huggingface") is None:
        raise AcfError("--planner hf:...: needs langchain-huggingface; install with `pip install langchain-huggingface`"
                       " (or `pip install 'acf[planner]'`)")
    from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from acf.models.loading import resolve_model

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
