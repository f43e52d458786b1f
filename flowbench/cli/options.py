"""Command-line values parsed into what the library takes: shapes, hparams, bounded numbers, budgets."""

from __future__ import annotations

import argparse
from typing import Annotated, Any

import pydantic

from flowbench.errors import FlowbenchError
from flowbench.specfile import error_location, parse_scalar

BUDGET_KINDS = {"steps": int, "epochs": float, "seconds": float, "images": int, "flops": float}


def image_shape_option(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image shape must look like 3x32x32, got {text!r}") from None
    return c, h, w


def hparam_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--hparam takes KEY=VALUE, got {text!r}")
    return key, parse_scalar(value)


def number_option(kind: type, **bounds):
    """An argparse type: a number as a spec would read it (1e-4, 3, 1e3 for an integer), finite,
    within ``bounds`` (pydantic.Field's gt, ge, …)."""
    finite: dict[str, Any] = {"allow_inf_nan": False} if kind is float else {}
    number: Any = Annotated[kind, pydantic.Field(**finite, **bounds)]  # a type made at run time
    adapter = pydantic.TypeAdapter(number)

    def parse(text: str):
        value = parse_scalar(text)
        try:
            if isinstance(value, bool):  # YAML's yes/true: not a number, though pydantic would take it for 1
                raise ValueError
            return adapter.validate_python(value)
        except (ValueError, pydantic.ValidationError) as err:
            problem = err.errors()[0]["msg"] if isinstance(err, pydantic.ValidationError) else "not a number"
            raise argparse.ArgumentTypeError(f"{problem[0].lower()}{problem[1:]}, got {text!r}") from None

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def option_error(err: pydantic.ValidationError, budget_kind: str) -> FlowbenchError:
    """The one line for a trial config the command-line options make invalid, naming the option."""
    loc, message = error_location(err.errors()[0])
    field = str(loc[0]) if loc else ""
    option = {"budget": f"budget-{budget_kind}", "hparams": "hparam"}.get(field, field.replace("_", "-"))
    return FlowbenchError(f"--{option}: {message}")


def cli_hparams(model: str, pairs) -> dict:
    """--hparam KEY=VALUE pairs typed and range-checked as a card's hyperparameters are."""
    from flowbench.cards import check_hparams
    from flowbench.specfile import FieldError

    given = dict(pairs or [])
    try:
        return check_hparams(model, given)
    except FieldError as err:
        key = err.loc[0] if err.loc else ""
        raise FlowbenchError(f"--hparam {key}={given.get(key)}: {err}") from None
