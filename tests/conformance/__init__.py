"""One suite of behaviour that every cache type passes (see factories.py)."""
