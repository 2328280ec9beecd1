//! Compressibility reward: -||x - C(x)||^2 with C the differentiable JPEG.
