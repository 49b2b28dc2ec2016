"""Foundations every layer uses and that use nothing of acf: typed errors, atomic writes, measurements with
provenance, objective names and directions, logging set-up."""
