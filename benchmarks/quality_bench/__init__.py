"""The quality benchmark's parts; ``benchmarks/quality.py`` is the command (see its docstring)."""
