"""acf: the agentic compression framework."""

__version__ = "0.1.0"
