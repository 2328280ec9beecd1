//! LAION-style aesthetic MLP head.
