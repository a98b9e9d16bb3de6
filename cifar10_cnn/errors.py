"""The one exception type the steps turn into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: a parameter, a data source, a run id. The message says what and where."""


class CheckFailed(UserError):
    """A result failed a check (ONNX parity, a non-finite loss): the run fails and nothing is registered."""
