"""What a ``query(...)`` asks for, checked before anything is searched.

Two forms are accepted, and can be mixed:

* ours, keywords naming arguments: ``query("mod.f", x=1, mode="fast")``;
* fleche's (0.22): ``query(name="f", module="mod", arguments={"x": 1},
  metadata={"Runtime": {"hostname": "node1"}}, version=2)``, or a fleche
  ``QueryCall`` passed as the only argument.

A filter that cannot apply is an error, never an empty answer: a field
fleche-remote does not record (``code_digest``, ``result``), a value of
the wrong type, metadata that is not plain data, an argument given twice.

A :class:`QueryPlan` splits the filters in two. What every store can
answer from its index (the name, argument digests, scalar metadata) goes
to ``query_records``, and so travels to a server as record filters; the
rest (fleche's ``None`` wildcards, partial metadata tables, lists, the
version, a bare qualname) is checked here, on the records that come back.
Stores and servers therefore need nothing new, and answer the same on
every backend.

Semantics, as in fleche where fleche has them:

* ``name`` is ``module.qualname``, as ``@cached`` files calls. A name
  without a dot matches that qualname in any module (fleche's ``name``
  holds the qualname alone); that form scans every record's name, so
  give the full name, or ``module=``, for an indexed lookup.
* ``arguments={"x": 1}`` matches by stable digest, like ``x=1``; in this
  form (only) ``None`` is fleche's wildcard: the call must have had an
  argument ``x``, with any value. The keyword form ``x=None`` matches the
  value ``None``. A parameter named like a field (``name``, ``version``,
  ``module``, ``metadata``, ``arguments``, ``result``, ``code_digest``)
  is reached through ``arguments={...}``.
* ``metadata={"k": v}``: a stored ``k`` equal to ``v``; ``None`` means
  ``k`` is present with any value; a mapping ``v`` matches a stored
  mapping holding those entries (each ``None`` again a wildcard), which
  is fleche's ``{"Runtime": {"hostname": ...}}`` form. Tuples and lists
  compare as the same sequence (a SQL store keeps lists).
* ``version`` is compared as :func:`~fleche_remote.codec.digest.normalize_version`
  makes it (``2`` is ``"2"``); ``None`` means any version.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Set

from .call import CallRecord
from .codec.digest import digest_of, normalize_version
from .codec.plain import check_plain

#: fleche's ``QueryCall`` fields; as ``query`` keywords they are never argument names.
FIELDS = ("name", "arguments", "metadata", "module", "version", "code_digest", "result")

#: Fields fleche has and fleche-remote cannot filter on, with what to do instead.
UNSUPPORTED = {
    "code_digest": "fleche-remote keeps a call's code digest as its version ('code:<digest>', "
    "see f.version); filter with version=f.version",
    "result": "fleche-remote does not index results; query the calls and compare each LazyCall's .result",
}

_SCALARS = (str, int, float, bool, bytes)


@dataclass
class QueryPlan:
    """A checked query: what the stores answer, and what is checked here."""

    name: Optional[str] = None
    arg_digests: Dict[str, str] = field(default_factory=dict)
    metadata: Dict[str, Any] = field(default_factory=dict)
    # checked on the records that come back
    qualname: Optional[str] = None
    module_prefix: Optional[str] = None
    args_present: Set[str] = field(default_factory=set)
    meta_checks: Dict[str, Any] = field(default_factory=dict)
    version: Optional[str] = None

    def accepts(self, record: CallRecord) -> bool:
        """Whether ``record`` passes the filters the stores did not apply."""
        if self.qualname is not None and not (
            record.name == self.qualname or record.name.endswith("." + self.qualname)
        ):
            return False
        if self.module_prefix is not None and not record.name.startswith(self.module_prefix):
            return False
        if self.version is not None and normalize_version(record.version) != self.version:
            return False
        if any(arg not in record.arg_digests for arg in self.args_present):
            return False
        return all(_meta_matches(record.metadata, k, v) for k, v in self.meta_checks.items())

    @property
    def filters_locally(self) -> bool:
        return bool(
            self.qualname is not None
            or self.module_prefix is not None
            or self.version is not None
            or self.args_present
            or self.meta_checks
        )


def check_keywords(filters: Mapping[str, Any]) -> None:
    """Refuse the fleche fields that arrive as ``query`` keywords and that
    fleche-remote cannot apply (``code_digest=``, ``result=``)."""
    for key in UNSUPPORTED:
        if key in filters:
            raise TypeError(
                f"query cannot filter on {key}=: {UNSUPPORTED[key]} "
                f"(an argument named {key!r} is reached with arguments={{{key!r}: ...}})"
            )


def plan_query(
    name: Any = None,
    *,
    arguments: Any = None,
    metadata: Any = None,
    module: Any = None,
    version: Any = None,
    filters: Optional[Mapping[str, Any]] = None,
) -> QueryPlan:
    """Check a query's filters and split them (see the module notes).

    Args:
        name: ``module.qualname``, a bare qualname, None, or a fleche
            ``QueryCall`` (then nothing else may be given).
        arguments: fleche's ``{argument: value}``; ``None`` values are wildcards.
        metadata: ``{key: value}`` (see the module notes).
        module: the function's module (fleche keeps it apart from ``name``).
        version: the function's version, str or int.
        filters: argument name to value, matched by digest (the keyword
            form; here any name is an argument name).

    Raises:
        TypeError: a filter of the wrong type, one that fleche-remote cannot
            apply (``code_digest``, ``result``), or an argument given twice.
        ValueError: an empty ``name`` or ``module``.
    """
    filters = dict(filters or {})
    if name is not None and not isinstance(name, str):
        if not _looks_like_query_call(name):
            raise TypeError(
                f"query's first argument is a function name (str) or a fleche QueryCall, "
                f"got {type(name).__name__} {name!r}"
            )
        if filters or any(v is not None for v in (arguments, metadata, module, version)):
            raise TypeError("give either a QueryCall or keyword filters to query, not both")
        for key in UNSUPPORTED:
            if getattr(name, key, None) is not None:
                raise TypeError(f"query cannot filter on the QueryCall's {key}: {UNSUPPORTED[key]}")
        template = name
        name, module, version = template.name, template.module, template.version
        arguments, metadata = template.arguments, template.metadata
    plan = QueryPlan()
    _plan_name(plan, name, module)
    plan.version = normalize_version(version)
    _plan_arguments(plan, arguments, filters)
    _plan_metadata(plan, metadata)
    return plan


def _looks_like_query_call(obj: Any) -> bool:
    return not isinstance(obj, type) and all(hasattr(obj, f) for f in FIELDS)


def _plan_name(plan: QueryPlan, name: Any, module: Any) -> None:
    for label, value in (("name", name), ("module", module)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"query's {label} must be a str or None, got {type(value).__name__} {value!r}")
        if value == "":
            raise ValueError(f"query's {label} is empty; leave it out to match every {label}")
    if module is not None:
        module = module.rstrip(".")
        if name is not None:
            plan.name = f"{module}.{name}"
        else:
            plan.module_prefix = module + "."
    elif name is not None and "." not in name:
        plan.qualname = name  # fleche's bare qualname: any module
    else:
        plan.name = name


def _plan_arguments(plan: QueryPlan, arguments: Any, filters: Mapping[str, Any]) -> None:
    if arguments is not None and not isinstance(arguments, Mapping):
        raise TypeError(
            f"query's arguments must be a mapping of argument name to value, "
            f"got {type(arguments).__name__} {arguments!r}"
        )
    given = dict(arguments or {})
    for arg in given:
        if not isinstance(arg, str):
            raise TypeError(f"query's arguments keys are argument names (str), got {arg!r}")
    twice = sorted(set(given) & set(filters))
    if twice:
        raise TypeError(f"argument {', '.join(map(repr, twice))} given both in arguments= and as a keyword")
    for arg, value in given.items():
        if value is None:
            plan.args_present.add(arg)  # fleche's wildcard
        else:
            plan.arg_digests[arg] = str(digest_of(value))
    for arg, value in filters.items():
        plan.arg_digests[arg] = str(digest_of(value))


def _plan_metadata(plan: QueryPlan, metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise TypeError(
            f"the metadata filter must be a mapping of key to value, "
            f"got {type(metadata).__name__} {metadata!r}"
        )
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata filter keys must be str, got {key!r}")
        try:
            check_plain(value, f"the metadata filter for {key!r}")
        except TypeError as exc:
            raise TypeError(f"{exc}: stored metadata is plain data, so this could never match") from None
        if isinstance(value, _SCALARS):
            plan.metadata[key] = value
        else:
            plan.meta_checks[key] = _normal(value)


def _normal(value: Any) -> Any:
    """Tuples as lists, all the way down: metadata read back from JSON has lists."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _normal(v) for k, v in value.items()}
    return value


def _meta_matches(stored: Mapping[str, Any], key: str, wanted: Any) -> bool:
    if key not in stored:
        return False
    if wanted is None:
        return True
    have = stored[key]
    if isinstance(wanted, Mapping):
        if not isinstance(have, Mapping):
            return False
        return all(k in have and (v is None or _normal(have[k]) == v) for k, v in wanted.items())
    return bool(_normal(have) == wanted)


def plan_function_query(
    name: str,
    signature: inspect.Signature,
    ignore: Sequence[str],
    args: Sequence[Any],
    arguments: Optional[Mapping[str, Any]],
    metadata: Optional[Mapping[str, Any]],
    version: Any,
    filters: Mapping[str, Any],
) -> QueryPlan:
    """The plan of ``f.query(*args, arguments=..., metadata=..., version=...,
    **filters)`` for the cached function ``name`` with ``signature``: the
    arguments are checked against its parameters, so that a query no
    stored call could match is an error instead of an empty answer.

    Raises:
        TypeError: a name the function does not take, arguments that do
            not fit its signature, or a parameter whose name is also a
            query field given as a keyword.
        ValueError: a parameter in ``ignore``, which keys leave out.
    """
    params = signature.parameters
    fields = {"arguments": arguments, "metadata": metadata, "version": version}
    for key, value in fields.items():
        if value is not None and key in params:
            raise TypeError(
                f"{name} has a parameter named {key!r}, so query({key}=...) is ambiguous: "
                f"give that argument positionally, or filter with "
                f"{name}.cache.query({name!r}, {key}=...)"
            )
    wanted: Dict[str, Any] = dict(signature.bind_partial(*args).arguments) if args else {}
    for param, value in filters.items():
        if param in wanted:
            raise TypeError(f"{name}: argument {param!r} given both positionally and as a keyword")
        wanted[param] = value
    if arguments is not None and not isinstance(arguments, Mapping):
        raise TypeError(f"arguments must be a mapping, got {type(arguments).__name__} {arguments!r}")
    named = [*wanted, *(arguments or {})]
    unknown = [n for n in named if n not in params]
    if unknown:
        raise TypeError(
            f"{name} takes no argument {', '.join(map(repr, unknown))}, so no call could match; "
            f"its parameters are {', '.join(params) or 'none'}"
        )
    ignored = [n for n in named if n in ignore]
    if ignored:
        raise ValueError(
            f"{', '.join(map(repr, ignored))} is in {name}'s ignore list: keys leave it out, "
            f"so stored calls cannot be told apart by it"
        )
    # wanted goes in as keyword filters, by digest; a parameter called
    # ``name`` or ``result`` is just an argument here
    return plan_query(name, arguments=arguments, metadata=metadata, version=version, filters=wanted)


__all__ = ["FIELDS", "UNSUPPORTED", "QueryPlan", "check_keywords", "plan_query"]
