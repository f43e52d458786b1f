"""YAML files validated by pydantic, with errors that name the file, the line and the key."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import pydantic
import yaml

from flowbench.errors import FlowbenchError

Model = TypeVar("Model", bound=pydantic.BaseModel)


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


def load_spec(path: str | Path, model: type[Model], what: str) -> Model:
    """Parse ``path`` safely and validate it as ``model``; every failure is one FlowbenchError line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FlowbenchError(f"{path}: no such {what} file") from None
    except OSError as err:
        raise FlowbenchError(f"{path}: cannot read the {what} ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise FlowbenchError(f"{where}: malformed YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise FlowbenchError(f"{path}: a {what} must be a YAML mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        loc = tuple(part for part in first["loc"] if not str(part).startswith("function-"))
        line = _line_of(root, loc)
        key = ".".join(str(part) for part in loc) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"unknown key (allowed: {', '.join(_allowed_keys(model, loc[:-1]))})"
        more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
        raise FlowbenchError(f"{path}:{line}: {key}: {message}{more}") from None


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
