"""wideep's error hierarchy: one root, one configuration error, one exit-code rule for the CLIs.

Catch WideepError to handle anything wideep raised on purpose; ConfigError is every bad user input
that is not an HTTP request (flags, YAML files, plugin parameters, engine arguments), with the path
of the offending field. The CLIs exit 2 on a ConfigError or a usage error, 1 on any other failure.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2   # bad flags or configuration, as argparse does


class WideepError(Exception):
    """Root of the errors wideep raises on purpose."""


class ConfigError(WideepError, ValueError):
    """A configuration value is wrong. `field` is its dotted path (`decode.data_parallel_size`,
    `load.stages[0].rate`, `--max-num-seqs`); the message starts with it."""

    def __init__(self, field: str, message: str | None = None):
        if message is None:  # a message that is not about one field (a missing file, a bad combination)
            field, message = "", field
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class UsageExit(SystemExit):
    """Leave a CLI with exit code 2 and a message (`wideep` prints it): a bad flag, file or spec."""

    def __init__(self, message: str):
        super().__init__(EXIT_USAGE)
        self.message = message

    def __str__(self) -> str:
        return self.message
