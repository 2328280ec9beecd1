//! Building blocks shared by the diffusers models (ResNet blocks, attention, transformer blocks).
