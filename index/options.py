"""Command-line flags generated from a pydantic settings model, for typer and for argparse.

A setting is declared once, as a field (type, default, constraints, description), and every entry point
offers it under the same name: field `max_new_tokens` is `--max-new-tokens`, a bool field is
`--x/--no-x`, a Literal of strings is a choice, `int | None` defaults to None (derived from other
settings). Fields of other types (dicts, lists, models) are not offered on a command line. Values are
validated by the model itself, so both entry points accept and refuse the same things.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ValidationError

SCALARS = (bool, int, float, str, Path)


@dataclass(frozen=True)
class Flag:
    """One settings field as a command-line flag."""

    name: str  # the field name, also the typer parameter and the argparse dest
    type: type  # one of SCALARS
    default: Any  # ... when the flag is required
    help: str
    choices: tuple[str, ...] | None = None
    optional: bool = False  # the field takes None
    min: float | None = None  # the field's ge/le bounds: typer shows them in --help (the model checks all bounds)
    max: float | None = None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def _scalar(annotation: Any) -> tuple[type | None, tuple[str, ...] | None, bool]:
    """(flag type, choices, optional) of a field's annotation; type None when it is no flag."""
    optional = False
    if get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) != 1:
            return None, None, False
        annotation, optional = rest[0], True
    if get_origin(annotation) is Literal:
        values = get_args(annotation)
        return (str, tuple(values), optional) if all(isinstance(v, str) for v in values) else (None, None, False)
    return (annotation, None, optional) if annotation in SCALARS else (None, None, False)


def flags(model: type[BaseModel], defaults: Mapping[str, Any] | None = None) -> list[Flag]:
    """The flags of `model`, in field order. `defaults` replaces some fields' defaults for one entry point
    (explicit data where its context differs, e.g. the Ray job's workers on a cluster)."""
    defaults = dict(defaults or {})
    unknown = set(defaults) - set(model.model_fields)
    if unknown:
        raise ValueError(f"defaults for fields {model.__name__} does not have: {sorted(unknown)}")
    out = []
    for name, field in model.model_fields.items():
        kind, choices, optional = _scalar(field.annotation)
        if kind is None:
            continue
        default = ... if field.is_required() else field.get_default(call_default_factory=True)
        low = next((m.ge for m in field.metadata if isinstance(m, annotated_types.Ge)), None)
        high = next((m.le for m in field.metadata if isinstance(m, annotated_types.Le)), None)
        out.append(Flag(name, kind, defaults.get(name, default), field.description or "", choices, optional, low, high))
    return out


def flag_values(fl: list[Flag], values: Any) -> dict[str, Any]:
    """The settings fields from parsed values (an argparse Namespace or a mapping)."""
    get = values.get if isinstance(values, Mapping) else functools.partial(getattr, values)
    return {f.name: get(f.name) for f in fl}


def validate(model: type[BaseModel], fields: Mapping[str, Any]) -> BaseModel:
    """`model(**fields)`; a ValidationError becomes a ValueError naming the flags, for a usage error."""
    try:
        return model(**fields)
    except ValidationError as e:
        msg = "; ".join(f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}" for err in e.errors())
        raise ValueError(msg) from None


# ---------------------------------------------------------------------------------------------- argparse


def add_arguments(parser: argparse.ArgumentParser, fl: list[Flag]) -> None:
    """One argparse argument per flag. Strings, paths and choices stay strings: the model converts them."""
    for f in fl:
        kw: dict[str, Any] = {"dest": f.name, "help": f.help.replace("%", "%%")}
        kw.update({"required": True} if f.default is ... else {"default": f.default})
        if f.choices:
            kw["choices"] = f.choices
        if f.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif f.type in (int, float):
            kw["type"] = f.type
        parser.add_argument(f.option, **kw)


# ---------------------------------------------------------------------------------------------- typer


def typer_parameters(fl: list[Flag]) -> list[inspect.Parameter]:
    """Keyword-only parameters with typer.Option defaults, the way a typer command declares options."""
    import typer

    params = []
    for f in fl:
        decl = f"{f.option}/--no-{f.option[2:]}" if f.type is bool else f.option
        option = typer.Option(f.default, decl, help=f.help, min=f.min, max=f.max)
        annotation: Any = Literal[f.choices] if f.choices else f.type  # typer offers a Literal's values as choices
        if f.optional:
            annotation = Optional[annotation]  # noqa: UP045 (a runtime type for typer)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def with_flags(fl: list[Flag]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a typer command `fn(fields, <its own options>)`: the command gets one option per flag, then
    its own, and `fn` receives the flags' values as the dict `fields`."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)
        # Keyword-only, so they may follow the settings flags (a command's own options list last in --help).
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values() if p.name != "fields"]
        clash = {p.name for p in own} & {f.name for f in fl}
        if clash:
            raise ValueError(f"{fn.__name__}: options {sorted(clash)} are also settings flags")

        @functools.wraps(fn)
        def command(**kw: Any) -> Any:
            return fn(fields={f.name: kw.pop(f.name) for f in fl}, **kw)

        # typer reads the options from the signature and resolves the annotations (already types here).
        params = typer_parameters(fl) + own
        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
