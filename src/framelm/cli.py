"""The `framelm` command: one subcommand per stage, plus `run` for a whole pipeline.

Every stage subcommand takes the same options — `--run-dir`, `--config` (a pipeline YAML
whose section for that stage is used), `--set key=value`, `--dry-run`, `--force`, `--quiet` —
plus one flag per simple field of the stage's config dataclass, generated from the dataclass
so that `--help` always lists the real fields with their help text and defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from framelm.errors import FramelmError
from framelm.progress import set_quiet
from framelm.stages import STAGES, Stage

log = logging.getLogger("framelm")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _flag_spec(tp: Any) -> dict[str, Any] | None:
    """argparse keywords for a field type, or None when the field is set with --set only."""
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str, Path):
        return {"type": str if tp is Path else tp}
    if origin is Literal:
        return {"choices": list(typing.get_args(tp))}
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        if item in (int, float, str):
            return {"nargs": "+", "type": item}
    return None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _minimal(value: Any) -> Any:
    """A config value as plain YAML data, keeping only the keys that differ from their defaults
    (a dataclass with none keeps its first key, so that the item is still recognisable)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        fields = [f for f in dataclasses.fields(value) if f.init]
        for f in fields:
            v = getattr(value, f.name)
            if _default(f) is dataclasses.MISSING or v != _default(f):
                out[f.name] = _minimal(v)
        if not out and fields:
            out[fields[0].name] = _minimal(getattr(value, fields[0].name))
        return out
    if isinstance(value, (list, tuple)):
        return [_minimal(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _minimal(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _flow_yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("...").strip()


def _set_arg(assignment: str) -> str:
    """`--set KEY=VALUE` as typed in a shell (quoted when the value needs it)."""
    return f"--set '{assignment}'" if any(c in assignment for c in " []{}*?$'\"|&;<>()") else f"--set {assignment}"


def _simple_example(cls: type, prefix: str = "") -> str | None:
    """`KEY=VALUE` for the first field of `cls` with a flag and a plain, non-empty default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        d = _default(f)
        if _flag_spec(hints[f.name]) is not None and isinstance(d, (int, float, str)) and not isinstance(d, bool) and d != "":
            return f"{prefix}{f.name}={_flow_yaml(d)}"
    return None


def nested_examples(cls: type) -> list[str]:
    """A working `--set ...` example for each field of `cls` that has no flag of its own."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        if _flag_spec(tp) is not None:
            continue
        default = _default(f)
        if dataclasses.is_dataclass(tp):
            sub = _simple_example(tp, f"{f.name}.")
            out.append(_set_arg(f.name + ".KEY=VALUE") + (f" (e.g. {_set_arg(sub)})" if sub else ""))
        elif default is dataclasses.MISSING or default in (None, [], {}):
            value = "[...]" if typing.get_origin(tp) in (list, tuple) else "{KEY: VALUE}"
            shown = "" if default is dataclasses.MISSING else f" (default: {_flow_yaml(_minimal(default))})"
            out.append(_set_arg(f"{f.name}={value}") + shown)
        else:
            value = _flow_yaml(_minimal(default))
            out.append(f"{_set_arg(f'{f.name}={value}')} (default: {value})")
    return out


def set_example(cls: type) -> str:
    """A `--set` example made of one of the config's own fields: a nested one if it has any."""
    hints = typing.get_type_hints(cls)
    nested = (_simple_example(_unwrap_optional(hints[f.name]), f"{f.name}.") for f in dataclasses.fields(cls)
              if dataclasses.is_dataclass(_unwrap_optional(hints[f.name])))
    return next((ex for ex in nested if ex), None) or _simple_example(cls) or "KEY=VALUE"


_MENTIONS_DEFAULT = re.compile(r"\(default\b|[;,] default[ :]|\bthe default is\b", re.IGNORECASE)


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> list[str]:
    """Add one flag per simple field of `cls`; return the field names added."""
    hints = typing.get_type_hints(cls)
    names = []
    group = parser.add_argument_group(f"{cls.__name__} fields (override the config file)")
    for f in dataclasses.fields(cls):
        spec = _flag_spec(hints[f.name])
        if spec is None:
            continue
        default = _default(f)
        if default is dataclasses.MISSING:
            default = "required"
        help_text = f.metadata.get("help", "")
        if not dataclasses.is_dataclass(default) and not _MENTIONS_DEFAULT.search(help_text):
            help_text += f" (default: {default})"  # shown once: some help texts say their default in words
        help_text = help_text.replace("%", "%%")  # argparse treats help as a %-format string
        if spec.get("action") is None and "choices" not in spec:
            spec["metavar"] = f.name.upper()
        group.add_argument("--" + f.name.replace("_", "-"), dest=f"cfg_{f.name}", default=None, help=help_text, **spec)
        names.append(f.name)
    nested = nested_examples(cls)
    if nested:
        # descriptions, unlike help strings, are %-formatted only when they hold "%(prog)"
        group.description = "Settings without a flag of their own are set with --set: " + "; ".join(nested)
    return names


def item_keys(cls: type) -> str:
    """For each field of `cls` that holds config objects (a list of them, as schedule's
    strategies), the keys one such object takes, with their help: a config file needs them and
    no flag shows them."""
    hints = typing.get_type_hints(cls)
    parts = []
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        listed = typing.get_origin(tp) is list
        item = typing.get_args(tp)[0] if listed and typing.get_args(tp) else tp
        if not dataclasses.is_dataclass(item):
            continue
        lines = [f"Keys of {'each item of ' if listed else ''}'{f.name}' ({item.__name__}):"]
        for sub in dataclasses.fields(item):
            default = _default(sub)
            shown = "" if default is dataclasses.MISSING or default in ("", [], {}, None) else f" (default: {_flow_yaml(_minimal(default))})"
            lines.append(f"  {sub.name}: {sub.metadata.get('help', '')}{shown}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


class _HelpFormatter(argparse.HelpFormatter):
    """Fills each line of a description on its own; an indented line is a list entry."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for line in text.split("\n"):
            hanging = "    " if line.startswith("  ") else ""
            out.append(textwrap.fill(" ".join(line.split()), width, initial_indent=indent + hanging[:2],
                                     subsequent_indent=indent + hanging) if line.strip() else "")
        return "\n".join(out)


def _common_flags(p: argparse.ArgumentParser, config_flag: bool = True, example: str = "model.n_layers=4") -> None:
    if config_flag:
        p.add_argument("--config", metavar="YAML", help="pipeline config file; its section for this stage is used")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, dotted for nested keys (repeatable), e.g. {_set_arg(example)}".replace("%", "%%"))
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and whether the stage would run, then stop")
    p.add_argument("--force", action="store_true", help="run even if the stage is up to date (compare: "
                   "retrain and re-evaluate every run too)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")


def _add_stage_parser(subparsers: Any, stage: Stage, words: tuple[str, ...], selected: bool) -> None:
    p = subparsers.add_parser(words[0], help=stage.help, description=stage.description, formatter_class=_HelpFormatter)
    if not selected:
        return  # flags come from the config class, imported only for the command being run
    cls = stage.config_class()
    p.epilog = item_keys(cls) or None
    p.add_argument("--run-dir", help="run directory (default: run_dir from --config)"
                   + ("; created if missing" if stage.name == "ingest" else "; must already exist (started by framelm ingest)"))
    _common_flags(p, example=set_example(cls))
    fields = add_config_flags(p, cls)
    p.set_defaults(handler=_run_stage_command, stage=stage.name, fields=fields)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser for the command named in `argv`; other commands get only their help line."""
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    from framelm import __version__

    parser = argparse.ArgumentParser(
        prog="framelm",
        description="Turn a pretraining corpus into a FRAME multi-stage curriculum and measure whether it helps. "
                    "Stages run in this order: " + " -> ".join(s.name for s in STAGES.values()) + ".",
    )
    parser.add_argument("--version", action="version", version=f"framelm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run_p = sub.add_parser("run", help="run the stages a pipeline config names, in order, skipping finished ones")
    run_p.add_argument("config", help="pipeline YAML (keys: run_dir, stages, one section per stage)")
    run_p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages of the config")
    _common_flags(run_p, config_flag=False, example="tokenizer.vocab_size=2048")
    run_p.set_defaults(handler=_run_pipeline_command)

    groups: dict[str, Any] = {}
    for stage in STAGES.values():
        if len(stage.words) == 1:
            _add_stage_parser(sub, stage, stage.words, words[:1] == [stage.words[0]])
        else:
            head, tail = stage.words[0], stage.words[1:]
            if head not in groups:
                gp = sub.add_parser(head, help=f"{head} commands")
                groups[head] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            _add_stage_parser(groups[head], stage, tail, words[:2] == list(stage.words))
    return parser


def _setup_logging(quiet: bool) -> None:
    if quiet:
        set_quiet()
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)


def _run_stage_command(args: argparse.Namespace) -> None:
    from framelm.config import ConfigError, apply_override
    from framelm.pipeline import build_config, load_pipeline, run_stage
    from framelm.rundir import RunDir

    section: dict[str, Any] = {}
    from_file: Any = {}
    run_dir = args.run_dir
    if args.config:
        cfg_run_dir, _, data = load_pipeline(args.config, need_run_dir=not run_dir)
        from_file = data.get(args.stage) or {}
        if not isinstance(from_file, dict):
            _blame_config_file(args.config, args.stage, from_file)
        section = dict(from_file)
        run_dir = run_dir or str(cfg_run_dir)
    for name in args.fields:
        value = getattr(args, f"cfg_{name}")
        if value is not None:
            section[name] = value
    for o in args.overrides:
        apply_override(section, o[len(args.stage) + 1:] if o.startswith(args.stage + ".") else o)
    if not run_dir:
        raise FramelmError(f"give a run directory: framelm {args.stage} --run-dir runs/NAME ... (or --config with run_dir)")
    try:
        cfg = build_config(args.stage, section)
    except ConfigError as exc:
        if args.config:
            _blame_config_file(args.config, args.stage, from_file, exc)
        raise
    run = RunDir(run_dir) if args.stage == "ingest" else existing_run_dir(run_dir)
    counts = run_stage(args.stage, cfg, run, force=args.force, dry_run=args.dry_run)
    if not args.dry_run:
        _print_counts(args.stage, counts)


def _blame_config_file(path: str, stage: str, from_file: Any, error: Exception | None = None) -> None:
    """Raise the config error of the file's own section for `stage`, naming the file, if that
    section alone gives `error` (any error, when None): a bad flag or --set is not the file's."""
    from framelm.config import ConfigError
    from framelm.pipeline import build_config

    try:
        build_config(stage, from_file)
    except ConfigError as alone:
        if error is None or str(alone) == str(error):
            raise ConfigError(f"{path}: {alone}") from None


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll reports an error)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no real stdout
        return False


def existing_run_dir(run_dir: str | Path) -> Any:
    """The RunDir of a run that `framelm ingest` started; refuses (creating nothing) a path
    that does not exist or has no manifest.json, which is usually a typo."""
    from framelm.rundir import MANIFEST, RunDir

    if not (Path(run_dir).expanduser() / MANIFEST).is_file():
        raise FramelmError(f"no run directory at {run_dir} (no {MANIFEST}); start one with framelm ingest --run-dir {run_dir}")
    return RunDir(run_dir, create=False)


def _print_counts(stage: str, counts: dict[str, Any]) -> None:
    summary = counts.get("summary")
    if isinstance(summary, str):
        print(summary)
    else:
        shown = {k: v for k, v in counts.items() if not isinstance(v, (dict, list))}
        print(f"{stage}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))


def _run_pipeline_command(args: argparse.Namespace) -> None:
    from framelm.config import ConfigError
    from framelm.pipeline import build_config, load_pipeline, run_pipeline

    _, stages, data = load_pipeline(args.config, args.overrides)  # its errors name the file already
    for s in stages:  # check every section first, so that an error names the YAML file
        try:
            build_config(s, data.get(s))
        except ConfigError as exc:
            raise ConfigError(f"{args.config}: {exc}") from None
    results = run_pipeline(args.config, args.overrides, only=args.only, force=args.force, dry_run=args.dry_run)
    if not args.dry_run:
        for stage, counts in results.items():
            _print_counts(stage, counts)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if "--quiet" in words:
        set_quiet()  # before anything imports tqdm, which reads the switch once, on import
    try:
        return _run_command(words)
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # another pipe broke (a worker process died): that is a failure to show
        # the reader went away (`--dry-run | head`): nothing left to say to it; stdout goes to
        # /dev/null so that Python's flush at exit does not fail on the same pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as for a command the signal stopped
    except FramelmError as exc:
        print(f"framelm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("framelm: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def _run_command(words: list[str]) -> int:
    # Building the parser can fail too: a default read from the environment (score's rank) shows in --help.
    parser = build_parser(words)
    args = parser.parse_args(words)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    _setup_logging(getattr(args, "quiet", False))
    from framelm.rundir import INVOCATION, invocation

    command = INVOCATION.set(invocation(words))
    try:
        args.handler(args)
    finally:
        INVOCATION.reset(command)
    sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    return 0


if __name__ == "__main__":
    sys.exit(main())
