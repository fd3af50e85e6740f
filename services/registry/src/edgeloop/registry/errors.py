"""Errors of the registry, each mapped to an HTTP status with a message a user can act on."""

from __future__ import annotations


class RegistryError(Exception):
    """Base: ``status`` is the HTTP status the API answers with."""

    status = 400


class InvalidInput(RegistryError):
    """The upload or request is wrong (bad name, not ONNX, shapes that do not match)."""

    status = 422


class TooLarge(RegistryError):
    """A file is over the configured limit."""

    status = 413


class Forbidden(RegistryError):
    """The caller's role may not do this (e.g. set a threshold below the minimum)."""

    status = 403


class NotFound(RegistryError):
    """No such model, version or alias."""

    status = 404


class Conflict(RegistryError):
    """The version exists with different bytes (versions are immutable)."""

    status = 409


class Unavailable(RegistryError):
    """A dependency (the OCI registry) is down; the client may retry."""

    status = 503
