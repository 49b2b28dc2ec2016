"""Models: resolution (alias, folder, hub id; the embedded default model) and loading, the shape spec strategies
are validated against, the tokenization rule, the GGUF file format, the facts the registry records of a model
folder."""
