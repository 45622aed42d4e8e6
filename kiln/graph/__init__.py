"""The graph emitter: the contract between the builder and the plugins' ONNX forms.

:mod:`.emitter` is the small vocabulary the builder's passes (``kiln/builder/graph/``) and
every plugin's ONNX form (``kiln/plugins/<op>/onnx.py``) write with. It imports neither of
them, so the arrows point one way: builder -> plugins -> emitter.
"""
