"""Analyses computed once per graph generation and reused by passes (see `manager`)."""
from .flops import FlopAnalysis, FlopCounts, NodeFlops
from .layers import LayerAnalysis, LayerTable, WeightLayer
from .manager import Analysis, AnalysisManager
from .shapes import ShapeAnalysis, ShapeMap, TensorSpec

__all__ = ["Analysis", "AnalysisManager", "FlopAnalysis", "FlopCounts", "NodeFlops", "LayerAnalysis",
           "LayerTable", "WeightLayer", "ShapeAnalysis", "ShapeMap", "TensorSpec"]
