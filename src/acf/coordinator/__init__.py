"""One run of the search: the LangGraph graph (`graph`, routing only) and its single-process driver
(`single_process`); the run's own stages (`run_stages`: set-up, baseline and yardstick, final evaluation); the one
episode engine (`episode`) and the one trial lifecycle (`trial`: propose, record, close) both drivers call; what the
stages use (`baseline`, `yardstick`, `compression`, `run_eval`, `preflight`, `screening`), scoring (`records`) and
the run's one store, the Optuna study (`run_store`), with the frontier schema (`state`)."""
