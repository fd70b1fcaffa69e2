"""int8 static quantisation (onnxruntime's tools) and NIR export of spiking models."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from neurosal.errors import NeurosalError
from neurosal.models import Net

from .onnx_export import kind_of


def quantize_int8(fp32_path, int8_path, calibration: np.ndarray, batch: int = 32) -> None:
    """Static int8 quantisation (QDQ, per-channel weights) calibrated on ``calibration`` inputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calibration[i:i + batch]} for i in range(0, len(calibration), batch)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QInt8, per_channel=True)
        except Exception as exc:
            raise NeurosalError(f"int8 quantisation failed: {type(exc).__name__}: {exc}") from exc


def export_nir(net: Net, path, dt: float = 1e-3) -> None:
    """A spiking model as a NIR graph (Input -> [Affine -> LIF/CubaLIF]* -> Affine -> LI -> Output).

    The discrete decays map to NIR's continuous parameters the way snnTorch's own NIR export does:
    tau = dt / (1 - beta), r = tau / dt, v_leak = 0, per-neuron arrays (nir >= 1.0.8 wants arrays).
    NIR graphs are continuous-time: the one-step synaptic delay of our discrete model is left to the
    runtime's discretisation.
    """
    import nir

    kind = kind_of(net)
    if not kind.spiking:
        raise NeurosalError("NIR describes spiking networks; this is a non-spiking model: export it to ONNX")
    if kind.sal:
        raise NeurosalError("NIR has no node for SAL's sample-dependent area routing; export it to ONNX")
    if kind.analog:
        raise NeurosalError("NIR has no node for the analog layers' DAC/ADC quantisation; export it to ONNX")
    n_in = net.blocks[0].op.in_features
    nodes = {"input": nir.Input(input_type=np.array([n_in]))}
    edges, prev = [], "input"
    for i, blk in enumerate(net.blocks):
        w = blk.op.weight.detach().double().numpy()
        n = w.shape[0]
        bias = blk.op.bias.detach().double().numpy() if blk.op.bias is not None else np.zeros(n)
        nodes[f"fc{i}"] = nir.Affine(weight=w, bias=bias)
        post = blk.post
        tau = dt / (1 - getattr(post, "beta"))
        full = lambda v: np.full(n, float(v))  # noqa: E731
        if hasattr(post, "local_vjp"):  # LIF population
            if post.neuron == "leaky":
                nodes[f"neuron{i}"] = nir.LIF(tau=full(tau), r=full(tau / dt), v_leak=full(0),
                                              v_threshold=full(post.theta))
            else:
                tau_syn = dt / (1 - post.alpha) if post.alpha < 1 else np.inf
                nodes[f"neuron{i}"] = nir.CubaLIF(tau_syn=full(tau_syn), tau_mem=full(tau), r=full(tau / dt),
                                                  v_leak=full(0), v_threshold=full(post.theta), w_in=full(1))
        else:  # the leaky-integrator readout
            nodes[f"neuron{i}"] = nir.LI(tau=full(tau), r=full(tau / dt), v_leak=full(0))
        edges += [(prev, f"fc{i}"), (f"fc{i}", f"neuron{i}")]
        prev = f"neuron{i}"
    nodes["output"] = nir.Output(output_type=np.array([net.blocks[-1].op.out_features]))
    edges.append((prev, "output"))
    nir.write(str(path), nir.NIRGraph(nodes=nodes, edges=edges))


def accuracy_onnx(path, x: torch.Tensor, y: torch.Tensor) -> float:
    from .onnx_export import run_onnxruntime

    logits = run_onnxruntime(path, x)[0]
    return float((logits.argmax(1) == y.numpy()).mean())
