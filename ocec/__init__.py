"""ocec: train and fine-tune tiny open/closed-eye classifiers."""

__version__ = "0.4.0"
