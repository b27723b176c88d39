"""Exceptions raised by adapters_core. All derive from ValueError so callers that catch PEFT's errors keep working;
the service maps each class to an HTTP status."""


class AdapterError(ValueError):
    """Base class: something about an adapter or its use is wrong."""


class AdapterConfigError(AdapterError):
    """The adapter config is missing, not JSON, or has malformed values."""


class UnsupportedFeatureError(AdapterError):
    """The adapter asks for a PEFT feature this library does not implement; the message names it."""


class AdapterWeightsError(AdapterError):
    """The weights file is missing, unreadable, truncated, or its tensors do not fit the base model."""


class TargetNotFoundError(AdapterError):
    """The config's targets match no module of the model."""


class ModuleConflictError(AdapterError):
    """The adapter would wrap a module the other way than adapters already on it do: a `modules_to_save` copy
    of a module that LoRA / IA3 adapters adapt, or a LoRA / IA3 on a module held as `modules_to_save` copies.
    `holders` names those adapters (remove them first: the two kinds never share a module)."""

    def __init__(self, message: str, holders: list[str]):
        super().__init__(message)
        self.holders = holders


class UnknownAdapterError(AdapterError, KeyError):
    """An adapter name that the model does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
