class RegistryError(Exception):
    """A registry that is missing, damaged, locked or asked for something it cannot do."""


class RegistryBusy(RegistryError):
    """Another process holds the writer lock."""


class RegistryDamaged(RegistryError):
    """A committed file is missing, altered, or unaccounted for."""


class CommittedUnfinished(RegistryError):
    """The request is committed, but a step after the commit point failed (the journal's
    record, say); the next writer's recovery finishes it."""
