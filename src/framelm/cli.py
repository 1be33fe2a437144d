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
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from framelm.errors import FramelmError
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


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> list[str]:
    """Add one flag per simple field of `cls`; return the field names added."""
    hints = typing.get_type_hints(cls)
    names = []
    group = parser.add_argument_group(f"{cls.__name__} fields (override the config file)")
    for f in dataclasses.fields(cls):
        spec = _flag_spec(hints[f.name])
        if spec is None:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "required"
        help_text = f.metadata.get("help", "")
        if not dataclasses.is_dataclass(default):
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse treats help as a %-format string
        if spec.get("action") is None and "choices" not in spec:
            spec["metavar"] = f.name.upper()
        group.add_argument("--" + f.name.replace("_", "-"), dest=f"cfg_{f.name}", default=None, help=help_text, **spec)
        names.append(f.name)
    nested = [f.name for f in dataclasses.fields(cls) if _flag_spec(hints[f.name]) is None]
    if nested:
        group.description = "Nested settings (" + ", ".join(nested) + ") are set with --set, e.g. --set " + nested[0] + ".KEY=VALUE"
    return names


def _common_flags(p: argparse.ArgumentParser, config_flag: bool = True) -> None:
    if config_flag:
        p.add_argument("--config", metavar="YAML", help="pipeline config file; its section for this stage is used")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted for nested keys (repeatable), e.g. --set model.n_layers=4")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and whether the stage would run, then stop")
    p.add_argument("--force", action="store_true", help="run even if the stage is up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")


def _add_stage_parser(subparsers: Any, stage: Stage, words: tuple[str, ...], selected: bool) -> None:
    p = subparsers.add_parser(words[0], help=stage.help, description=stage.help)
    if not selected:
        return  # flags come from the config class, imported only for the command being run
    p.add_argument("--run-dir", help="run directory (default: run_dir from --config)")
    _common_flags(p)
    fields = add_config_flags(p, stage.config_class())
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
    _common_flags(run_p, config_flag=False)
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
        os.environ["TQDM_DISABLE"] = "1"
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)


def _run_stage_command(args: argparse.Namespace) -> None:
    from framelm.config import apply_override, load_yaml
    from framelm.pipeline import build_config, load_pipeline, run_stage

    section: dict[str, Any] = {}
    run_dir = args.run_dir
    if args.config:
        cfg_run_dir, _, data = load_pipeline(args.config)
        section = dict(data.get(args.stage) or {})
        run_dir = run_dir or str(cfg_run_dir)
    for name in args.fields:
        value = getattr(args, f"cfg_{name}")
        if value is not None:
            section[name] = value
    for o in args.overrides:
        apply_override(section, o[len(args.stage) + 1:] if o.startswith(args.stage + ".") else o)
    if not run_dir:
        raise FramelmError(f"give a run directory: framelm {args.stage} --run-dir runs/NAME ... (or --config with run_dir)")
    cfg = build_config(args.stage, section)
    counts = run_stage(args.stage, cfg, run_dir, force=args.force, dry_run=args.dry_run)
    if not args.dry_run:
        _print_counts(args.stage, counts)


def _print_counts(stage: str, counts: dict[str, Any]) -> None:
    summary = counts.get("summary")
    if isinstance(summary, str):
        print(summary)
    else:
        shown = {k: v for k, v in counts.items() if not isinstance(v, (dict, list))}
        print(f"{stage}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))


def _run_pipeline_command(args: argparse.Namespace) -> None:
    from framelm.pipeline import run_pipeline

    results = run_pipeline(args.config, args.overrides, only=args.only, force=args.force, dry_run=args.dry_run)
    if not args.dry_run:
        for stage, counts in results.items():
            _print_counts(stage, counts)


def main(argv: list[str] | None = None) -> int:
    if "--quiet" in (sys.argv[1:] if argv is None else argv):
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it when first imported, before flags are parsed
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    _setup_logging(getattr(args, "quiet", False))
    try:
        args.handler(args)
    except FramelmError as exc:
        print(f"framelm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("framelm: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
