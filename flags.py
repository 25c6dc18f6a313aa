"""Command-line flags from a script's config dataclass, with presets that never override a given flag.

    cfg = flags.parse(Config)     # --name value for every field, typed by its default
    cfg = flags.parse(Config, preset=lambda c: {} if c.model else data.TOY_SFT)  # toy values where no flag was given
"""
import argparse
import dataclasses
import math
import os
import sys

TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")


def boolean(value):
    """A boolean flag's value: true/false, 1/0, yes/no; anything else is an error (a typo such as
    `--resume ture` must not silently mean False)."""
    if value.lower() not in TRUE + FALSE:
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value.lower() in TRUE


class Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line like every other user error (not the usage block)."""

    def error(self, message):
        self.exit(2, f"error: {message}. HINT: {self.prog} --help lists the flags\n")


def parse(cls, argv=None, preset=None, positive=(), non_negative=()):
    """A flat config dataclass -> --name value flags that keep each default's type; unknown
    flags are errors; a boolean flag alone means true. preset(cfg) -> {field: value} fills the
    fields no flag set (the toy run's values): an explicit flag always wins over a preset. Every
    number must be finite, those named in `positive` > 0 and in `non_negative` >= 0."""
    module = sys.modules[cls.__module__]
    p = Parser(prog=os.path.basename(module.__file__), description=module.__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter,
               argument_default=argparse.SUPPRESS)  # the namespace holds only given flags
    for f in dataclasses.fields(cls):
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", nargs="?", const=True, type=boolean)
        else:
            p.add_argument(f"--{f.name}", type={"int": int, "float": float, "str": str}.get(f.type, f.type))
    given = vars(p.parse_args(argv))
    cfg = cls(**given)
    values = preset(cfg) if preset else {}
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    assert not unknown, f"the preset names fields the config lacks: {sorted(unknown)}"
    cfg = dataclasses.replace(cfg, **{k: v for k, v in values.items() if k not in given})
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (
                math.isfinite(v) and (v > 0 or f.name not in positive) and (v >= 0 or f.name not in non_negative)):
            p.error(f"argument --{f.name}: {v} is not " + ("> 0" if f.name in positive else ">= 0" if
                                                             f.name in non_negative else "a finite number"))
    return cfg


def run(main, *args):
    """A command's entry point: a user's mistake (a flag, file, folder or setting: ValueError, OSError,
    KeyError, with a message that says what to do) ends in one line on stderr and exit code 2, not a
    traceback; DEBUG=1 shows the traceback."""
    try:
        return main(*args)
    except (ValueError, OSError, KeyError) as e:
        if os.environ.get("DEBUG"):
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank meets the same mistake
            print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        sys.exit(2)
