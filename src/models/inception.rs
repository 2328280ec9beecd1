//! Inception v3 as pytorch-fid builds it (FID features).
