"""ijepa-engine: I-JEPA pretraining, exact to the reference, fast on GPUs, runnable on a CPU."""
from engine.config import ConfigError, IJEPAConfig  # noqa: F401
from engine.model import IJEPA, build_model  # noqa: F401
from engine.eval import load_encoder  # noqa: F401

__version__ = "0.1.0"
