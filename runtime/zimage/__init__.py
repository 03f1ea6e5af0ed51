"""Z-Image (Tongyi-MAI/Z-Image-Turbo and its base model): one file per model part, plus the
pipeline that runs them in turn."""
