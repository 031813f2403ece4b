"""Validation of user parameters (pydantic models) into one-line errors."""
from __future__ import annotations

import reprlib
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..errors import ParameterError
from ..references import is_integer

P = TypeVar("P", bound=BaseModel)


class Params(BaseModel):
    """Base of every parameter model: frozen, unknown names are errors (a typo is never silently ignored), and so
    are NaN and ±Inf (a NaN density was 'should be less than or equal to 1', an Inf resize param 'needs a param').
    Strict: a value of another type is refused, not converted (True was a density of 1, '7' a seed of 7, 4.0 a rank
    of 4); an int is a float, as in Python, and numpy's integers are ints (references.is_integer). A validator's
    message names parameters between backticks (ParameterError), so the CLI can say them as its options."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _numpy_integers(cls, data):
        return {key: int(value) if is_integer(value) else value for key, value in data.items()} \
            if isinstance(data, dict) else data


def parse_params(model: type[P], values: "dict[str, Any] | P | None", what: str) -> P:
    """``values`` validated as ``model``; a validation failure becomes one ParameterError line naming ``what``."""
    if isinstance(values, model):
        return values
    try:
        return model.model_validate(dict(values or {}))
    except ValidationError as exc:
        names, problems = parameter_names(model), []
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"])
            if err["type"] == "extra_forbidden":
                message = "unknown parameter"
            elif err["type"] == "value_error":  # our own validators: their text, without pydantic's "Value error, "
                message = str(err["ctx"]["error"])
            elif err["type"].endswith("_type"):  # strict's "Input should be a valid integer": say what was given
                message = f"{err['msg']}, not {reprlib.repr(err['input'])} ({type(err['input']).__name__})"
            else:
                message = err["msg"]
            problems.append(f"{f'`{field}`' if field in names else field}: {message}" if field else message)
        raise ParameterError(f"bad parameters for {what}: {'; '.join(problems)}", names) from None


def parameter_names(model: type[BaseModel]) -> set[str]:
    """The names a params model accepts (a field's alias where it has one: ``lambda``)."""
    return {field.alias or name for name, field in model.model_fields.items()}
