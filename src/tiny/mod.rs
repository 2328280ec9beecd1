//! The embedded tiny world: procedural captioned scenes, prompts, ratings and preferences.
