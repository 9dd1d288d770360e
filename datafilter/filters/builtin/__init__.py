"""The built-in filters; each is registered under ``datafilter.filters`` in the project's ``pyproject.toml``."""
