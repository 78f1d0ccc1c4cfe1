"""Data managers: the base class for writing one, and the paper's section 4 examples."""

from pymach.pagers.data_manager import DataManager

__all__ = ["DataManager"]
