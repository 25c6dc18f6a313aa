"""Command-line flags from a script's config dataclass, with presets that never override a given flag.

    cfg = flags.parse(Config)     # --name value for every field, typed by its default
    cfg = flags.parse(Config, preset=lambda c: {} if c.model else data.TOY_SFT)  # toy values where no flag was given

--help groups the flags under the dataclass's `# ---- group` comments and shows each field's own
comment and default. --config FILE.toml sets fields from a file (keys are the flags' names, at the
top level or in [sections]); an explicit flag wins over the file, the file over a preset.
"""
import argparse
import dataclasses
import inspect
import math
import os
import re
import sys
import textwrap
import tomllib

TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")
argv_parsed = []  # the command line parse() read last: args.json records it, a stopped run's resume line repeats it


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


def field_docs(cls):
    """{field: (group, comment)} from the config class's source: the `# ---- group` line above a
    field and the comment after it, so --help says what the code says."""
    names, group, docs = {f.name for f in dataclasses.fields(cls)}, "", {}
    for line in inspect.getsource(cls).splitlines():
        header = re.match(r"\s*# ----\s*(.*)", line)
        field = re.match(r"\s*(\w+)\s*:[^=]*=.*?(?:#\s*(.*))?$", line)
        if header:
            group = header.group(1)
        elif field and field.group(1) in names:
            docs[field.group(1)] = (group, field.group(2) or "")
    return docs


def parser_for(cls, preset=None):
    """argparse for a flat config dataclass: one --flag per field, grouped as the class groups them;
    the preset's values for the default config (the toy run) close the help."""
    module = sys.modules[cls.__module__]
    toy = preset(cls()) if preset else {}
    pairs = ", ".join(f"--{k}\xa0{str(v).lower() if isinstance(v, bool) else v}" for k, v in toy.items())
    p = Parser(prog=os.path.basename(module.__file__), description=module.__doc__,  # \xa0: a flag keeps its value
               epilog=textwrap.fill("with no --model, the toy run's preset fills the flags not given: " + pairs,
                                    100).replace("\xa0", " ") if toy else None,
               formatter_class=argparse.RawDescriptionHelpFormatter,
               argument_default=argparse.SUPPRESS)  # the namespace holds only given flags
    p.add_argument("--config", metavar="FILE.toml", help="read flags from a TOML file (keys are flag names); "
                                                         "flags on the command line win")
    groups, docs = {}, field_docs(cls)
    for f in dataclasses.fields(cls):
        group, comment = docs.get(f.name, ("", ""))
        if group not in groups:
            groups[group] = p.add_argument_group(group or None)
        shown = str(f.default).lower() if isinstance(f.default, bool) else f.default if f.default != "" else '""'
        text = f"{comment} (default: {shown})" if comment else f"default: {shown}"
        text = text.replace("%", "%%")  # argparse formats help with %
        if f.type in (bool, "bool"):
            groups[group].add_argument(f"--{f.name}", nargs="?", const=True, type=boolean, metavar="BOOL", help=text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            groups[group].add_argument(f"--{f.name}", type=kind, metavar=kind.__name__.upper(), help=text)
    return p


def read_config_file(path, cls):
    """{field: value} from a TOML file; every key must be a field, every value of the field's type."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}. HINT: pass a TOML file of flag = value lines") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: not valid TOML ({e}). HINT: write lines such as lr = 1e-4") from None
    values = {}
    for key, value in table.items():  # [sections] only group keys, as the --help groups do
        for k, v in (value if isinstance(value, dict) else {key: value}).items():
            if k in values:
                raise ValueError(f"--config {path}: {k} is set twice. HINT: keep one {k} = ... line")
            values[k] = v
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"--config {path}: unknown key {key!r}. HINT: the keys are the flags' names (see --help)")
        want = type(fields[key].default)
        if not (isinstance(value, want) and (want is bool or not isinstance(value, bool))
                or want is float and isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"--config {path}: {key} = {value!r} is not {'an' if want is int else 'a'} "
                             f"{want.__name__}. HINT: e.g. {key} = {fields[key].default!r}".replace("'", '"'))
    return {k: float(v) if type(fields[k].default) is float else v for k, v in values.items()}


def parse(cls, argv=None, preset=None, positive=(), non_negative=()):
    """A flat config dataclass -> --name value flags that keep each default's type; unknown
    flags are errors; a boolean flag alone means true. Values come from, first to last: a flag,
    --config's file, preset(cfg) -> {field: value} (the toy run's values), the default. Every
    number must be finite, those named in `positive` > 0 and in `non_negative` >= 0."""
    global argv_parsed
    argv_parsed = list(sys.argv[1:] if argv is None else argv)
    p = parser_for(cls, preset)
    given = vars(p.parse_args(argv))
    given = {**(read_config_file(given.pop("config"), cls) if "config" in given else {}), **given}
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
    traceback; DEBUG=1 shows the traceback. A Ctrl-C that stops at once ends in one line and 130."""
    try:
        return main(*args)
    except KeyboardInterrupt:
        if os.environ.get("DEBUG"):
            raise
        if os.environ.get("RANK", "0") == "0":
            print("error: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, KeyError) as e:
        if os.environ.get("DEBUG"):
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank meets the same mistake
            print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        sys.exit(2)
