"""Failures as HTTP answers: a stage call's exception -> one line and a status, an upload -> an image or a 4xx."""
from __future__ import annotations

import io

from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from unclip.core.errors import RequestError, UnclipError
from unclip.engine.manipulate import ImageInputError, load_image
from unclip.serve.schema import Fail


def stage_failure(stage: str, e: Exception) -> Fail:
    """A stage's failure: a user error raised in the replica keeps its one-line message; a dead replica is a 503
    (Ray restarts it: a retry succeeds); anything else is a bug in the stage, a 500 that points to its log."""
    cause = getattr(e, "cause", None) or e  # a RayTaskError carries what the replica raised
    if isinstance(cause, RequestError):
        return Fail(422, str(cause))
    if isinstance(cause, UnclipError):
        return Fail(500, f"the {stage} stage failed: {cause}")
    if isinstance(e, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)):
        return Fail(503, f"the {stage} stage's replica died while running this request (Ray restarts it); retry")
    if isinstance(e, BackPressureError):
        return Fail(503, f"the {stage} stage is at capacity; retry later")
    return Fail(500, f"the {stage} stage failed ({type(cause).__name__}); its replica's log has the traceback")


def read_upload(data: bytes, limit: int):
    """The uploaded bytes as an RGB image, decoded as unclip-run decodes files: 413 over `limit`, 415 for bytes
    that are not an image."""
    if len(data) > limit:
        raise Fail(413, f"image: the upload is over this server's limit of {limit} bytes; send a smaller image")
    if not data:
        raise Fail(422, "image: the upload is empty; send a PNG, JPEG or WebP file")
    try:
        return load_image(io.BytesIO(data))
    except ImageInputError as e:
        raise Fail(415, "image: " + str(e).split(": ", 1)[-1]) from None
