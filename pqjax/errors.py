"""The one base class for unusable checkpoints, model folders and weight files (a leaf module)."""


class CheckpointError(ValueError):
    """A checkpoint, model folder or file that cannot be used as it is; the message names the
    file."""


class MissingFileError(CheckpointError, FileNotFoundError):
    """A file that a checkpoint or model folder needs is not there; the message names it."""
