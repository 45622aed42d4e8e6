"""The per-rank ONNX graph, generated directly from a kiln checkpoint (no tracing).

:mod:`kiln.graph.emitter` is the small vocabulary every pass and plugin writes with (a
package of its own, so the plugins never import the builder); :mod:`.decoder` runs the
passes (inputs, positions, embedding, layers, head) over one engine part. The graph's inputs
and outputs are the contract in docs/engine.md.
"""
