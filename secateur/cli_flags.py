"""Command-line flags generated from a method's config class.

`secateur prune MODEL --method wanda --sparsity 0.5`: the command peeks at `--method` before
parsing, adds exactly the flags of that method's config (so `--ratio` with wanda is an
unknown option, and `--method wanda --help` lists only what applies), and hands the values
the user gave to the config class, which validates them. One command per kind rather than
one subcommand per method keeps the documented `--method NAME` spelling and one place for the
flags every method shares (calibration, evaluation, output).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from typer.core import TyperCommand

from secateur.config import Config, StepKind
from secateur.errors import SecateurError
from secateur.registry import config_class, method_names

SCALARS = {float: float, int: int, str: str, bool: bool}


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional) of `X | None`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return (inner[0] if len(inner) == 1 else annotation), True
    return annotation, False


def _nested(annotation: Any) -> type[Config] | None:
    inner, _ = _unwrap(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(info: FieldInfo) -> str:
    text = info.description or ""
    inner, _ = _unwrap(info.annotation)
    if typing.get_origin(inner) is Literal:
        text += f" One of: {', '.join(str(c) for c in typing.get_args(inner))}."
    if typing.get_origin(inner) in (list, tuple):
        text += " Comma-separated."
    if info.is_required():
        return f"{text} (required)"
    default = info.default
    return f"{text} (default: {'none' if default is None else default})"


def _cli_type(annotation: Any) -> type:
    inner, _ = _unwrap(annotation)
    return inner if inner in SCALARS else str  # choices and lists: validated by the config


def _parameters(config: type[Config], prefix: str = "") -> list[inspect.Parameter]:
    """One parameter per field; a nested config (OWL) becomes an on/off flag plus its fields."""
    params: list[inspect.Parameter] = []
    for name, info in config.model_fields.items():
        full = prefix + name
        nested = _nested(info.annotation)
        if nested is not None:
            option = typer.Option(f"{_flag(full)}/--no-{full.replace('_', '-')}",
                                  help=info.description or "")
            params.append(inspect.Parameter(full, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=Annotated[bool | None, option]))
            params.extend(_parameters(nested, prefix=f"{full}_"))
            continue
        kind = _cli_type(info.annotation)
        decl = (f"{_flag(full)}/--no-{full.replace('_', '-')}" if kind is bool
                else _flag(full))
        option = typer.Option(decl, help=_help(info), show_default=False)
        params.append(inspect.Parameter(full, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[kind | None, option]))
    return params


@functools.cache
def method_options(config: type[Config]) -> tuple[Any, ...]:
    """The config's fields as typer options, built by typer itself from a signature."""

    def command(**_: Any) -> None: ...

    command.__signature__ = inspect.Signature(_parameters(config))  # type: ignore[attr-defined]
    scratch = typer.Typer(add_completion=False)
    scratch.command()(command)
    return tuple(typer.main.get_command(scratch).params)


def fields_from_flags(config: type[Config], given: dict[str, Any], prefix: str = ""
                      ) -> dict[str, Any]:
    """The flags the user gave, shaped as the config's fields (nested ones as dicts)."""
    out: dict[str, Any] = {}
    for name, info in config.model_fields.items():
        full = prefix + name
        nested = _nested(info.annotation)
        if nested is not None:
            inner = fields_from_flags(nested, given, prefix=f"{full}_")
            switch = given.get(full)
            if switch is False and inner:
                raise SecateurError(f"--no-{full.replace('_', '-')} contradicts "
                                    f"{', '.join(_flag(f'{full}_{k}') for k in inner)}")
            if switch is False:
                out[name] = None
            elif switch or inner:  # a field of the nested config implies it is on
                out[name] = inner
        elif given.get(full) is not None:
            value = given[full]
            inner_type, _ = _unwrap(info.annotation)
            if typing.get_origin(inner_type) in (list, tuple) and isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            out[name] = value
    return out


def _peek_method(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--method" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return None


class MethodCommand(TyperCommand):
    """A typer command whose method-specific flags come from the chosen config class."""

    kind: StepKind = "prune"
    fixed_method: str | None = None  # commands for one method (distill) need no --method

    def _method(self, args: list[str]) -> str | None:
        return self.fixed_method or _peek_method(args)

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        base = [p for p in self.params if not getattr(p, "secateur_method_flag", False)]
        name = self._method(args)
        extra: list[Any] = []
        if name is not None:
            for option in method_options(config_class(name, self.kind)):
                option.secateur_method_flag = True
                extra.append(option)
        self.params = base + extra
        ctx.meta["secateur_method"] = name
        ctx.meta["secateur_flags"] = [o.name for o in extra]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context) -> Any:
        given = {n: ctx.params.pop(n) for n in ctx.meta.get("secateur_flags", [])}
        ctx.meta["secateur_fields"] = {k: v for k, v in given.items() if v is not None}
        return super().invoke(ctx)

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        super().format_help(ctx, formatter)
        if ctx.meta.get("secateur_method") is None and self.fixed_method is None:
            formatter.write_paragraph()
            formatter.write_text(f"Methods: {', '.join(method_names(self.kind))}. Their flags: "
                                 f"secateur {ctx.info_name} --method NAME --help")


def method_fields(ctx: typer.Context) -> tuple[str, dict[str, Any]]:
    """(method name, its fields as the user gave them) for the running command."""
    name = ctx.meta["secateur_method"]
    given = ctx.meta.get("secateur_fields", {})
    return name, fields_from_flags(config_class(name), given)
