"""Experiment configs: `get_config(arg)` per file; `common` parses the `:arg` variant."""
