"""Validation of user parameters (pydantic models) into one-line errors."""
from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import InvalidInputError

P = TypeVar("P", bound=BaseModel)


class Params(BaseModel):
    """Base of every parameter model: frozen, unknown names are errors (a typo is never silently ignored), and so
    are NaN and ±Inf (a NaN density was 'should be less than or equal to 1', an Inf resize param 'needs a param')."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def parse_params(model: type[P], values: "dict[str, Any] | P | None", what: str) -> P:
    """``values`` validated as ``model``; a validation failure becomes one InvalidInputError line naming ``what``."""
    if isinstance(values, model):
        return values
    try:
        return model.model_validate(dict(values or {}))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"])
            if err["type"] == "extra_forbidden":
                message = "unknown parameter"
            elif err["type"] == "value_error":  # our own validators: their text, without pydantic's "Value error, "
                message = str(err["ctx"]["error"])
            else:
                message = err["msg"]
            problems.append(f"{field}: {message}" if field else message)
        raise InvalidInputError(f"bad parameters for {what}: {'; '.join(problems)}") from None
