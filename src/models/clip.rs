//! CLIP text and vision towers (transformers and open_clip layouts).
