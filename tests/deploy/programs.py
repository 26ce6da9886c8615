"""What the project's programs accept, read from their click commands: the console scripts of
pyproject.toml, their options, the environment variables the options read, their port options.
"""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import click

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def console_scripts() -> dict[str, str]:
    return tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]


def command_of(script: str) -> click.Command:
    """The click command behind a console script: the entry point itself when it is a click
    command, else the one click group or command its module defines at top level."""
    module_name, attribute = console_scripts()[script].split(":")
    module = importlib.import_module(module_name)
    entry = getattr(module, attribute)
    if isinstance(entry, click.Command):
        return entry
    commands = {id(v): v for v in vars(module).values() if isinstance(v, click.Command)}
    groups = [v for v in commands.values() if isinstance(v, click.Group)]
    below = {id(sub) for group in groups for sub in group.commands.values()}
    top = {key: v for key, v in commands.items() if isinstance(v, click.Group) and key not in below}
    if len(top) == 1:  # a group, its subgroups and subcommands: the top group is the program
        commands = top
    if len(commands) != 1:
        raise AssertionError(f"{script}: cannot tell which click command {module_name} runs")
    return next(iter(commands.values()))


def resolve(command: click.Command, args: list[str]) -> tuple[click.Command, list[str]]:
    """The subcommand that ``args`` name (for groups such as ``rest``) and its own arguments."""
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        with click.Context(command) as ctx:
            sub = command.get_command(ctx, args[0])
        if sub is None:
            raise AssertionError(f"{command.name} has no subcommand {args[0]!r}")
        command, args = sub, args[1:]
    return command, args


def parse(command: click.Command, args: list[str]) -> dict:
    """The option values ``args`` give, parsed by the command's own parser: an unknown option,
    a missing value or a value of the wrong type fails. Checks that need the machine the program
    runs on (that a path exists) are left out."""
    values: dict = {}
    parser = command.make_parser(click.Context(command))
    opts, extra, _ = parser.parse_args(list(args))
    if extra:
        raise AssertionError(f"{command.name}: unexpected arguments {extra}")
    for param in command.params:
        if param.name in opts:
            raw = opts[param.name]
            kind = param.type
            if isinstance(kind, click.Path):
                values[param.name] = raw
            elif getattr(param, "multiple", False):
                values[param.name] = tuple(kind.convert(v, param, None) for v in raw)
            else:
                values[param.name] = kind.convert(raw, param, None) if raw is not None else None
    return values


def environment_variables(command: click.Command) -> set[str]:
    """The variables the command's options read: click's ``envvar``, or the one a callback says
    it reads (``callback.envvar``: a callback that reads a variable click would mishandle)."""
    names: set[str] = set()
    for param in command.params:
        envvar = getattr(param, "envvar", None) or getattr(param.callback, "envvar", None)
        if isinstance(envvar, str):
            names.add(envvar)
        elif envvar:
            names.update(envvar)
    return names


def option_names(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
