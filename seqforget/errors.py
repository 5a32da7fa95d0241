class SeqforgetError(Exception):
    """A problem the user can act on: reported as one line, with a non-zero exit."""


class AlreadyDone(SeqforgetError):
    """What the command asks for is already so: the request is applied (same id, same
    content, active), or already rolled back. Nothing to do; a retrying caller may take it as done."""


class Stopped(Exception):
    """A stop was asked for while a request trained: it was abandoned, and nothing committed."""


class OverBudget(SeqforgetError):
    """The request would take the registry below its budget: the share of the base model's
    accuracy on the registry's guard rows it promised to keep (seqforget.budget). Nothing committed."""
