"""Object detection service: Darknet models exported to ONNX, served with ONNX Runtime."""
