"""Silence the import-time noise of megatron-core and DeepSpeed that every rank would otherwise print.

megatron-core warns on import that Transformer Engine and Apex are absent (it then uses torch
fallbacks, which is what we want); DeepSpeed logs which accelerator it picked at WARNING level.
"""
import contextlib
import logging
import warnings


@contextlib.contextmanager
def quiet_megatron_import():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
        warnings.filterwarnings("ignore", message=".*Apex.*")
        warnings.filterwarnings("ignore", category=FutureWarning, module="megatron")
        yield


def quiet_libraries(main_process: bool) -> None:
    """Lower third-party log levels; non-main ranks only report warnings of our own."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*")
    for name in ("DeepSpeed", "deepspeed", "megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING if main_process else logging.ERROR)
