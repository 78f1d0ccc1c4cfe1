"""Data managers: the base class for writing one, the paper's section 4 examples, and the
default pager."""

from pymach.pagers.data_manager import DataManager

__all__ = ["DataManager"]
