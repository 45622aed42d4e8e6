"""The per-rank ONNX graph, generated directly from a kiln checkpoint (no tracing).

:mod:`.emitter` is the small vocabulary every pass and plugin writes with; :mod:`.decoder`
runs the passes (inputs, positions, embedding, layers, head) over one engine part. The graph's
inputs and outputs are the contract in docs/engine.md.
"""
