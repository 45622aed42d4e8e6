"""The engine dir: the contract between ``kiln build`` (writes it) and the runtime (reads it).

Both sides import it from here, never from each other (docs/engine.md):

- :mod:`kiln.engine.manifest`: the compatibility manifest (``config.json``), the build
  limits, the names of the per-rank files, reading and checking them. Re-exported here, so
  ``from kiln.engine import EngineManifest`` is the usual import.
- :mod:`kiln.engine.torch_files`: the ``torch`` backend's packed safetensors files (layout,
  writer-side packing, reading and checking). Imported by its full name: it needs torch, and
  this package stays importable without it.

The ``onnx`` and ``tensorrt`` files are standard ONNX (external data) and serialized
TensorRT engines; build and run share only their names (:data:`ENGINE_FILE`).
"""

from kiln.engine.manifest import (
    BACKENDS,
    DIGEST_KEY,
    ENGINE_FILE,
    ENGINE_FORMAT_VERSION,
    MANIFEST_NAME,
    BuildLimits,
    EngineError,
    EngineManifest,
    check_files,
    file_problem,
    manifest_edit,
    rank_file_names,
    read_manifest,
    read_manifest_data,
    sha256_file,
    verify_checksums,
    verify_files,
)

__all__ = ["BACKENDS", "DIGEST_KEY", "ENGINE_FILE", "ENGINE_FORMAT_VERSION", "MANIFEST_NAME",
           "BuildLimits",
           "EngineError", "EngineManifest", "check_files", "file_problem", "manifest_edit",
           "rank_file_names",
           "read_manifest", "read_manifest_data", "sha256_file", "verify_checksums", "verify_files"]
