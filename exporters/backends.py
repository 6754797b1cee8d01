"""The engines :func:`exporters.runtime.load_engine` runs an export on, declared once (no runtime
import: the daemon's options and the command lines read it without loading ONNX Runtime)."""

BACKENDS = ("onnx-cpu", "onnx-cuda", "onnx-tensorrt", "openvino-cpu", "torch")
