"""Text sources and token windows."""

from secateur.data.sources import TextSource, load_text
from secateur.data.windows import calibration_windows, eval_windows, tokenize_stream

__all__ = ["TextSource", "calibration_windows", "eval_windows", "load_text", "tokenize_stream"]
