"""Backends: the code that runs a model. See `base.Backend` for the contract."""
from .base import (Backend, BackendRequest, Finished, FramesDecoded, InstanceContext, ModelSettingError, PhaseTiming,
                   ResponseSender, StepDone, load_backend_class)

__all__ = ["Backend", "BackendRequest", "Finished", "FramesDecoded", "InstanceContext", "ModelSettingError",
           "PhaseTiming", "ResponseSender", "StepDone", "load_backend_class"]
