"""The MLX runtime (Z-Image pipeline, loader, image API)."""
