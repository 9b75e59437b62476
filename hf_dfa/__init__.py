"""Train Hugging Face causal LMs with Direct Feedback Alignment and compare them with backpropagation."""

from .blocks import MODEL_BLOCKS, UnsupportedModelError, find_blocks
from .config import DFAConfig, DFAConfigError
from .feedback import FeedbackHandle, attach_feedback
from .flops import FlopCounts, paper_flops
from .grid import SIZES, UnknownSizeError, get_size, size_grid
from .trainer import DFATrainer, TrainingDivergedError, UnsupportedParallelismError

__version__ = "0.1.0"

__all__ = [
    "MODEL_BLOCKS",
    "SIZES",
    "DFAConfig",
    "DFAConfigError",
    "DFATrainer",
    "FeedbackHandle",
    "FlopCounts",
    "TrainingDivergedError",
    "UnknownSizeError",
    "UnsupportedModelError",
    "UnsupportedParallelismError",
    "attach_feedback",
    "find_blocks",
    "get_size",
    "paper_flops",
    "size_grid",
]
