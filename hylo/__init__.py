"""hylo: hybrid, latency-optimal small language models."""

from .config import HyloConfig, HyloConfigError, parse_pattern
from .model import HybridLM
from .cache import HybridCache
from .hf import register_auto_classes

register_auto_classes()  # AutoConfig / AutoModelForCausalLM know model_type "hylo" from here on

__version__ = "0.1.0"
__all__ = ["HyloConfig", "HyloConfigError", "HybridLM", "HybridCache", "parse_pattern"]
