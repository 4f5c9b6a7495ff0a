"""One error hierarchy for the whole package (torch-free, so every layer can import it).

Every error raised on purpose is a ``DsvlEdgeError`` whose message is one line that names the
problem and the fix; each CLI prints it as ``error: ...`` and exits 2 (``runtime.cli.run_cli``).
Anything else (a bug, a library's own exception) keeps its traceback. The three families keep
``ValueError``/``RuntimeError`` as bases, so code that caught those still works.
"""

from __future__ import annotations


class DsvlEdgeError(Exception):
    """Base of every error this package raises on purpose."""


class UserError(DsvlEdgeError, ValueError):
    """A request, flag, input file or weight directory the package cannot use."""


class ArtifactError(DsvlEdgeError, ValueError):
    """The artefact directory is missing something, is damaged, or does not fit this runtime."""


class BackendError(DsvlEdgeError, RuntimeError):
    """A backend that cannot run here (library, GPU, engine) or whose call failed."""
