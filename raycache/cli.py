"""The ``raycache`` console script and the entry point of every ``jobs/*.py`` script.

Flags are generated from the stage's pydantic config (``raycache.config``), so the CLI, the jobs and
a YAML config file can never disagree: ``--batch-size`` sets ``batch_size``; nested sections get
``--section.field`` (and the bare ``--field`` when no other field has that name); ``--config FILE``
reads the YAML's section for the stage (plus its shared ``encoder`` / ``cache`` sections).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import types
import typing
from typing import Any, Callable, Optional, Sequence

from pydantic import BaseModel

from raycache import config as C

# subcommand -> (module with run(cfg), config class, one-line help)
STAGES: dict[str, tuple[str, type[BaseModel], str]] = {
    "generate": ("raycache.workload", C.GenerateConfig, "write the embedded default workload (prompts, pairs, stream)"),
    "mine": ("raycache.mining", C.MineConfig, "mine candidate pairs (kNN under the base encoder + random)"),
    "label": ("raycache.labeling.job", C.LabelConfig, "label pairs with an LLM teacher (P(yes))"),
    "train": ("raycache.training.job", C.TrainConfig, "fine-tune the encoder on labelled pairs (Ray Train)"),
    "evaluate": ("raycache.evaluation", C.EvaluateConfig, "ROC-AUC / AP of cosine similarity per model"),
    "serve": ("raycache.service.app", C.ServeConfig, "run the embedding + cache HTTP service (Ray Serve)"),
    "simulate": ("raycache.simulation", C.SimulateConfig, "replay a prompt stream through the cache"),
    "calibrate": ("raycache.calibration", C.CalibrateConfig,
                  "choose the threshold for a per-request false-hit budget on a labelled stream"),
    "pipeline": ("raycache.pipeline", C.PipelineConfig, "the main job, end to end, with a report"),
}

# YAML sections that are shared: a stage's nested field of this name also reads the top-level section.
SHARED_SECTIONS = ("encoder", "cache", "read")


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for Optional[X] / X | None."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _leaf_fields(model: type[BaseModel], prefix: tuple[str, ...] = ()):
    for name, field in model.model_fields.items():
        tp, _ = _unwrap(field.annotation)
        if _is_model(tp):
            yield from _leaf_fields(tp, prefix + (name,))
        else:
            yield prefix + (name,), field, field.annotation


def _parse_value(tp: Any, optional: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        return text

    return parse


def build_parser(stage: str, prog: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, tuple]]:
    """Parser for one stage; returns it and a map dest -> field path."""
    module, model, help_text = STAGES[stage]
    parser = argparse.ArgumentParser(prog=prog or f"raycache {stage}", description=help_text,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML config file (see raycache/default_config.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    leaves = list(_leaf_fields(model))
    counts: dict[str, int] = {}
    for path, _, _ in leaves:
        counts[path[-1]] = counts.get(path[-1], 0) + 1
    taken = {"config", "verbose"}
    dests: dict[str, tuple] = {}
    for path, field, tp in leaves:
        inner, optional = _unwrap(tp)
        dest = "__".join(path)
        flags = []
        short = path[-1].replace("_", "-")
        if path == ("models",):
            short = "model"
        if path == ("from_stage",):
            flags.append("--from")
        if path == ("to_stage",):
            flags.append("--to")
        if (len(path) == 1 or counts[path[-1]] == 1) and short.replace("-", "_") not in taken:
            flags.append(f"--{short}")
            taken.add(short.replace("-", "_"))
        if len(path) > 1:
            flags.append("--" + ".".join(p.replace("_", "-") for p in path))
        help_ = (field.description or "").replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": dest, "help": help_, "default": argparse.SUPPRESS}
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) is list:
            (item,) = typing.get_args(inner) or (str,)
            kwargs["action"] = "append"
            kwargs["type"] = _parse_value(item, False)
        else:
            kwargs["type"] = _parse_value(inner, optional)
            if typing.get_origin(inner) is typing.Literal:
                kwargs["choices"] = list(typing.get_args(inner))
                kwargs["type"] = str
        if field.is_required():
            help_ += " (required)"
            kwargs["help"] = help_
        parser.add_argument(*flags, **kwargs)
        dests[dest] = path
    return parser, dests


def config_from_args(stage: str, argv: Sequence[str] | None = None) -> BaseModel:
    """Build the stage's config from ``--config`` YAML layered under the flags in argv."""
    parser, dests = build_parser(stage)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = STAGES[stage][1]
    yaml_cfg = C.load_yaml(args.config)
    layer: dict[str, Any] = {}
    for section in SHARED_SECTIONS:
        if section in model.model_fields and isinstance(yaml_cfg.get(section), dict):
            layer[section] = yaml_cfg[section]
    section_cfg = yaml_cfg.get(stage, {}) or {}
    flags: dict[str, Any] = {}
    if args.verbose and "verbose" in model.model_fields:  # -v also reaches a stage's own verbose field
        flags["verbose"] = True
    for dest, value in vars(args).items():
        if dest in dests:
            node = flags
            path = dests[dest]
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
    return C.build_config(model, layer, section_cfg, flags)


def run_stage(stage: str, cfg: BaseModel) -> Any:
    module = importlib.import_module(STAGES[stage][0])
    return module.run(cfg)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: printed as one line, exit code 2, no traceback."""
    from raycache.data import DataError
    from raycache.encoder import EncoderError
    from raycache.labeling.backends import TeacherError
    from raycache.labeling.job import ErrorRateExceeded

    return (C.ConfigError, DataError, EncoderError, TeacherError, ErrorRateExceeded)


def run_job(stage: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jobs/<stage>.py`` and of ``raycache <stage>``: parse, run, print a summary."""
    try:
        cfg = config_from_args(stage, argv)
        result = run_stage(stage, cfg)
    except user_errors() as exc:
        print(f"raycache {stage}: error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print("usage: raycache {" + ",".join(STAGES) + "} [flags]   (raycache STAGE --help)\n")
        for name, (_, _, help_text) in STAGES.items():
            print(f"  {name:<10} {help_text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return run_job(argv[0], argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
