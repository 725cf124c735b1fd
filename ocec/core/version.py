"""The package version, kept below every layer so that checkpoints and run records can carry it."""

__version__ = "0.4.0"
