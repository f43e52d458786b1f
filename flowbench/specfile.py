"""YAML files validated by pydantic, with errors that name the file, the line and the key."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TypeVar

import pydantic
import yaml
from pydantic_core import ErrorDetails

from flowbench.errors import FlowbenchError

log = logging.getLogger(__name__)

Model = TypeVar("Model", bound=pydantic.BaseModel)

FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2's floats: PyYAML (YAML 1.1) wants a dot and a signed exponent, so it reads the way
# people write learning rates (1e-4, 3E5) as strings. A dot or an exponent is required, else
# the float resolver (tried before the int one) would take integers too.
YAML12_FLOAT = re.compile(
    r"""^(?:
    [-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
   |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
   |[-+]?\.(?:inf|Inf|INF)
   |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class SpecLoader(yaml.SafeLoader):
    """SafeLoader (no ``!!python`` tags) with YAML 1.2 floats and duplicate keys refused."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != FLOAT_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node, deep=False):
        # YAML keeps the last of two equal keys silently: one of two values typed would be lost
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} given twice", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


SpecLoader.add_implicit_resolver(FLOAT_TAG, YAML12_FLOAT, list("-+0123456789."))


def parse_scalar(text: str):
    """A value typed on the command line read as the same YAML a spec holds (``1e-4`` a number)."""
    try:
        return yaml.load(text, Loader=SpecLoader)
    except yaml.YAMLError:
        return text  # not YAML (e.g. 'a: b: c'): the text itself, for the field's validation to judge


class FieldError(ValueError):
    """A validator's complaint about a key below the one it validates: ``loc`` (keys from there)
    lets the error name that key and its line instead of the validator's."""

    def __init__(self, loc: tuple, message: str):
        super().__init__(message)
        self.loc = tuple(loc)


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the deepest YAML node that ``loc`` (a pydantic error location) reaches."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            node = match[1]
            line = match[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def error_location(error: ErrorDetails) -> tuple[tuple, str]:
    """(keys, message) of one pydantic error, with a FieldError's keys appended to its location."""
    loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        loc += cause.loc
    return loc, error["msg"].removeprefix("Value error, ")


def load_spec(path: str | Path, model: type[Model], what: str) -> Model:
    """Parse ``path`` safely and validate it as ``model``; every failure is one FlowbenchError line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FlowbenchError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise FlowbenchError(f"{path}: cannot read the {what} ({getattr(err, 'strerror', None) or err})") from None
    loader = SpecLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise FlowbenchError(f"{where}: malformed YAML ({getattr(err, 'problem', err)})") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise FlowbenchError(f"{path}: a {what} must be a YAML mapping of keys, got {type(data).__name__}")
    try:
        spec = model.model_validate(data)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        loc, message = error_location(first)
        line = _line_of(root, loc)
        key = ".".join(str(part) for part in loc) or "(top level)"
        if first["type"] == "extra_forbidden":
            message = f"unknown key (allowed: {', '.join(_allowed_keys(model, loc[:-1]))})"
        more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
        raise FlowbenchError(f"{path}:{line}: {key}: {message}{more}") from None
    for loc, message in getattr(spec, "ignored", list)():  # what the spec holds but does not use
        log.warning("%s:%s: %s: %s", path, _line_of(root, loc), ".".join(map(str, loc)), message)
    return spec


def _allowed_keys(model: type[pydantic.BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model that ``loc`` points into, for 'unknown key' errors."""
    for key in loc:
        field = model.model_fields.get(str(key))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            model = annotation
        else:
            break
    return list(model.model_fields)
