"""Errors a user can fix. The command line prints them as one line and exits with code 2."""


class UserError(Exception):
    """A bad recipe, input, model or data source; the message names the problem and the fix."""


class NonFiniteError(UserError):
    """NaN or Inf where numbers must be finite: in the model, or produced by a stage; the message names where."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (what schedulers send before killing): the run stops, says so, and a rerun resumes."""

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(name)
        self.signum, self.name = signum, name


class CheckpointError(UserError, ValueError):
    """A checkpoint folder that is missing, truncated, corrupted or inconsistent; the message says what."""
