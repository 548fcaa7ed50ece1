"""Errors of hub_cli, each with the process exit code the CLI uses for it.

| code | meaning |
|------|---------|
| 0    | success |
| 1    | any other failure (bug, missing tool such as git-lfs, unexpected server answer) |
| 2    | usage: bad arguments or options |
| 3    | not found: repository, revision or file (HTTP 404), or no file matched --include |
| 4    | authentication / permission: HTTP 401 / 403, gated or private repository, rejected token |
| 5    | integrity: size or sha256 / git hash of a downloaded file differs from what the hub lists |
| 6    | network: connection refused / dropped / timed out, HTTP 5xx or 429 after all retries |
| 7    | refused: the hub listed a file name that would escape the target folder |
| 130  | interrupted (Ctrl-C) |

Messages are one line and never contain a token: :func:`redact` removes the secrets before printing.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "HubCliError", "UsageError", "NotFoundError", "AuthError", "IntegrityError", "NetworkError",
    "UnsafePathError", "redact",
]


class HubCliError(Exception):
    """Base class; ``exit_code`` is the CLI's exit status for this kind of failure."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # one line, always

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class UsageError(HubCliError):
    exit_code = 2


class NotFoundError(HubCliError):
    exit_code = 3


class AuthError(HubCliError):
    exit_code = 4


class IntegrityError(HubCliError):
    exit_code = 5


class NetworkError(HubCliError):
    exit_code = 6


class UnsafePathError(HubCliError):
    exit_code = 7


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every occurrence of each non-empty secret by ``***``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
