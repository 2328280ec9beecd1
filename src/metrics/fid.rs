//! Frechet Inception Distance in f64 (pytorch-fid formula, eigenvalue square root).
