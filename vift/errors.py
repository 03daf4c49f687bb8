"""One exception type for every failure a user can fix; the CLI turns it into a message + exit code."""


class UserError(Exception):
    """A problem in the user's input or environment, with what to do about it.

    ``exit_code`` 2 means invalid input (parameters, manifests); 1 means an environment problem
    (missing files, unreachable servers).
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
