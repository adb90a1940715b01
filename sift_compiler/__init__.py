"""sift-compiler: Sparse Iso-FLOP Transformations as a compiler.

>>> import sift_compiler as sift
>>> result = sift.compile(model, transform="parallel", sparsity=0.75, example_inputs=(x,))
>>> result.module                    # trainable fx.GraphModule, masks as buffers
>>> sift.sparsity.masks(result.module)
>>> print(result.report.table())
>>> sift.export_onnx(result.module, (x,), "model.onnx")
"""
from . import deploy, latency, sparsity
from .api import CompileResult, compile, flops, load
from .capture import capture, leaf_module, load_model
from .config import CompileConfig, CompileOptions
from .errors import (CaptureError, ExportError, ModelLoadError, PassError, SiftError, UnsupportedOpError,
                     UserInputError)
from .exporters.checkpoints import save_pretrained
from .exporters.onnx import export_onnx
from .initialization import init_weights, materialize
from .pipelines import (CapacityRule, get_pipeline, pipeline_names, register_pipeline, register_transform,
                        transform_names)
from .report import FlopReport
from .serialize import save
from .unit import CompilationUnit
from .version import __version__

__all__ = ["compile", "flops", "CompileResult", "CompileConfig", "CompileOptions", "CompilationUnit", "FlopReport", "capture",
           "leaf_module", "load_model", "export_onnx", "get_pipeline", "pipeline_names", "register_pipeline",
           "register_transform", "transform_names", "CapacityRule",
           "load", "save", "save_pretrained", "sparsity", "deploy", "init_weights", "materialize", "latency", "SiftError", "UserInputError", "ModelLoadError", "CaptureError",
           "PassError", "ExportError", "UnsupportedOpError"]
