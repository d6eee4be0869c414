"""What ``rup upload SOURCE... DEST`` stores: the sources and destination as (file, URL) pairs.

As ``gcloud storage cp`` does: a destination ending in ``/`` (``gs://bucket/`` or
``gs://bucket/prefix/``) receives each file under its relative path, a file under its own
name and a directory (only with ``-r``) as ``DIRNAME/relative/path``; one file may also go to
a full object URL. The content type is guessed from the file's name.
"""

from __future__ import annotations

import mimetypes
import os
from dataclasses import dataclass
from typing import Final

from proxy.client import parse_gs_url

__all__ = ["DEFAULT_CONTENT_TYPE", "PlanError", "UploadPlan", "content_type_for", "plan_uploads"]

DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"


class PlanError(ValueError):
    """The sources and destination do not make a set of uploads (a usage error)."""


@dataclass(frozen=True)
class UploadPlan:
    """``pairs`` of (local file, ``gs://`` URL); ``single`` when the command names one file
    (or stdin) and one object: the single-file behaviour (resume records, one bar) applies."""

    pairs: tuple[tuple[str, str], ...]
    single: bool


def content_type_for(path: str) -> str:
    """The content type a file's name suggests (``hello.txt``: ``text/plain``)."""
    guessed, _ = mimetypes.guess_type(path, strict=False)
    return guessed or DEFAULT_CONTENT_TYPE


def plan_uploads(sources: list[str], destination: str, *, recursive: bool) -> UploadPlan:
    """The uploads that ``sources`` and ``destination`` describe, in a stable order.

    Raises :class:`PlanError` for a directory without ``recursive``, several sources or a
    directory with a destination that does not end in ``/``, stdin among several sources, or
    a source that does not exist.
    """
    if not sources:
        raise PlanError("give at least one source and a gs:// destination")
    into_prefix = destination.endswith("/")
    bucket, _ = _parse_destination(destination)
    if sources == ["-"]:
        if into_prefix:
            raise PlanError("stdin has no name: give the full gs://BUCKET/OBJECT")
        return UploadPlan(((sources[0], destination),), single=True)
    if "-" in sources:
        raise PlanError("stdin (-) cannot be uploaded with other sources")
    if len(sources) == 1 and os.path.isfile(sources[0]):
        source = sources[0]
        url = destination + os.path.basename(source) if into_prefix else destination
        return UploadPlan(((source, url),), single=True)
    if not into_prefix:
        raise PlanError(
            f"several sources or a directory go under a prefix: end the destination with /"
            f" (gs://{bucket}/ or gs://{bucket}/PREFIX/)"
        )
    pairs: list[tuple[str, str]] = []
    for source in sources:
        if os.path.isdir(source):
            if not recursive:
                raise PlanError(f"{source!r} is a directory: use -r to upload its files")
            pairs.extend((path, destination + relative) for path, relative in _files_under(source))
        elif os.path.isfile(source):
            pairs.append((source, destination + os.path.basename(source)))
        else:
            raise PlanError(f"cannot read {source!r}: no such file or directory")
    return UploadPlan(tuple(pairs), single=False)


def _parse_destination(destination: str) -> tuple[str, str]:
    # a prefix is checked as the name of an object under it would be
    try:
        return parse_gs_url(destination + ("x" if destination.endswith("/") else ""))
    except ValueError as exc:
        raise PlanError(str(exc)) from exc


def _files_under(directory: str) -> list[tuple[str, str]]:
    """Every file below ``directory``, with its path relative to the directory's parent (so
    the directory's own name leads it), with ``/`` separators, sorted."""
    top = os.path.normpath(directory)
    parent = os.path.dirname(os.path.abspath(top))
    found: list[tuple[str, str]] = []
    for root, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if os.path.isfile(path):
                relative = os.path.relpath(os.path.abspath(path), parent)
                found.append((path, relative.replace(os.sep, "/")))
    return found
