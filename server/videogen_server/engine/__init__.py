"""The engine: model repository, scheduler, instance pool and lifecycle. Imports no diffusers."""
