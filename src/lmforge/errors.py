"""One exception type for everything the user can fix: the CLI prints its message on one line."""


class LmforgeError(Exception):
    """A problem with the user's input (recipe, data, checkpoint, paths), stated so they can fix it."""
