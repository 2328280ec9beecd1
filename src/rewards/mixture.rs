//! Weighted mixtures of rewards (joint tuning, Eq. 10).
