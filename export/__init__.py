"""Export of trained neurosal models for inference runtimes (ONNX, NIR).

Not implemented yet: see the open export issue.
"""
