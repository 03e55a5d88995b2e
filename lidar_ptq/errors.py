"""Errors a user can fix: bad input, mismatched files, a model or format the package cannot handle.

Command-line tools print these as one line and exit non-zero (no traceback unless ``--debug``); every
message names the problem and the fix. Each class also derives from the built-in type callers would
catch for it (``ValueError`` for bad values, ``RuntimeError`` for a state that forbids the step).
"""
from __future__ import annotations

import errno
import re
import sys
from collections.abc import Callable


class LidarPTQError(Exception):
    """Base of every error caused by what the user passed, not by a bug."""

    def __str__(self) -> str:  # KeyError subclasses would quote their message otherwise
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class RecipeError(LidarPTQError, ValueError):
    """A PTQ recipe (file, method name or override) that cannot run."""


class QuantConfigError(LidarPTQError, KeyError):
    """A quant config with unknown keys or malformed overrides."""


class ConfigError(LidarPTQError, ValueError):
    """An mmdet3d config the tools cannot use (not a detector config, parts missing)."""


class CalibrationDataError(LidarPTQError, ValueError):
    """Calibration or evaluation frames that are missing, too few, empty or not finite."""


def user_error_message(err: BaseException) -> str | None:
    """The one-line message a command-line tool prints for ``err``, or None if ``err`` is a bug."""
    if isinstance(err, LidarPTQError):
        return str(err)
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return str(err)
    if isinstance(err, PermissionError):
        return f"{err} (choose a directory you can write to, e.g. --work-dir)"
    missing_kernel = re.search(r"(\w+): implementation for device (\w+) not found", str(err))
    if isinstance(err, RuntimeError) and missing_kernel:
        op, device = missing_kernel.groups()
        return (f"the detector runs mmcv's {op.removesuffix('_impl')}, which has no {device} kernel in this mmcv "
                "build: run on a CUDA machine (mmcv built with CUDA)")
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"no space left on the device ({err.filename or 'output'}): free space or choose another --work-dir"
    return None


def run_reporting_user_errors(body: Callable[[], int], debug: bool = False) -> int:
    """Run a command-line tool's ``body``: a user error prints ``error: <message>`` and gives exit code 2
    (``debug`` re-raises it, traceback and all); a bug propagates as it is."""
    try:
        return body()
    except Exception as err:
        message = user_error_message(err)
        if message is None or debug:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
