"""The transform registry: one entry per transform, at the bottom of the layers (it imports only errors).

A *transform* is what users name (``sift.compile(model, "parallel", ...)``, ``sift-compile
--transform parallel``). Its entry, a `TransformSpec`, holds everything the rest of sift asks
about it: the passes that make it (a pipeline factory, ``config -> list[Pass]``), its main rewrite
pass (whose ``name`` is the ``sift.rule`` on the nodes it makes and whose class attributes say
whether it has export forms or widens layers), a one-line summary, whether it is iso-FLOP, and its
`CapacityRule` for the iso-latency search. `CompileConfig` validation, the CLIs' ``--transform``
choices and help, `compile`, the exporters, the latency search and `load` all read this table, so
a transform a user registers is reachable from all of them.

Named pipelines (``register_pipeline("sparse-mine")``) live here too, so that a transform can name
one; `pipelines` holds the built-in factories and turns them into a `PassManager`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

from .errors import UserInputError

PipelineFactory = Callable[[Any], List[Any]]   # CompileConfig -> list[Pass]
_PIPELINES: Dict[str, PipelineFactory] = {}


@dataclass(frozen=True)
class CapacityRule:
    """What a transform's ``capacity`` (`CompileConfig.capacity`) means, for the iso-latency search.

    ``iso_flop(s)`` is the capacity the iso-FLOP formula gives at sparsity s; ``whole`` says the
    capacity is a whole number (Parallel's branches); ``smallest`` is where the search starts.
    """

    iso_flop: Callable[[float], float]
    whole: bool = False
    smallest: float = 0.1


@dataclass(frozen=True)
class TransformSpec:
    """One row of the transform registry (see the module docstring)."""

    name: str                          # what users type: "parallel"
    pipeline: str                      # the pipeline's name: "sparse-parallel" (the transform's own for a factory)
    main_pass: Optional[type] = None   # the rewrite pass class (None: no rewrite, e.g. "none")
    summary: str = ""                  # one line for --help
    iso_flop: bool = True              # VerifyPass checks the result costs what the dense model does
    capacity: Optional[CapacityRule] = None   # None: no capacity, so no budget="latency" search
    passes: Optional[PipelineFactory] = None  # config -> the passes that make it

    @property
    def rule(self) -> Optional[str]:
        """The ``sift.rule`` its rewrite stamps on the nodes it makes: the main pass's name (None: no rewrite)."""
        return getattr(self.main_pass, "name", None) if self.main_pass is not None else None

    @property
    def export_forms(self) -> bool:
        """Whether its results have export forms (`exporters.forms`): its main pass says so (``export_forms``)."""
        return bool(getattr(self.main_pass, "export_forms", False))

    @property
    def widens(self) -> bool:
        """Whether it widens layers (channel counts change; ``round_to`` applies): its main pass says so (``widens``)."""
        return bool(getattr(self.main_pass, "widens", False))


_TRANSFORMS: Dict[str, TransformSpec] = {}


def register_pipeline(name: str) -> Callable[[PipelineFactory], PipelineFactory]:
    """Decorator: register ``factory`` (``config -> list[Pass]``) as pipeline ``name``."""
    def register(factory: PipelineFactory) -> PipelineFactory:
        if name in _PIPELINES:
            raise ValueError(f"pipeline {name!r} is already registered")
        _PIPELINES[name] = factory
        return factory
    return register


def pipeline_names() -> List[str]:
    """The registered pipeline names, sorted."""
    return sorted(_PIPELINES)


def pipeline_factory(name: str) -> PipelineFactory:
    """The factory of pipeline ``name``."""
    if name not in _PIPELINES:
        raise UserInputError(f"unknown pipeline {name!r}; known: {', '.join(pipeline_names())}")
    return _PIPELINES[name]


def register_transform(name: str, pipeline: Union[str, PipelineFactory], main_pass: Optional[type] = None,
                       summary: str = "", iso_flop: bool = True,
                       capacity: Optional[CapacityRule] = None) -> TransformSpec:
    """Make ``name`` a transform: ``sift.compile(model, name, ...)`` and ``sift-compile -t name`` run ``pipeline``.

    ``pipeline``: a factory ``config -> list[Pass]`` (usually the main pass plus
    ``pipelines.finish_passes(config)``), or the name of one registered with `register_pipeline`.
    ``iso_flop=False`` skips the iso-FLOP check of `VerifyPass` for this transform; ``capacity``
    (a `CapacityRule`) lets ``budget="latency"`` search its size.
    """
    if name in _TRANSFORMS:
        raise ValueError(f"transform {name!r} is already registered")
    if isinstance(pipeline, str):
        if pipeline not in _PIPELINES:
            raise UserInputError(f"transform {name!r}: unknown pipeline {pipeline!r}; "
                                 f"known: {', '.join(pipeline_names())}")
        spec = TransformSpec(name, pipeline, main_pass, summary, iso_flop, capacity, _PIPELINES[pipeline])
    elif callable(pipeline):
        spec = TransformSpec(name, name, main_pass, summary, iso_flop, capacity, pipeline)
    else:
        raise UserInputError(f"transform {name!r}: pipeline must be a factory (config -> passes) or a "
                             f"registered pipeline name, got {pipeline!r}")
    _TRANSFORMS[name] = spec
    return spec


def unregister_transform(name: str) -> None:
    """Remove transform ``name`` (what a test that registered one does when it is done)."""
    _TRANSFORMS.pop(name, None)


def unregister_pipeline(name: str) -> None:
    """Remove pipeline ``name`` (what a test that registered one does when it is done)."""
    _PIPELINES.pop(name, None)


@contextlib.contextmanager
def temporary_transform(name: str, pipeline: Union[str, PipelineFactory], main_pass: Optional[type] = None,
                        summary: str = "", iso_flop: bool = True,
                        capacity: Optional[CapacityRule] = None) -> Iterator[TransformSpec]:
    """`register_transform` for the length of a ``with`` block (tests, notebooks): removed on the way out."""
    spec = register_transform(name, pipeline, main_pass, summary, iso_flop, capacity)
    try:
        yield spec
    finally:
        unregister_transform(name)


def transform_names() -> List[str]:
    """The registered transform names, built-in ones first (in registration order)."""
    return list(_TRANSFORMS)


def get_transform(name: str) -> TransformSpec:
    """The registry row of transform ``name``."""
    if name not in _TRANSFORMS:
        raise UserInputError(f"unknown transform {name!r}: choose one of {', '.join(transform_names())}")
    return _TRANSFORMS[name]


def transforms_help() -> str:
    """'none: ..., parallel: ...': the registry's summaries, for the CLIs' --transform help."""
    return "; ".join(f"{t.name}: {t.summary}" if t.summary else t.name for t in _TRANSFORMS.values())
