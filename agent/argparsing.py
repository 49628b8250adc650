"""One argparse parser for every edgefleet command line: exact flags only, and a suggestion for a typo.

argparse on its own takes ``--epoch 3`` for ``--epochs`` (prefix matching), and hands a subcommand's
unknown flags back to the top-level parser, which then prints the top-level usage, or a misleading
"one of the arguments ... is required". :class:`StrictParser` refuses abbreviations and reports an
unknown flag or subcommand in one line, from the parser it was given to, with the closest valid
spelling::

    edgefleet publish: unknown flag --hots; did you mean --host?
    edgefleet: unknown command 'pubish'; did you mean 'publish'?

Every other usage error (a missing required argument, a bad value) stays argparse's, printed by the
subcommand's own parser. This module is shared by the agent, deploy and the compressor, so it imports
nothing but the standard library.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NoReturn, TypeVar, overload

_N = TypeVar("_N")
_NUMBER = re.compile(r"-\d+|-\d*\.\d+")  # a negative number is a value, not a flag


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``word``, or None when nothing is close enough to be a typo of it."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


class StrictParser(argparse.ArgumentParser):
    """An ArgumentParser without prefix matching whose unknown flags and subcommands get a suggestion.

    Subparsers made with :meth:`add_subparsers` are of the same class (so a subclass's exit code and
    messages apply at every level) and report their own unknown flags.
    """

    # argparse's exit status for a usage error; a CLI with another convention overrides it.
    usage_exit: ClassVar[int] = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self._argv: list[str] = []  # what the current parse was given, to name an unknown flag first
        self._commands: Iterable[str] = ()

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", type(self))
        kwargs.setdefault("action", _StrictSubParsersAction)
        action = super().add_subparsers(**kwargs)
        self._commands = action.choices
        return action

    @overload
    def parse_known_args(
        self, args: Iterable[str] | None = None, namespace: None = None
    ) -> tuple[argparse.Namespace, list[str]]: ...
    @overload
    def parse_known_args(self, args: Iterable[str] | None, namespace: _N) -> tuple[_N, list[str]]: ...
    @overload
    def parse_known_args(self, *, namespace: _N) -> tuple[_N, list[str]]: ...
    def parse_known_args(self, args: Iterable[str] | None = None, namespace: Any = None) -> Any:
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._argv, namespace)

    @overload
    def parse_args(self, args: Iterable[str] | None = None, namespace: None = None) -> argparse.Namespace: ...
    @overload
    def parse_args(self, args: Iterable[str] | None, namespace: _N) -> _N: ...
    @overload
    def parse_args(self, *, namespace: _N) -> _N: ...
    def parse_args(self, args: Iterable[str] | None = None, namespace: Any = None) -> Any:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.unknown_arguments(extras)
        return parsed

    def error(self, message: str) -> NoReturn:
        # A typo'd flag explains a "required" or "expected one argument" error better than argparse does.
        unknown = self.unknown_flags(self._argv)
        if unknown:
            self.unknown_arguments(unknown)
        self.print_usage(sys.stderr)
        self.exit(self.usage_exit, f"{self.prog}: error: {message}\n")

    def unknown_arguments(self, extras: Sequence[str]) -> NoReturn:
        """Exit with one line naming the first argument this parser does not take, and a suggestion."""
        word = extras[0]
        if word.startswith(tuple(self.prefix_chars)) and len(word) > 1:
            flag = word.split("=", 1)[0]
            guess = closest(flag, self.visible_flags())
            hint = f"; did you mean {guess}?" if guess else f" (see {self.prog} --help)"
            self.exit(self.usage_exit, f"{self.prog}: unknown flag {flag}{hint}\n")
        self.exit(self.usage_exit, f"{self.prog}: unexpected argument {word!r} (see {self.prog} --help)\n")

    def unknown_command(self, name: str, commands: Iterable[str]) -> NoReturn:
        # ``--confg x``: a typo before the "command" made x look like one (flags after it are its own)
        before = self._argv[: self._argv.index(name)] if name in self._argv else self._argv
        unknown = self.unknown_flags(before)
        if unknown:
            self.unknown_arguments(unknown)
        guess = closest(name, commands)
        hint = f"; did you mean {guess!r}?" if guess else f" (choose from {', '.join(commands)})"
        self.exit(self.usage_exit, f"{self.prog}: unknown command {name!r}{hint}\n")

    def unknown_flags(self, argv: Sequence[str]) -> list[str]:
        """The flags in ``argv`` this parser does not define, up to ``--`` or a subcommand's name."""
        commands = set(self._commands)
        out = []
        for word in argv:
            if word == "--" or word in commands:
                break
            if not word.startswith(tuple(self.prefix_chars)) or len(word) < 2 or _NUMBER.fullmatch(word):
                continue
            flag = word.split("=", 1)[0]
            known = self._option_string_actions
            if flag not in known and not (len(flag) > 2 and flag[1] != flag[0] and flag[:2] in known):
                out.append(word)  # (``-vv``, ``-n3``: a short flag with its value or repeats is known)
        return out

    def visible_flags(self) -> list[str]:
        """The option strings this parser documents (hidden options are never suggested)."""
        return [
            flag
            for action in self._actions
            if action.help != argparse.SUPPRESS
            for flag in action.option_strings
        ]


class _OpenChoices(Mapping[str, argparse.ArgumentParser]):
    """The subcommand table as argparse's ``choices``: it lists the commands (usage, help) but lets
    any name through argparse's own check, so the action reports an unknown one with a suggestion."""

    def __init__(self, table: dict[str, argparse.ArgumentParser]) -> None:
        self._table = table

    def __getitem__(self, key: str) -> argparse.ArgumentParser:
        return self._table[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, key: object) -> bool:
        return True


class _StrictSubParsersAction(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Subcommand dispatch that reports an unknown command, and the chosen subparser's leftovers, itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # typeshed declares a dict; argparse only iterates choices and tests membership
        self.choices = _OpenChoices(self._name_parser_map)  # type: ignore[assignment]

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        assert isinstance(values, list)  # nargs=PARSER: the command, then its arguments
        name = values[0]
        if name not in self._name_parser_map:
            if isinstance(parser, StrictParser):
                parser.unknown_command(name, list(self._name_parser_map))
            parser.error(f"unknown command {name!r}")
        super().__call__(parser, namespace, values, option_string)
        extras = vars(namespace).pop(argparse._UNRECOGNIZED_ARGS_ATTR, None)
        if extras:
            sub = self._name_parser_map[name]
            if isinstance(sub, StrictParser):
                sub.unknown_arguments(extras)
            sub.error(f"unrecognized arguments: {' '.join(extras)}")
