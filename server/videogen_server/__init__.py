"""videogen server: a gRPC model server for image-to-video generation (Stable Video Diffusion)."""
__version__ = "0.1.0"
