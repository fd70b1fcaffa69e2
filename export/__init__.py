"""Export of trained neurosal models for inference runtimes.

* :func:`export.onnx_export.export_onnx` / :func:`export.onnx_export.verify`: ONNX (float, SAL, analog,
  spiking models), checked by onnx.checker and compared with torch in onnxruntime;
* :func:`export.extras.quantize_int8`: static int8 quantisation with onnxruntime's tools;
* :func:`export.extras.export_nir`: NIR graphs of spiking models;
* ``neurosal export RUN --onnx model.onnx`` on the command line.
"""

from .onnx_export import export_onnx, verify

__all__ = ["export_onnx", "verify"]
