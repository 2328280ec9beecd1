//! Human-preference reward (HPSv2 structure): cosine of CLIP image and text features.
