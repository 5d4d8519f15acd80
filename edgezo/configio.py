"""Load validated dataclass configs from YAML/dicts: unknown keys rejected, errors name the field.

Every config object in edgezo is a plain dataclass whose fields carry ``metadata={"help": ...}``
and whose ``__post_init__`` (or ``validate``) checks cross-field rules. This module turns a
mapping into such a dataclass (nested dataclasses, lists and mappings included), collecting
*all* problems — unknown keys, values of the wrong type, missing fields, and the problems the
class's own checks report through :class:`Problems` — into one error, one line per field with
what is wrong and its fix.

YAML is read with a safe loader that also refuses aliases (``*name``: a few lines of aliases
can expand to billions of nodes) and reports deep nesting, bad encodings and empty files as a
:class:`~edgezo.errors.ConfigError`; ``key=value`` overrides are parsed as YAML scalars or, when
they are not one (``data=@notes``, ``seed=!!python/object:...``), kept as the plain string.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError, EdgezoError

T = TypeVar("T")


def field_help(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


# -- problems: every one at once, in one format -------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: the ``field`` (``lr``, ``inputs[0].shape``; empty for
    the input as a whole), ``what`` is wrong with it, and the ``fix``."""

    field: str
    what: str
    fix: str

    def line(self) -> str:
        return f"{self.field} {self.what}" if self.field else self.what


class Problems:
    """Collects the problems of one input (a config file, a manifest) and raises them as one
    error of class ``error``: the first line says ``where``, then one line per problem with
    its fix.

    >>> p = Problems("run.yaml")
    >>> p.add("lr", "must be > 0, got -1.0", "use a positive learning rate, e.g. lr=1e-3")
    >>> p.check()   # raises ConfigError("run.yaml: lr must be > 0, got -1.0", fix=...)

    A config class's ``__post_init__`` can raise ``Problems().error()`` (no ``where``):
    :func:`from_dict` then merges those problems with its own and names the file.
    """

    def __init__(
        self, where: str = "", error: type[EdgezoError] = ConfigError, fix: str | None = None
    ):
        self.where = where
        self.error_class = error
        self.fix = fix
        self.items: list[Problem] = []

    def add(self, field: str, what: str, fix: str) -> None:
        self.items.append(Problem(field, what, fix))

    def extend(self, problems: typing.Iterable[Problem], prefix: str = "") -> None:
        """Add ``problems``, their fields prefixed by ``prefix`` (``inputs[0]``)."""
        for p in problems:
            field = f"{prefix}.{p.field}" if prefix and p.field else (p.field or prefix)
            self.add(field, p.what, p.fix)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.items)

    def error(self) -> EdgezoError:
        """The error listing every problem (``.problems`` holds them)."""
        head = f"{self.where}: " if self.where else ""
        if len(self.items) == 1:
            p = self.items[0]
            err = self.error_class(f"{head}{p.line()}", self.fix or p.fix)
        else:
            shared = self.fix is not None and all(p.fix == self.fix for p in self.items)
            lines = "\n".join(
                f"  - {p.line()}" + ("" if shared else f"\n      fix: {p.fix}") for p in self.items
            )
            err = self.error_class(
                f"{head}{len(self.items)} problems:\n{lines}",
                self.fix or "correct each of them as its own fix says",
            )
        err.problems = list(self.items)
        return err

    def check(self) -> None:
        """Raise :meth:`error` if any problem was added."""
        if self.items:
            raise self.error()


_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60
_SHOW.maxlevel = 3


def show(value: Any) -> str:
    """A short, safe ``repr`` for messages (hostile values may be huge or deeply nested)."""
    try:
        return _SHOW.repr(value)
    except (RecursionError, ValueError):  # ValueError: an int too long to print
        return f"<a {type(value).__name__}>"


# -- unknown keys: suggestions that make sense -----------------------------------------------------

#: Common names for edgezo's fields in other tools (PyTorch and HF trainers, MeZO, ...): an
#: unknown key that is one of these suggests the field, before any spelling similarity.
ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "lr_rate": "lr",
    "eta": "lr",
    "step_size": "lr",
    "epsilon": "mu",
    "zo_eps": "mu",
    "perturbation_scale": "mu",
    "perturbation_size": "mu",
    "num_steps": "steps",
    "max_steps": "steps",
    "n_steps": "steps",
    "train_steps": "steps",
    "iterations": "steps",
    "iters": "steps",
    "batch": "batch_size",
    "bs": "batch_size",
    "train_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "eval_batch": "eval_batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "num_directions": "q",
    "n_directions": "q",
    "directions": "q",
    "num_perturbations": "q",
    "n_perturbations": "q",
    "random_seed": "seed",
    "rng_seed": "seed",
    "optim": "optimizer",
    "beta1": "adam_beta1",
    "beta2": "adam_beta2",
    "wd": "weight_decay",
    "scheduler": "schedule",
    "lr_schedule": "schedule",
    "lr_scheduler_type": "schedule",
    "warmup": "warmup_steps",
    "num_warmup_steps": "warmup_steps",
    "grad_clip": "clip",
    "clip_grad": "clip",
    "max_grad_norm": "clip",
    "model": "bundle",
    "model_dir": "bundle",
    "bundle_dir": "bundle",
    "train_data": "data",
    "train_file": "data",
    "dataset": "data",
    "eval_file": "eval_data",
    "validation_data": "eval_data",
    "val_data": "eval_data",
    "output_dir": "out",
    "output": "out",
    "out_dir": "out",
    "run_dir": "out",
    "max_seq_len": "max_length",
    "max_seq_length": "max_length",
    "seq_len": "max_length",
    "block_size": "max_length",
    "execution_provider": "provider",
    "num_threads": "threads",
    "intra_op_threads": "threads",
    "profile": "device",
    "save_steps": "checkpoint_every",
    "eval_steps": "eval_every",
    "micro_batch": "micro_batch_size",
}


def suggest(key: Any, known: typing.Collection[str]) -> str | None:
    """The field an unknown ``key`` most likely means, or None: the key itself written with
    ``-`` or capitals, a common alias (``learning_rate`` -> ``lr``), else a close spelling."""
    name = str(key).strip().lower().replace("-", "_")
    if name in known:
        return name
    if ALIASES.get(name) in known:
        return ALIASES[name]
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.7)
    return close[0] if close else None


# -- conversion -------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names) + (" (or null)" if type(None) in typing.get_args(tp) else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin in (list, tuple):
        return "a list"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, "a path" if tp is Path else getattr(tp, "__name__", str(tp))
    )


def _fix_for(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "use " + _type_name(tp)
    if origin is typing.Union or origin is types.UnionType:
        return f"use {_type_name(tp)}"
    return {
        int: "write a whole number, e.g. 8",
        float: "write a finite number, e.g. 1e-3",
        bool: "write true or false",
        str: "write a string (quote it in YAML if it looks like a number)",
    }.get(tp, f"write {_type_name(tp)}")


def _scalar(value: Any, tp: Any) -> Any:
    """``value`` as the scalar type ``tp``, or ValueError with the reason."""
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"must be true or false, got {show(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"must be a number, got {show(value)}")
        try:
            out = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except (ValueError, OverflowError):
            raise ValueError(f"must be a number, got {show(value)}") from None
        if not math.isfinite(out):
            raise ValueError(f"must be a finite number, got {show(value)}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {show(value)}")
        return value
    if tp is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"must be a path, got {show(value)}")
        return Path(value)
    return value


_BAD = object()  # a value that could not be converted (its problem is recorded)


def _convert(value: Any, tp: Any, path: str, problems: Problems) -> Any:
    """``value`` converted to the annotated type ``tp``; problems recorded under ``path``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) == 1:
            return _convert(value, args[0], path, problems)
        for a in args:  # the first type that takes the value whole
            trial = Problems()
            out = _convert(value, a, path, trial)
            if not trial:
                return out
        problems.add(path, f"must be {_type_name(tp)}, got {show(value)}", _fix_for(tp))
        return _BAD
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) or value not in choices:
            problems.add(
                path,
                f"must be one of {', '.join(map(repr, choices))}, got {show(value)}",
                f"use one of {', '.join(map(repr, choices))}",
            )
            return _BAD
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.add(path, f"must be a mapping, got {show(value)}", "write key: value pairs")
            return _BAD
        return _build(tp, value, path, problems)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.add(path, f"must be a list, got {show(value)}", "write a list, e.g. [a, b]")
            return _BAD
        (inner, *_) = typing.get_args(tp) or (Any,)
        before = len(problems)
        out = [_convert(v, inner, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        if len(problems) > before:
            return _BAD
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.add(path, f"must be a mapping, got {show(value)}", "write key: value pairs")
            return _BAD
        kt, vt = typing.get_args(tp) or (Any, Any)
        before = len(problems)
        out = {}
        for k, v in value.items():
            if kt is str and not isinstance(k, str):
                problems.add(path, f"has a key {show(k)} that is not a string", "quote the key")
                continue
            out[k] = _convert(v, vt, f"{path}.{k}", problems)
        return _BAD if len(problems) > before else out
    try:
        return _scalar(value, tp)
    except ValueError as e:
        problems.add(path, str(e), _fix_for(tp))
        return _BAD


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _build(cls: type[T], data: dict[Any, Any], prefix: str, problems: Problems) -> Any:
    """``cls(**data)`` with every problem recorded (fields named ``prefix.name``)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}

    def name(field: str) -> str:
        return f"{prefix}.{field}" if prefix else field

    before = len(problems)
    for key in data:
        if key not in fields:
            close = suggest(key, fields)
            hint = f" (did you mean {close!r}?)" if close else ""
            problems.add(
                "",
                (f"{prefix}: " if prefix else "") + f"unknown key {show(key)}{hint}",
                f"write {close!r} instead" + (f" of {show(key)}" if prefix else "")
                if close
                else f"remove it; valid keys: {', '.join(sorted(fields))}",
            )
    for field, f in fields.items():
        if field not in data and _required(f):
            problems.add(name(field), "is missing", f"add {field}: ({_type_name(hints[field])})")
    kwargs = {}
    for field in fields:
        if field in data:
            value = _convert(data[field], hints[field], name(field), problems)
            if value is not _BAD:
                kwargs[field] = value
    bad_fields = {p.field for p in problems.items[before:]}
    try:
        return cls(**kwargs)
    except ConfigError as e:  # the class's own checks
        own = [p for p in getattr(e, "problems", ()) if name(p.field) not in bad_fields]
        for p in own:
            problems.add(name(p.field) if p.field else prefix, p.what, p.fix)
        if len(problems) == before:
            problems.add(prefix, e.what, e.fix or "correct the value")
    except TypeError as e:  # a missing field: already reported
        if len(problems) == before:
            problems.add(prefix, f"cannot be built ({e})", "check the fields")
    return _BAD


def from_dict(
    cls: type[T],
    data: dict[str, Any] | None,
    where: str = "config",
    *,
    error: type[EdgezoError] = ConfigError,
    fix: str | None = None,
) -> T:
    """Build dataclass ``cls`` from ``data``; every unknown key, missing field, bad value and
    failed check of the class is reported at once, as one ``error`` (``fix``: one fix for all
    of them, e.g. "re-export the bundle"; by default each problem's own)."""
    problems = Problems(where, error, fix)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.add("", f"must be a mapping of keys to values, got {show(data)}", "see --help")
        problems.check()
    out = _build(cls, dict(data), "", problems)
    problems.check()
    return out


# -- YAML -------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (``*a``), the billion-laughs expansion."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in edgezo files", event.start_mark
            )
        return super().compose_node(parent, index)


def parse_yaml(text: str, where: str) -> Any:
    """Safe-load YAML ``text``; every failure is a ConfigError naming ``where``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}", "fix the syntax") from None
    except RecursionError:
        raise ConfigError(
            f"{where} nests its values too deeply to read", "write a flat mapping of keys to values"
        ) from None


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file holding a mapping (a run's or a device's config); empty files, other
    encodings than UTF-8 and anything but a mapping are errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", "check the path")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {e.start}, line {line}): it is damaged or not a "
            "YAML file",
            "save it as UTF-8; if it is a run's config.yaml, restore the run folder from a backup",
        ) from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise ConfigError(
            f"{path} is empty",
            "write key: value lines (edgezo finetune --help lists them); if it is a run's "
            "config.yaml, the run folder was damaged: restore it from a backup",
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of keys to values, not a {type(data).__name__}",
            "write key: value lines, e.g. steps: 100",
        )
    return data


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` strings to a dict. A value is read as a YAML scalar (``lr=1e-4`` ->
    0.0001, ``autotune=false`` -> False, ``clip=null`` -> None); a value that is not one —
    ``data=@notes.jsonl``, ``out=runs/a: b``, a tag or an alias — stays the string given."""
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {show(item)} is not key=value", "write e.g. lr=1e-4")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {show(item)} has no key", "write e.g. lr=1e-4")
        out[key] = _scalar_or_string(value) if value else None
    return out


def _scalar_or_string(value: str) -> Any:
    try:
        parsed = yaml.load(value, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except (yaml.YAMLError, RecursionError):
        return value
    if parsed is None or isinstance(parsed, (bool, int, float, str)):
        return parsed
    return value  # a list, mapping, date or bytes: the user wrote a string
