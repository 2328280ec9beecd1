//! DDIM scheduler with Stable Diffusion v1.5 settings.
