"""Models: resolution (alias, folder, hub id; the embedded default model) and loading, the shape spec strategies
are validated against, the baseline sanity check, the facts the registry records of a model folder."""
