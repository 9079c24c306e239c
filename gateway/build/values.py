"""Settings models become plain values here: the policies, edge filters and upstreams
each declare the small frozen dataclass they need, with the contract's field names, and
never see a settings model."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["plain"]

T = TypeVar("T", bound="DataclassInstance")


def plain(cls: type[T], model: object) -> T:
    """The dataclass `cls` from a settings model: each of its fields read from the
    model's attribute of the same name."""
    values: dict[str, Any] = {f.name: getattr(model, f.name) for f in dataclasses.fields(cls)}
    return cls(**values)
