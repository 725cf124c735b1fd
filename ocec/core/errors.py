"""The exceptions the CLI turns into exit codes.

`UserError` means "the user gave us something wrong": one line on stderr and exit code 2.
`Interrupted` means a signal stopped a run after it saved a resumable checkpoint: exit 128 + signal.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake in flags, files or data that the user can fix; the message names the culprit."""


class PeerFailed(UserError):
    """Under torchrun: another process hit a UserError and said so; this one stops quietly with exit 2."""


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped a run; `checkpoint` is the resumable checkpoint it wrote."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by signal {signum}")
        self.signum, self.checkpoint = signum, checkpoint
