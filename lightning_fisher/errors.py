"""Exception classes.

Every error raised on purpose by ``lightning_fisher`` derives from :class:`LightningFisherError`,
so a training script can catch the whole family, and each subclass says what went wrong in
terms of the object the user controls (a file, a module name, a field).
"""

from __future__ import annotations

from pathlib import Path


class LightningFisherError(Exception):
    """Base class of every error raised on purpose by this library."""


class FisherMapError(LightningFisherError):
    """A ``fisher_map.json`` could not be read, validated or written.

    Attributes:
        path: the file concerned, when there is one.
    """

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        super().__init__(message)


class FisherMapNotFoundError(FisherMapError, FileNotFoundError):
    """The map file (or the folder that should hold it) does not exist."""


class FisherMapDecodeError(FisherMapError):
    """The map file is not valid JSON (truncated, edited by hand, not a map at all)."""


class FisherMapSchemaError(FisherMapError):
    """The map file is JSON but violates the map schema or is internally inconsistent.

    Attributes:
        json_path: JSON path of the offending field, e.g. ``$.modules[3].rank``.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, json_path: str = "$") -> None:
        self.json_path = json_path
        super().__init__(message, path=path)


class FisherMapVersionError(FisherMapError):
    """The map was written with a schema version this library cannot read."""


class FisherMapWriteError(FisherMapError):
    """Writing the map failed; any previous map at the destination is left untouched."""


class ModelMismatchError(LightningFisherError):
    """A map was made for a different model than the one it is being applied to."""


class AdapterRankMismatchError(LightningFisherError):
    """After injection, adapters do not have the ranks the map prescribes."""


class FisherAnalysisError(LightningFisherError):
    """The Fisher analysis could not produce scores (for example, every sample was non-finite)."""


class CandidateSelectionError(LightningFisherError, ValueError):
    """The candidate module selection is empty or names modules the collector cannot score."""


class DatasetFolderError(LightningFisherError):
    """A dataset folder is missing, empty, or holds a sample file that cannot be used.

    Attributes:
        path: the folder or file concerned.
    """

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        super().__init__(message)


class FragileModelError(LightningFisherError):
    """An adaptive-rank map was about to be applied to a model marked fragile without opt-in."""


class SettingsError(LightningFisherError, ValueError):
    """A setting (rank budget, stopping rule) is out of range.

    Attributes:
        field: the offending field, as the settings object names it (e.g. ``rank_min``).
    """

    def __init__(self, message: str, *, field: str) -> None:
        self.field = field
        super().__init__(message)


class CompareError(LightningFisherError, ValueError):
    """A comparison of flat LoRA with a fisher map cannot be planned or run (bad option, no validation data, metric not logged)."""


class CommandInterrupted(LightningFisherError):
    """A run was stopped by a signal (Ctrl-C / SIGINT, or SIGTERM) before it finished.

    Attributes:
        signal_number: the signal that stopped it.
        exit_code: ``128 + signal_number``, the status a shell reports for a process ended by it
            (130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, message: str, *, signal_number: int) -> None:
        self.signal_number = signal_number
        self.exit_code = 128 + signal_number
        super().__init__(message)


class ReportWriteError(LightningFisherError):
    """A report file (a heatmap, a table) could not be written; nothing was written there.

    Attributes:
        path: the file concerned.
    """

    def __init__(self, message: str, *, path: str | Path) -> None:
        self.path = Path(path)
        super().__init__(message)
