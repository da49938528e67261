"""Logging set-up: text or one JSON object per line (`--log-format json`)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
import threading
import time


def _message(record: logging.LogRecord) -> str:
    """The record's message; one whose arguments do not fit it (a library's `log.info("%d", "x")`, an
    argument whose str() raises) as its format and their repr, where logging printed a multi-line
    "--- Logging error ---" block that broke a JSON log."""
    try:
        return record.getMessage()
    except Exception as err:  # noqa: BLE001 - any failure to build the message
        try:
            args = repr(record.args)
        except Exception:  # noqa: BLE001
            args = "(arguments that cannot be shown)"
        return f"{record.msg!s} % {args} (not formatted: {type(err).__name__})"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": _message(record)}
        request = getattr(record, "videogen_request", None)
        if request:
            out["request"] = request
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def _field(value: object) -> str:
    """A request log value as one token: as is when it is printable and holds no space, '=' or quote,
    else quoted as JSON (control characters escaped), so that a caller's text (a request id, a name in
    an error) can neither end the line and forge another nor pass for more fields."""
    text = str(value)
    if text and all(c.isprintable() and not c.isspace() and c not in '="' for c in text):
        return text
    return json.dumps(text)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request = getattr(record, "videogen_request", None)
        if request and record.args:  # the request log's message names the request id: one token too
            record = logging.makeLogRecord({**record.__dict__, "args": tuple(
                _field(a) if isinstance(a, str) else a for a in record.args)})
        try:
            text = super().format(record)
        except Exception:  # noqa: BLE001 - arguments that do not fit the message (see _message)
            record = logging.makeLogRecord({**record.__dict__, "msg": _message(record), "args": None})
            text = super().format(record)
        if request:
            text += " " + " ".join(f"{k}={_field(v)}" for k, v in request.items() if k != "request_id")
        return text


#: Libraries that log through a plain-text handler of their own and do not propagate to the root logger
LIBRARIES = ("transformers", "diffusers")
_configured = False


def setup(fmt: str = "text", level: str = "INFO") -> None:
    """The process's logging: every record, on stderr, in one format (a JSON log stays JSON: Python's
    warnings and the libraries' own loggers included, see `adopt_library_loggers`)."""
    global _configured
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn as records of logger "py.warnings"
    if fmt == "json":  # what Python prints itself, as records too (text is text already)
        global _python_excepthook, _python_unraisablehook
        if threading.excepthook is not _log_thread_exception:  # (a second setup keeps the first's)
            _python_excepthook, _python_unraisablehook = threading.excepthook, sys.unraisablehook
        threading.excepthook, sys.unraisablehook = _log_thread_exception, _log_unraisable
    _configured = True


_python_excepthook = threading.excepthook
_python_unraisablehook = sys.unraisablehook


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """An exception no thread caught, as an ERROR record (Python prints it otherwise; so does this where
    the level leaves errors out)."""
    log = logging.getLogger("videogen_server")
    if args.exc_type is SystemExit:
        return
    if not log.isEnabledFor(logging.ERROR):
        _python_excepthook(args)
        return
    log.error("uncaught exception in thread %s", args.thread.name if args.thread else "?",
              exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _log_unraisable(args) -> None:
    """An exception Python could not raise ("Exception ignored in ..."), as a WARNING record."""
    log = logging.getLogger("videogen_server")
    if not log.isEnabledFor(logging.WARNING):
        _python_unraisablehook(args)
        return
    log.warning("exception ignored in %r: %s", args.object, args.err_msg or "",
                exc_info=(args.exc_type, args.exc_value, args.exc_traceback) if args.exc_type else None)


def adopt_library_loggers() -> None:
    """Once `setup` has run, the installed LIBRARIES log through the root logger's handler instead of
    their own (transformers writes "[transformers] ..." lines when the svd backend is imported, which
    broke a JSON log's one object per line). Imports them (diffusers imports torch): call it at start-up
    before importing a backend, as `load_backend_class` does, never at the server's import. A library
    that fails to import is left alone (a backend that needs it says so when it imports it)."""
    if not _configured:
        return
    for name in LIBRARIES:
        try:
            if importlib.util.find_spec(name) is None:
                continue
            library_logging = importlib.import_module(f"{name}.utils.logging")
            library_logging.disable_default_handler()
            library_logging.enable_propagation()
        except Exception as err:  # noqa: BLE001 - a broken install is the backend's to report
            logging.getLogger(__name__).debug("%s logs on its own: %r", name, err)
    if "torch" in sys.modules:  # (diffusers imports it)
        adopt_torch_loggers()


def adopt_torch_loggers() -> None:
    """torch gives its loggers (torch, torch._dynamo, torch._inductor, torch.compiler...) a stderr handler
    of their own and stops them propagating: their lines ("W1129 01:58:26.190000 15018 torch/...] ...",
    a traceback a line) came out as text in a JSON log, among them the warnings that say why compiled
    code or compile artifacts could not be used (review). Their stderr handlers go; records propagate to
    the server's handler, at torch's own levels. torch's structured trace (`torch.__trace`) is kept."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or "__" in name or not (name == "torch" or name.startswith("torch.")):
            continue
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.__stderr__):
                logger.removeHandler(handler)
        if not logger.handlers:
            logger.propagate = True
