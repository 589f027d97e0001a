"""One exception type for every user-facing error: the CLI prints its message on one line and exits 2."""


class SpecqError(Exception):
    """A problem with the user's input (files, arguments, prompts) rather than a bug in specq."""
