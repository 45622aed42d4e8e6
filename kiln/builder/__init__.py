"""Build step: kiln checkpoint -> engine dir (graph passes, plugins, engines per backend).

``kiln.builder.build(checkpoint_dir, output_dir, backend=..., ...)`` is the API (see
:mod:`kiln.builder.api`); backends register with :func:`register_backend` (see
:mod:`kiln.builder.backends` for the interface).
"""

from kiln.builder.api import BuildResult, build
from kiln.builder.backends import Backend, BuildPlan, PartJob, PartResult, register_backend
from kiln.builder.options import BuildOptions

__all__ = ["Backend", "BuildOptions", "BuildPlan", "BuildResult", "PartJob", "PartResult",
           "build", "register_backend"]
