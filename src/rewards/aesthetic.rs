//! Aesthetic reward: CLIP image embedding -> LAION MLP head.
