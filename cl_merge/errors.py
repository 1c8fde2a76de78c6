"""Exception types. Every error a user can cause is a ``ClMergeError`` whose
message is one line naming the problem (key, field, file); the CLI prints it
without a traceback and exits with status 2."""


class ClMergeError(Exception):
    """Base class for errors caused by user input."""


class MergeInputError(ClMergeError, ValueError):
    """State dicts that cannot be merged: keys, shapes, dtypes, NaN/Inf."""


class HyperparameterError(ClMergeError, ValueError):
    """A strategy hyperparameter that is unknown or out of range."""


class UnknownNameError(ClMergeError, KeyError):
    """An unknown strategy, model, dataset or scenario name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(ClMergeError, OSError):
    """A checkpoint file that is missing, truncated, corrupt or unsafe."""


class ConfigError(ClMergeError, ValueError):
    """An invalid config or scenario value (the message names file and field)."""


class DiskFullError(ClMergeError, OSError):
    """A write that found no space left on the device (the message names the file)."""


class DataError(ClMergeError, OSError):
    """A dataset that is missing from the data root, or inconsistent."""


def close_matches(name: str, choices) -> str:
    """`` (did you mean: a, b?)`` suffix for unknown-name messages, or ''."""
    import difflib

    found = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(found)}?)" if found else ""
