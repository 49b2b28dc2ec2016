"""One run of the search: the LangGraph graph (`graph`, routing only) and its driver (`runner`), the one
episode engine (`episode`) both drivers call, each node's logic (`pipeline`, `baseline`, `run_eval`, `preflight`),
scoring (`records`) and the run's one store, the Optuna study (`run_store`), with the frontier schema (`state`)."""
