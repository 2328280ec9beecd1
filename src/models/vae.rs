//! AutoencoderKL (diffusers).
