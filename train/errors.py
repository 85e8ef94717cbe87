"""The two ways a run ends that are not bugs: a user's bad input (exit 2) and a diverged run (exit 3)."""


class UserError(Exception):
    """Bad input or usage. The message is one line that says what is wrong and what to do."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the message names the step and the checkpoint kept."""
