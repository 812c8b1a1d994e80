"""The project's exception hierarchy: catch ``FeatUpError`` to catch everything we raise on purpose."""


class FeatUpError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(FeatUpError, ValueError):
    """A configuration value or name is not valid (``expected X, got Y``)."""


class InputError(FeatUpError, ValueError):
    """A tensor, image or file handed to the method has the wrong shape, size or content."""


class CheckpointError(FeatUpError):
    """A checkpoint or state dict cannot be read or does not fit the model."""


class WeightsUnavailableError(FeatUpError):
    """Pretrained weights were asked for but cannot be fetched (offline, unknown name)."""
