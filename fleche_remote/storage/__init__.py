"""Value stores and call stores, one module per backend.

Importing this package imports no backend; ``value_store_class`` /
``call_store_class`` import one on demand.
"""

from .base import (
    CallStore,
    ValueStore,
    call_store_class,
    call_store_types,
    register_call_store,
    register_value_store,
    value_store_class,
    value_store_types,
)

__all__ = [
    "CallStore",
    "ValueStore",
    "call_store_class",
    "call_store_types",
    "register_call_store",
    "register_value_store",
    "value_store_class",
    "value_store_types",
]
