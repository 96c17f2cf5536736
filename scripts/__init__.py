"""Repository scripts: set-up, tests, README figures and result tables."""
