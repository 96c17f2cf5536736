"""Experiment configs: `get_config(arg)` per file; `common` parses the `:arg` variant and
holds the base config, `validation` checks a config before a run starts."""
