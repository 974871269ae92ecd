"""GGUF export: HF dir → GGUF (convert.py), quantization (quantize.py), the architecture
registry (arch.py), tensor-name table (tensors.py) and safe safetensors reading (weights.py)."""
