"""Model loading: Hugging Face folders, the provisioned default model, random-weight presets."""

from pdserve.model.loader import LoadedModel, ModelInfo, load_model, load_model_info, resolve_dtype

__all__ = ["LoadedModel", "ModelInfo", "load_model", "load_model_info", "resolve_dtype"]
