class SeqforgetError(Exception):
    """A problem the user can act on: reported as one line, with a non-zero exit."""


class AlreadyApplied(SeqforgetError):
    """The registry already holds this very request (same id, same content): nothing to do."""
