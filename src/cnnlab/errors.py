"""Error types. Every expected failure is a `CnnlabError`; the CLI prints its message on one line and exits 2."""


class CnnlabError(Exception):
    """Base class of the errors cnnlab reports to users as one clear line."""


class DataError(CnnlabError):
    """A dataset is missing, corrupt, or not in the expected format."""


class UnknownSplitError(DataError):
    """A split name the dataset does not have (e.g. 'val' for MNIST): a wrong request, not missing files."""


class ConfigError(CnnlabError):
    """A recipe or command-line setting is unknown or has a bad value."""


class ModelError(CnnlabError):
    """An unknown model name or bad model arguments."""


class CheckpointError(CnnlabError):
    """A checkpoint is missing, corrupt, of another architecture or from a newer format."""
