"""ijepa-engine: I-JEPA pretraining, exact to the reference, fast on GPUs, runnable on a CPU."""
from engine.config import IJEPAConfig  # noqa: F401
from engine.errors import ConfigError  # noqa: F401
from engine.model import IJEPA, build_model  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name):
    # the public ``engine.load_encoder`` lives with the evaluation tool; imported on first use so
    # that importing the training core never pulls in a tool
    if name == "load_encoder":
        from engine.tools.eval import load_encoder
        return load_encoder
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
