"""Lightning callbacks that come with retrain."""

from retrain.callbacks.completions import CompletionsTable
from retrain.callbacks.reward_curve import RewardCurve, curve_summary

__all__ = ["CompletionsTable", "RewardCurve", "curve_summary"]
