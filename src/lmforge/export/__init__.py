"""Export: a trained model as an ONNX folder for ONNX Runtime (fused graph, optional dynamic int8), which
`lmforge predict`, `eval` and `serve` run like the run it came from."""

from lmforge.export.run import export
from lmforge.stage import callable_stage

__all__ = ["export"]

callable_stage(__name__)  # `from lmforge import export` can be called: export(...)
