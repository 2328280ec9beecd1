//! Differentiable JPEG (Shin & Song 2017).
