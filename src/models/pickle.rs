//! A safe reader for PyTorch zip-pickle checkpoints: tensors only, no code.
