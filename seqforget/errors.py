class SeqforgetError(Exception):
    """A problem the user can act on: reported as one line, with a non-zero exit."""
