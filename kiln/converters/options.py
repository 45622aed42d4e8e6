"""ConvertOptions: what ``kiln convert_checkpoint`` takes besides its two directories.

The one definition of the options, their defaults and help: the Python API
(:func:`kiln.convert_checkpoint`) takes them by keyword and the CLI builds its flags from these
fields. Torch-free, so the CLI's ``--help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.config import DTYPES
from kiln.errors import ConfigError, check_counts, check_flags


@dataclass(frozen=True)
class ConvertOptions:
    dtype: str = field(default="auto", metadata={
        "help": "Weight dtype; auto keeps the checkpoint's torch_dtype."})
    tp_size: int = field(default=1, metadata={"help": "Tensor-parallel ranks."})
    pp_size: int = field(default=1, metadata={"help": "Pipeline-parallel stages."})
    revision: str | None = field(default=None, metadata={
        "help": "Hub revision (branch, tag or commit) for a hub id."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing --output_dir (only one kiln wrote)."})
    allow_pickle: bool = field(default=False, metadata={
        "help": "Load .bin/.pt pickle weights (torch.load weights_only=True)."})

    def __post_init__(self) -> None:
        check_flags(self, ConfigError)
        check_counts(self, ConfigError)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be auto or one of {', '.join(DTYPES)}, found "
                              f"{self.dtype!r}")
