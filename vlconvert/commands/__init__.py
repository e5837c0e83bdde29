"""Click commands, one module per area; registered by name in ``vlconvert/cli.py``."""
