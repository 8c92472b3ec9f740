"""The errors a user can cause and fix. Each message is one line naming the problem and the fix; the CLIs print it
and exit with status 1, with no traceback. Everything else is a bug (an assert, a traceback)."""
from __future__ import annotations


class UnclipError(Exception):
    """A problem the user can fix."""


class ModelLoadError(UnclipError):
    """A model folder, config or weight file that this project cannot use; the message names path and fix."""


class ExportError(UnclipError):
    """An export that failed or an export directory that can't be used; the message names the fix."""


class BackendUnavailable(UnclipError):
    """A backend whose package or device is missing; the message names what to install."""


class RequestError(UnclipError):
    """A bad option or request value; the message names the flag and the valid choices."""


class NonFiniteError(UnclipError):
    """A network produced NaN or inf; the message names the stage."""


class BackendError(UnclipError):
    """A backend that failed while running a network (out of memory, a runtime's own failure); the message names
    the backend, the network and what to try."""


class OutputError(UnclipError):
    """Results that could not be written (a full disk, a removed folder); what was written before is kept."""


class ExportLocked(ExportError):
    """Another live export holds the folder's lock."""


def one_line(e: Exception) -> str:
    """What a command prints for an error users can cause: an UnclipError's message, or for a PermissionError (a
    shared folder this user may not read or write) the file and what to do."""
    if isinstance(e, PermissionError):
        return f"{e.filename or e}: permission denied; ask its owner for access, or use a folder of your own"
    return str(e)

