"""Command-line plumbing shared by `experiments.train` and `experiments.compare`."""

from __future__ import annotations

import difflib
import re
import sys

import ml_collections
from absl import flags

_OVERRIDE = re.compile(r"^--?config\.([^=\s]+)")


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`) with one-line
    errors: an unknown `--config.FIELD` is named with the closest valid fields (instead
    of ml_collections' AttributeError traceback); a missing config file, and an error
    raised by its `get_config` (a bad `:ARG`), are shown without a traceback."""
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        sys.exit(f"error: {_without_traceback(str(e))}\n{_USAGE}")
    except (AttributeError, KeyError):
        message = unknown_override(argv, flag_values)
        if message is None:
            raise
        sys.exit(f"error: {message}")
    try:  # ml_collections defers a missing config file's error to first use
        flag_values["config"].value.to_dict()
    except OSError as e:
        reason = str(e).strip().splitlines()[-1].strip()
        sys.exit(f"error: --config={_config_arg(argv)}: cannot load the config file: {reason}")
    return rest


_USAGE = "Pass --helpshort or --helpfull to see help on flags."


def _without_traceback(message: str) -> str:
    """ml_collections wraps get_config's errors as "...: Error whilst parsing config
    file:" + traceback; keep the flag and the exception's own message."""
    head, marker, trace = message.partition("Error whilst parsing config file:")
    if not marker:
        return message
    last = [line for line in trace.strip().splitlines() if line.strip()][-1].strip()
    return head.strip() + " " + re.sub(r"^[\w.]*(Error|Exception): ", "", last)


def unknown_override(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> str | None:
    """A message for the first `--config.FIELD` in `argv` that the `--config` file does
    not define, or None if there is none (or the config cannot be loaded)."""
    spec = _config_arg(argv)
    if spec is None:
        return None
    try:
        config = flag_values["config"].parser.parse(spec)  # as --config loads it
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
    """The value of the last `--config` in argv (absl keeps the last)."""
    spec = None
    for i, arg in enumerate(argv):
        match = re.match(r"^--?config(=(.*))?$", arg)
        if match:
            spec = match.group(2) if match.group(1) else (argv[i + 1 : i + 2] or [None])[0]
    return spec
