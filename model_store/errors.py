"""Store errors. All are RuntimeErrors, so `genserve` prints them as one-line errors."""


class StoreError(RuntimeError):
    """Anything the store refuses to do."""


class VersionExists(StoreError):
    """Publishing a version that already exists: versions are immutable."""


class NotFound(StoreError):
    """No such model, version or alias."""


class IntegrityError(StoreError):
    """A version's files do not match its manifest (hash, size, missing or extra file, path escape,
    symlink): nothing may be served from it."""
