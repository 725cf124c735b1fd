"""Foundations every layer uses: user errors, atomic file writes, the config dataclasses, metrics,
progress bars and log formatting, plots and the package version.

May import: nothing from ocec (only the standard library, numpy, torch, scikit-learn, tqdm and the optional
plotting extra).
"""
