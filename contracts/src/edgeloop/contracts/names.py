"""The syntax of the names users choose: models, versions, aliases, device ids, labels.

One rule per kind of name, checked where a name enters (the registry, the deployer, the
gateway, the monitor, the CLI) with the same message, which states the rule so that a
user knows what to type instead. Names end up in URL paths, OCI repositories, NATS
subjects and certificate common names, so none of them may hold '/', spaces or '..'.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


class InvalidName(ValueError):
    """A name that breaks its rule (the message states the rule)."""


@dataclass(frozen=True)
class Rule:
    """The syntax of one kind of name."""

    what: str
    """What the name names, e.g. ``model name``."""
    pattern: re.Pattern[str]
    rule: str
    """The rule in words, e.g. ``1-64 characters of a-z, 0-9, '.', '_', '-' …``."""

    def check(self, value: str) -> str:
        """``value`` if it follows the rule, else :class:`InvalidName` stating it."""
        if not isinstance(value, str) or not self.pattern.fullmatch(value):
            raise InvalidName(f"invalid {self.what} {value!r}: {self.what}s are {self.rule}")
        return value


MODEL = Rule(
    "model name",
    re.compile(r"[a-z0-9][a-z0-9._-]{0,63}"),
    "1-64 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit",
)
VERSION = Rule(
    "version",
    re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]{0,63}"),
    "1-64 characters of letters, digits, '.', '_', '+' and '-', starting with a letter or digit",
)
ALIAS = Rule(
    "alias",
    re.compile(r"[a-z][a-z0-9_-]{0,31}"),
    "1-32 characters of a-z, 0-9, '_' and '-', starting with a letter",
)
DEVICE_ID = Rule(
    "device id",
    re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"),
    "1-128 characters of letters, digits, '.', '_' and '-', starting with a letter or digit",
)
LABEL_KEY = Rule(
    "label key",
    re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}"),
    "1-63 characters of letters, digits, '.', '_', '/' and '-', starting with a letter or digit",
)
LABEL_VALUE = Rule(
    "label value",
    re.compile(r"[^,=\x00-\x1f]{0,256}"),
    "at most 256 characters, without ',', '=' or control characters",
)

#: Labels a device may carry at most (enrolment or selector).
MAX_LABELS = 64


def check_model(name: str) -> str:
    """A model name (:data:`MODEL`)."""
    return MODEL.check(name)


def check_version(version: str) -> str:
    """A version label such as ``3`` or ``1.4.0`` (:data:`VERSION`)."""
    return VERSION.check(version)


def check_alias(alias: str) -> str:
    """An alias such as ``champion`` (:data:`ALIAS`)."""
    return ALIAS.check(alias)


def check_device_id(device_id: str) -> str:
    """A device id, also its certificate's common name (:data:`DEVICE_ID`)."""
    return DEVICE_ID.check(device_id)


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels (or a selector): every key and value by its rule, at most
    :data:`MAX_LABELS`."""
    if len(labels) > MAX_LABELS:
        raise InvalidName(f"{len(labels)} labels; a device or selector has at most {MAX_LABELS}")
    for key, value in labels.items():
        LABEL_KEY.check(key)
        try:
            LABEL_VALUE.check(value)
        except InvalidName as exc:
            raise InvalidName(f"label {key!r}: {exc}") from None
    return dict(labels)
