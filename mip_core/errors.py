"""Typed errors raised at the library's boundaries. Every message names what is wrong and what to do."""


class MipError(Exception):
    """Base class of the project's errors."""


class UnsupportedModelError(MipError, ValueError):
    """The model's ``config.model_type`` has no adapter, or its modules do not match the adapter."""


class ModelLoadError(MipError, ValueError):
    """A model folder or URI is missing files or cannot be read."""


class InputError(MipError, ValueError):
    """A user-supplied value (a request, an item, a flag) is invalid."""


class ArtifactError(MipError, ValueError):
    """A dataset is missing, incomplete or modified, or its store is unreachable; the message says the fix."""


class SchemaMismatchError(ArtifactError):
    """An artifact's ``mip.schema`` (or its columns) differs from what the reader expects."""


class AttributionOOM(MipError, RuntimeError):
    """Attribution ran out of memory (CUDA or host) even one item at a time: a shard error, never an item failure.

    Items that could not be scored for lack of memory say nothing about the items; reporting them as failures
    would let their requests close ``done``. The message names the items, the device and the fix.
    """
