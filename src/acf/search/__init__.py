"""The search: the Optuna space, samplers and seeds (`space`), and the pure multi-objective functions it ranks
by (`pareto`, `reward`)."""
