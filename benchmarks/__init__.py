"""Benchmarks: scripts that print JSON and a markdown table (``python benchmarks/<name>.py --help``).

A package so that the tests and ``benchmarks/reliability.py`` import the shared checks and case spaces one way,
as ``benchmarks.<module>`` (pytest puts the repository root on ``sys.path``; see ``pyproject.toml``).
"""
