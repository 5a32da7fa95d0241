class RegistryError(Exception):
    """A registry that is missing, damaged, locked or asked for something it cannot do."""
