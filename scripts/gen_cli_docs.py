"""Write docs/cli.md: every `secateur` command, its flags, and each method's flags.

    .venv/bin/python scripts/gen_cli_docs.py            # rewrites docs/cli.md
    .venv/bin/python scripts/gen_cli_docs.py --check    # exit 1 if docs/cli.md is stale

The shared flags come from the typer app itself (`secateur.cli.app`). A method's flags come
from its config class's fields (name, type, default, description), the same fields
`secateur.cli_flags` turns into options, so the page and the parser cannot disagree; every
flag written here is checked against the options the CLI really builds. The recipe keys at the
end come from the recipe's own config classes.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from secateur.cli_flags import _unwrap  # the CLI reads `X | None` fields the same way

OUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type_name(annotation: Any, flags: bool = True) -> str:
    inner, _ = _unwrap(annotation)
    origin = typing.get_origin(inner)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(inner))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a, flags) for a in typing.get_args(inner))
    if origin in (list, tuple):
        item = getattr(typing.get_args(inner)[0], "__name__", typing.get_args(inner)[0])
        return f"list of {item}" + (" (comma-separated)" if flags else "")
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return (f"switch + `{inner.__name__}` fields" if flags
                else f"mapping ({inner.__name__}, below)")
    return getattr(inner, "__name__", str(inner))


def _default(info: Any) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "its defaults"
    if isinstance(value, list | tuple):
        return f"`[{', '.join(str(v) for v in value)}]`"
    return "none" if value is None else f"`{value}`"


def _field_rows(config: type[BaseModel], flags: bool = True, flag_prefix: str = "",
                key_prefix: str = "") -> list[str]:
    """One table row per field; a nested config (OWL, SparseGPT's quantize) adds its fields
    behind its own prefix, as `secateur.cli_flags` does (`--owl-m`; recipe key `owl.m`)."""
    rows = []
    for name, info in config.model_fields.items():
        inner, _ = _unwrap(info.annotation)
        key = f"`{key_prefix}{name}`"
        if flags:
            dashed = (flag_prefix + name).replace("_", "-")
            nested = isinstance(inner, type) and issubclass(inner, BaseModel)
            flag = f"--{dashed} / --no-{dashed}" if inner is bool or nested else f"--{dashed}"
            key = f"`{flag}` | {key}"
        rows.append(f"| {key} | {_type_name(info.annotation, flags)} | {_default(info)} | "
                    f"{_cell(info.description or '')} |")
        if flags and isinstance(inner, type) and issubclass(inner, BaseModel):
            rows += _field_rows(inner, flags, f"{flag_prefix}{name}_", f"{key_prefix}{name}.")
    return rows


def _cli_flag_names(config: type[BaseModel]) -> set[str]:
    from secateur.cli_flags import method_options

    return {opt for option in method_options(config)
            for opt in (*option.opts, *option.secondary_opts)}


def _documented_flags(config: type[BaseModel], prefix: str = "") -> set[str]:
    names = set()
    for name, info in config.model_fields.items():
        full = prefix + name
        inner, _ = _unwrap(info.annotation)
        names.add("--" + full.replace("_", "-"))
        if inner is bool or (isinstance(inner, type) and issubclass(inner, BaseModel)):
            names.add(f"--no-{full.replace('_', '-')}")
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            names |= _documented_flags(inner, prefix=f"{full}_")
    return names


def _method_section(name: str, kind: str) -> list[str]:
    from secateur.registry import config_class

    config = config_class(name, kind)
    missing = _documented_flags(config) ^ _cli_flag_names(config)
    if missing:
        raise SystemExit(f"{name}: flags differ from the CLI's: {sorted(missing)}")
    doc = (config.__doc__ or "").strip().split("\n\n")[0]
    lines = [f"#### `--method {name}` ({config.__name__}, `{config.__module__}`)", "",
             " ".join(doc.split()), "",
             "| flag | recipe key | type | default | description |", "|---|---|---|---|---|",
             *_field_rows(config), ""]
    return lines


def _option_rows(command: Any) -> list[str]:
    rows = []
    for param in command.params:
        if getattr(param, "secateur_method_flag", False) or param.name == "help":
            continue
        if param.param_type_name == "argument":
            continue
        flags = " / ".join(f"`{o}`" for o in (*param.opts, *param.secondary_opts))
        kind = "bool" if param.is_flag else _type_name(param.type_descriptor.annotation)
        if param.required:
            default = "required"
        elif param.default is None or param.default == ():
            default = "none"
        elif param.default == "":
            default = '`""`'
        else:
            default = f"`{param.default}`"
        rows.append(f"| {flags} | {kind} | {default} | {_cell(param.help or '')} |")
    return rows


def _arguments(command: Any) -> list[tuple[str, str]]:
    return [(p.name.upper(), getattr(p, "help", "") or "") for p in command.params
            if p.param_type_name == "argument"]


def _methods_for(command: Any, names: list[str], commands: set[str]) -> list[str]:
    fixed = getattr(command, "fixed_method", None)
    if fixed:
        return [fixed]
    # a method that has its own command (distill) is not run by the kind's command
    return [n for n in names if n not in commands]


def render() -> str:
    import typer

    from secateur.cli import app
    from secateur.cli_flags import MethodCommand
    from secateur.registry import method_names

    group = typer.main.get_command(app)
    out = ["# Command-line reference", "",
           "<!-- generated by scripts/gen_cli_docs.py from secateur's typer app and config "
           "classes; do not edit by hand -->", "",
           "Every command prints the same tables with `--help`. `prune`, `quantize` and "
           "`recover` take `--method NAME`; the method's own flags are generated from its "
           "config class, so `secateur prune MODEL --method wanda --help` lists exactly "
           "wanda's, and a flag of another method is an error. The same field names are the "
           "keys of a recipe step (`{method: wanda, sparsity: 0.5}`).", "",
           "Commands: " + ", ".join(f"[`{n}`](#secateur-{n})" for n in group.commands) + ".",
           ""]
    for name, command in group.commands.items():
        args = _arguments(command)
        usage = " ".join(["secateur", name, *(a for a, _ in args), "[OPTIONS]"])
        out += [f"## secateur {name}", "", _cell(command.help or ""), "", "```", usage, "```",
                ""]
        if args:
            out += ["| argument | description |", "|---|---|",
                    *(f"| `{a}` | {_cell(h)} |" for a, h in args), ""]
        out += ["| option | type | default | description |", "|---|---|---|---|",
                *_option_rows(command), ""]
        if isinstance(command, MethodCommand):
            names = _methods_for(command, method_names(command.kind), set(group.commands))
            out += [f"### Methods of `secateur {name}`", ""]
            for method in names:
                out += _method_section(method, command.kind)
    out += _recipe_section()
    return "\n".join(out).rstrip() + "\n"


def _recipe_section() -> list[str]:
    from secateur.api import CalibrationConfig
    from secateur.eval.config import PerplexityConfig, ZeroShotConfig
    from secateur.recipe import BenchSettings, Evaluation, Recipe

    out = ["## Recipe files (`secateur run RECIPE.yaml`)", "",
           "A recipe's `steps` are method configs written with the keys above (`method:` "
           "names the method). The other keys:", ""]
    for title, config in (("recipe", Recipe), ("calibration", CalibrationConfig),
                          ("evaluate", Evaluation), ("evaluate.perplexity[]", PerplexityConfig),
                          ("evaluate.zeroshot", ZeroShotConfig), ("bench", BenchSettings)):
        out += [f"### `{title}` ({config.__name__})", "",
                "| key | type | default | description |", "|---|---|---|---|",
                *_field_rows(config, flags=False), ""]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if docs/cli.md is stale")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            sys.exit(f"{args.out} is stale: run python scripts/gen_cli_docs.py")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text):,} characters)")


if __name__ == "__main__":
    main()
