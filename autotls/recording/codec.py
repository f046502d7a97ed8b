"""Port values in a transcript: how what crossed a port is written, and read back.

What this module owns, and nothing else:

* :func:`encode`: any argument or result of a port method (the views of
  :mod:`autotls.fsm.ports`, keys and CSRs as bytes, datetimes, strings) as JSON, sanitised
  (:mod:`autotls.recording.sanitize`). Dataclasses become plain objects of their fields: the
  transcript reads like the views, and a field added later with a default still decodes. A
  field declared ``repr=False`` holds a key (``AcmeAccount.key_pem``) and is left out.
* :func:`decode`: the value again, guided by the type the port method declares.
* :func:`encode_error` / :func:`revive_error`: an exception a port raised, and the same
  exception again for the replay: the same class (looked up among the loaded
  :class:`~autotls.fsm.errors.AutoTLSError` subclasses by its module and name -- a
  transcript never makes us import anything), message, error class, Retry-After and problem
  document, so the policy and every ``isinstance`` branch of the steps decide as they did. A
  class that no longer exists is revived as a plain ``AutoTLSError`` of the recorded error
  class (and the replay says so). An exception that is not an ``AutoTLSError`` (a bug below a
  port) comes back with the same class name and arguments: the engine records it as an
  internal error naming that class, as it did.
"""

from __future__ import annotations

import base64
import builtins
import dataclasses
import enum
import types
import typing
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from autotls.fsm.errors import AutoTLSError, ErrorClass
from autotls.recording.sanitize import is_csr, redact_private_keys, sanitize_csr


class TranscriptError(AutoTLSError, ValueError):
    """A transcript that cannot be read: not JSON, a record without a field it needs, a value
    of the wrong shape. The message names the line."""

    error_class = ErrorClass.PERMANENT


# -- values --------------------------------------------------------------------------------


def encode(value: Any) -> Any:
    """``value`` as JSON, with every secret taken out (see the module docstring)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return redact_private_keys(value)
    if isinstance(value, enum.Enum):
        return encode(value.value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _encode_bytes(bytes(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # A field kept out of the repr holds a key (AcmeAccount.key_pem): never written.
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.repr}
    if isinstance(value, Mapping):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [encode(v) for v in value]
    return encode(str(value))


def _encode_bytes(data: bytes) -> dict[str, str]:
    if data.lstrip().startswith(b"-----BEGIN"):
        return {"pem": redact_private_keys(data.decode("ascii", "replace"))}
    if is_csr(data):
        return {"csr": base64.b64encode(sanitize_csr(data)).decode("ascii")}
    return {"base64": base64.b64encode(data).decode("ascii")}


def decode(data: Any, hint: Any, where: str = "value") -> Any:
    """The value of type ``hint`` that ``data`` (from :func:`encode`) stands for."""
    if hint is Any or hint is object:
        return data
    if hint is None or hint is type(None):
        if data is not None:
            raise TranscriptError(f"{where}: expected null, found {_kind(data)}")
        return None
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        options = typing.get_args(hint)
        if data is None and type(None) in options:
            return None
        failures = []
        for option in options:
            if option is type(None):
                continue
            try:
                return decode(data, option, where)
            except TranscriptError as exc:
                failures.append(str(exc))
        raise TranscriptError("; ".join(failures) or f"{where}: no type fits")
    if hint is datetime:
        if not isinstance(data, str):
            raise TranscriptError(f"{where}: expected a timestamp, found {_kind(data)}")
        try:
            moment = datetime.fromisoformat(data)
        except ValueError:
            raise TranscriptError(f"{where}: {data!r} is not a timestamp") from None
        return moment
    if hint is timedelta:
        if not isinstance(data, (int, float)) or isinstance(data, bool):
            raise TranscriptError(f"{where}: expected seconds, found {_kind(data)}")
        return timedelta(seconds=data)
    if hint is bytes:
        return _decode_bytes(data, where)
    if hint is float and isinstance(data, (int, float)) and not isinstance(data, bool):
        return float(data)
    if hint in (bool, int, str):
        if type(data) is not hint:
            raise TranscriptError(f"{where}: expected {hint.__name__}, found {_kind(data)}")
        return data
    if origin in (tuple, Sequence, list) or hint in (tuple, list):
        if not isinstance(data, list):
            raise TranscriptError(f"{where}: expected a list, found {_kind(data)}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        items = [decode(v, item, f"{where}[{i}]") for i, v in enumerate(data)]
        return tuple(items) if origin is tuple or hint is tuple else items
    if origin in (Mapping, dict) or hint is dict:
        if not isinstance(data, dict):
            raise TranscriptError(f"{where}: expected an object, found {_kind(data)}")
        args = typing.get_args(hint)
        value_hint = args[1] if len(args) == 2 else Any
        return {k: decode(v, value_hint, f"{where}.{k}") for k, v in data.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _decode_dataclass(data, hint, where)
    raise TranscriptError(f"{where}: cannot read a value of type {hint!r}")


def _decode_dataclass(data: Any, cls: type[Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise TranscriptError(f"{where}: expected {cls.__name__}, found {_kind(data)}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in data:
            values[field.name] = decode(
                data[field.name], hints[field.name], f"{where}.{field.name}"
            )
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise TranscriptError(f"{where}: {cls.__name__} lacks {field.name!r}")
    return cls(**values)


def _decode_bytes(data: Any, where: str) -> bytes:
    if isinstance(data, dict) and len(data) == 1:
        ((kind, text),) = data.items()
        if isinstance(text, str):
            if kind == "pem":
                return text.encode("ascii")
            if kind in ("csr", "base64"):
                try:
                    return base64.b64decode(text, validate=True)
                except ValueError:
                    raise TranscriptError(f"{where}: bad base64") from None
    raise TranscriptError(f"{where}: expected bytes ({{'pem'|'csr'|'base64': ...}})")


def _kind(data: Any) -> str:
    return "null" if data is None else type(data).__name__


# -- errors --------------------------------------------------------------------------------

# Attributes every AutoTLSError has; the rest of an exception's ``__dict__`` goes in "attrs".
_BASE_ATTRS = frozenset({"message", "error_class", "retry_after", "problem"})


def class_name(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def encode_error(error: BaseException) -> dict[str, Any]:
    """An exception a port raised, as the transcript keeps it."""
    if isinstance(error, AutoTLSError):
        attrs = {
            name: encode(value)
            for name, value in vars(error).items()
            if name not in _BASE_ATTRS and not name.startswith("_")
        }
        return {
            "type": class_name(type(error)),
            "error_class": error.error_class.value,
            "message": encode(error.message),
            "retry_after": error.retry_after,
            "problem": encode(error.problem),
            "attrs": attrs,
        }
    return {"type": class_name(type(error)), "args": [encode(a) for a in error.args]}


def _autotls_errors() -> dict[str, type[AutoTLSError]]:
    """Every AutoTLSError subclass of the loaded modules, by module and name."""
    # The modules whose errors cross a port: loaded, so that their classes are found.
    import autotls.acme.problems
    import autotls.broker
    import autotls.dnscheck
    import autotls.http
    import autotls.install
    import autotls.peeridauth  # noqa: F401

    found: dict[str, type[AutoTLSError]] = {}
    pending: list[type[AutoTLSError]] = [AutoTLSError]
    while pending:
        cls = pending.pop()
        found[class_name(cls)] = cls
        pending.extend(cls.__subclasses__())
    return found


def revive_error(data: Any, where: str = "error") -> tuple[BaseException, str | None]:
    """The exception ``data`` (from :func:`encode_error`) describes, and a note when it could
    not be revived as its own class."""
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise TranscriptError(f"{where}: an error needs a 'type'")
    name: str = data["type"]
    if "error_class" in data:
        return _revive_autotls_error(data, name, where)
    args = data.get("args", [])
    if not isinstance(args, list):
        raise TranscriptError(f"{where}: 'args' must be a list")
    module, _, short = name.rpartition(".")
    builtin = getattr(builtins, short, None) if module == "builtins" else None
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        try:
            return builtin(*args), None
        except TypeError:
            pass
    # Not a class we may import: one of the same name, so the engine's "internal error ...:
    # <Name>: <message>" reads as it did.
    stand_in = type(short or "Exception", (Exception,), {"__module__": module or "builtins"})
    return stand_in(*args), None


def _revive_autotls_error(
    data: dict[str, Any], name: str, where: str
) -> tuple[AutoTLSError, str | None]:
    try:
        error_class = ErrorClass(data["error_class"])
    except ValueError:
        raise TranscriptError(f"{where}: unknown error class {data['error_class']!r}") from None
    message = data.get("message")
    retry_after = data.get("retry_after")
    problem = data.get("problem")
    if not isinstance(message, str):
        raise TranscriptError(f"{where}: 'message' must be a string")
    if retry_after is not None and not isinstance(retry_after, (int, float)):
        raise TranscriptError(f"{where}: 'retry_after' must be a number")
    if problem is not None and not isinstance(problem, dict):
        raise TranscriptError(f"{where}: 'problem' must be an object")
    cls = _autotls_errors().get(name)
    note = None
    if cls is None:
        cls = AutoTLSError
        note = f"{name} no longer exists: replayed as AutoTLSError ({error_class.value})"
    error = cls.__new__(cls)
    BaseException.__init__(error, message)
    attrs = data.get("attrs") or {}
    if not isinstance(attrs, dict):
        raise TranscriptError(f"{where}: 'attrs' must be an object")
    for attr, value in attrs.items():
        setattr(error, attr, value)
    error.message = message
    error.error_class = error_class
    error.retry_after = float(retry_after) if retry_after is not None else None
    error.problem = dict(problem) if problem is not None else None
    return error, note
