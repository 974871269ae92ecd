"""GGUF export: HF dir → GGUF (convert.py), quantization (quantize.py), the architecture
registry (arch.py), tensor-name table (tensors.py), safe safetensors reading (weights.py), the
tokenizer translation between HF and GGUF vocabularies (vocab.py) and the importance matrix
(imatrix.py)."""
