"""Command-line plumbing shared by `experiments.train` and `experiments.compare`."""

from __future__ import annotations

import difflib
import re
import sys

import ml_collections
from absl import app, flags

_OVERRIDE = re.compile(r"^--?config\.([^=\s]+)")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), except that an
    unknown `--config.FIELD` exits with a message naming it and the closest valid
    fields instead of ml_collections' AttributeError traceback."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):
        message = unknown_override(argv)
        if message is None:
            raise
        sys.exit(f"error: {message}")


def unknown_override(argv: list[str]) -> str | None:
    """A message for the first `--config.FIELD` in `argv` that the `--config` file does
    not define, or None if there is none (or the config cannot be loaded)."""
    spec = _config_arg(argv)
    if spec is None:
        return None
    try:
        config = flags.FLAGS["config"].parser.parse(spec)  # as --config loads it
    except Exception:  # the flag parser reports a bad config file itself
        return None
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if match:
            message = _missing_field(config, match.group(1))
            if message:
                return f"--config.{match.group(1)}: {spec.partition(':')[0]} {message}"
    return None


def _missing_field(config: ml_collections.ConfigDict, path: str) -> str | None:
    """What is wrong with a dotted field path of `config` (None: it exists)."""
    node, known = config, []
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return f"has config.{'.'.join(known)} = {node!r}, which has no fields."
        if part not in node:
            group = f"config.{'.'.join(known)}" if known else "the config"
            prefix = "".join(f"{k}." for k in known)
            close = difflib.get_close_matches(part, list(node.keys()), n=3, cutoff=0.6)
            if close:
                hint = "did you mean " + " or ".join(f"--config.{prefix}{c}" for c in close)
                return f"has no field {prefix}{part}; {hint}?"
            return f"has no field {prefix}{part}; {group} has: {', '.join(node.keys())}."
        node = node[part]
        known.append(part)
    return None


def _config_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        match = re.match(r"^--?config(=(.*))?$", arg)
        if match:
            return (
                match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
            )
    return None
