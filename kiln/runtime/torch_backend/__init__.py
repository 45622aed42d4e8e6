"""The torch backend's runtime: paged KV cache, packed-step forward, CUDA graphs, executor.

Entry for the loader: :mod:`kiln.runtime.torch_executor`. (Not ``kiln.runtime.torch``: a
submodule of that name would be bound as the attribute ``torch`` of ``kiln.runtime`` on import
and shadow the ``torch`` module in that package's namespace.)
"""
