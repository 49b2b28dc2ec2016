"""Logging set-up shared by the `acf` commands and the distributed worker command: quiet libraries, one format."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # compressed_tensors: a "Could not match" WARNING per Linear when AutoRound applies a per-layer allocation
    # block by block (210 lines per episode on the GPU, 2026-12-08); the step log keeps them (acf.methods.runner)
    for noisy in ("transformers", "llmcompressor", "optuna", "httpx", "urllib3", "datasets", "bitsandbytes",
                  "compressed_tensors", "autoround",
                  "torch.fx._symbolic_trace"):   # the last: a deprecation notice from llm-compressor's tracing
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore")
        try:
            from transformers.utils import logging as tlog

            tlog.set_verbosity_error()
            tlog.disable_progress_bar()
        except Exception:
            pass
        # llm-compressor configures loguru when it is first imported (lazily, inside the first step), replacing
        # the sinks set below with an INFO console sink: per-module GPTQ metrics then flooded the terminal from
        # the second episode on. Its own variable sets that sink's level: ERROR, because its METRIC level (38)
        # ranks above WARNING. The step logs still get everything from INFO up.
        os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
        # auto-round sets its logger's level from this variable when it is imported (lazily, inside a step), which
        # would undo the ERROR set above; its INFO lines (per block) still reach the step log
        os.environ.setdefault("AR_LOG_LEVEL", "ERROR")
        try:
            from loguru import logger  # llmcompressor logs through loguru

            logger.remove()
            logger.add(sys.stderr, level="WARNING")
        except Exception:
            pass
