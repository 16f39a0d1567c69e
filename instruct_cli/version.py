"""The package's version, as `instruct --version` prints it; pyproject.toml's `[project] version` is the same."""

__version__ = "0.1.0"
