"""Benchmarks: scripts that print JSON and a markdown table (``python benchmarks/<name>.py --help``).

The measures they run live in :mod:`v2flow.eval`; the scripts are their command lines. A package so that a
script can use another one's helpers as ``benchmarks.<module>`` (``reliability.py`` runs ``memory.py``'s check).
"""
