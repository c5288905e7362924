"""Backends behind the runtime's two seams: decoders (llama.cpp, ONNX Runtime) and image encoders
(llama.cpp's mtmd, ONNX Runtime, OpenVINO). They know nothing of the runtime above them."""
