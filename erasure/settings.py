"""What every method's settings share: overriding some fields by name, and validation before any work starts."""

from __future__ import annotations

from dataclasses import asdict, fields, replace
from typing import Any, ClassVar, TypeVar

from .errors import BadInputError

S = TypeVar("S", bound="Settings")


class Settings:
    """Mixin for a method's frozen settings dataclass. ``label`` names the method in messages."""

    label: ClassVar[str] = ""

    def override(self: S, **values: object) -> S:
        """A copy with the given fields changed; ``None`` keeps a field's value (a flag or widget left unset)."""
        names = {f.name for f in fields(self)}  # type: ignore[arg-type]
        unknown = [k for k in values if k not in names]
        if unknown:
            raise BadInputError(f"unknown {self.label} settings: {', '.join(unknown)}")
        return replace(self, **{k: v for k, v in values.items() if v is not None})  # type: ignore[type-var]

    def validate(self) -> None:
        """Refuse bad values before any expensive work, with a message naming the fix."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]
