"""Lightning callbacks that come with retrain."""

from retrain.callbacks.completions import CompletionsTable
from retrain.callbacks.export import ExportPolicy
from retrain.callbacks.reward_curve import RewardCurve, curve_summary
from retrain.callbacks.rl import DynamicSampling, EntropyBonus, RefModelSync

__all__ = ["CompletionsTable", "DynamicSampling", "EntropyBonus", "ExportPolicy", "RefModelSync", "RewardCurve", "curve_summary"]
