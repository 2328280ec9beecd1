//! LoRA adapter group (Eq. 4): per-task adapter pairs on chosen linear layers.
