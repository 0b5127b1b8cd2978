"""Exceptions the core raises; CLIs and services turn them into one clear line or an HTTP error."""


class CTScanError(Exception):
    """Base class: the message is meant for a person and names the problem."""


class DataError(CTScanError):
    """A dataset folder, split file or checksum list is missing or malformed."""


class ImageError(CTScanError):
    """An image cannot be decoded or is refused (unsupported, too large, hostile)."""


class UnsupportedImageError(ImageError):
    """The bytes are not a PNG, JPEG or DICOM image we accept."""


class UnsupportedTransferSyntaxError(UnsupportedImageError):
    """DICOM pixel data in a compression that cannot be decoded here (HTTP 415)."""


class ImageTooLargeError(ImageError):
    """The upload or its pixel dimensions exceed the configured limits."""


class ChecksumError(CTScanError):
    """A file does not match its recorded SHA-256."""


class ModelError(CTScanError):
    """Unknown model name, bad init, or weights that do not fit the architecture."""


class StoreError(CTScanError):
    """The model store cannot satisfy a request (missing version, write refused...)."""


class VersionExistsError(StoreError):
    """A version, once written, is never overwritten."""
