"""Where a config breaks the schema: the set of locations a conforming validator may report (SPEC.md 10).

JSON Schema libraries agree on *whether* an instance is valid, not on *which* error they report first
(python-jsonschema's ``best_match``, ajv's first error, the deepest error...). So a schema case of the corpus
records every instance location at which the schema is violated -- the errors of every keyword, including
those nested in the branches of ``anyOf``/``oneOf`` -- and a refusal passes when the location it reports is
one of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from jsonschema.exceptions import ValidationError

from ..config import _pointer, _validator

__all__ = ["error_locations"]


def _walk(errors: Iterable[ValidationError]) -> Iterator[ValidationError]:
    for error in errors:
        yield error
        yield from _walk(error.context or ())


def error_locations(config: Any, schema: str = "adapter_config") -> list[str]:
    """The JSON pointers (RFC 6901) of every instance location at which ``config`` violates the spec's schema,
    sorted; ``[]`` when it is valid. A member name that breaks ``propertyNames`` is located at the member.

    :param schema: ``"adapter_config"`` or ``"manifest"``.

    >>> error_locations({"peft_type": "LORA", "r": 0, "layers_to_transform": [-1]})
    ['/layers_to_transform/0', '/r']
    >>> error_locations({"peft_type": "LORA"})
    []
    """
    return sorted({_pointer(error) for error in _walk(_validator(schema).iter_errors(config))})
